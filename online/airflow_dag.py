"""The retraining pipeline as an Airflow DAG, for production schedulers.

Drop this file into Airflow's ``dags/`` folder in an environment where this project is installed.
Each task runs one step of ``online/retraining.py`` (the same functions the local runner uses);
Airflow supplies what the local runner does itself: retries with exponential backoff (none for a
gate refusal, as in the runner), a timeout per task and a failure alert (``on_failure_callback``: to
``RETRAINING_ALERT_WEBHOOK`` where set, and always to ``RETRAINING_ALERT_FILE``, by default
``build/retraining/alerts.jsonl``). Results pass between tasks through XCom. This file needs Airflow
(2.6+); the tests load it with a stand-in for Airflow and check that its tasks and the runner's steps
stay the same list.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta

from airflow import DAG
from airflow.exceptions import AirflowFailException
from airflow.operators.python import PythonOperator

from online import retraining


def _env(name: str, default: str = "") -> str:
    # A variable set but empty (``FOO=`` in a deployment's env file) means the default: float("")
    # failed at import and Airflow dropped the whole DAG.
    return os.environ.get(name, "").strip() or default


SETTINGS = {
    "raw_dir": _env("RETRAINING_RAW_DIR", "data/raw"),
    "registry": _env("RETRAINING_REGISTRY", "artifacts/registry"),
    "export_dir": _env("RETRAINING_EXPORT_DIR", "build/exports"),
    "max_auc_drop": float(_env("RETRAINING_MAX_AUC_DROP", "0.01")),
    # With these two set, the candidate is added to the live repository and A/B tested there.
    "live_repo": _env("RETRAINING_LIVE_REPO"),
    "grpc_url": _env("RETRAINING_GRPC_URL"),
    "tls_ca": _env("RETRAINING_TLS_CA"),  # where the server's gRPC speaks TLS
}
STEPS = ["ingest", "workflow", "train", "evaluate", "gate", "export", "experiment"]
# The runner's attempts and timeout per step; Airflow's ``retries`` counts the tries after the first.
_RUNNER_STEP = retraining.default_steps()[0]


def _attempts(ti) -> int | None:
    """How many times the failed task ran. Airflow 2 (to 2.9) reports ``try_number`` one too high once
    the task is no longer running (the try it would be next), so take ``prev_attempted_tries`` where
    it exists (deprecated in 2.10 as equal to ``try_number``); Airflow 3 has only ``try_number``."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 2.10's deprecation of prev_attempted_tries
        tries = getattr(ti, "prev_attempted_tries", None)
        if tries is None:
            tries = getattr(ti, "try_number", None)
    return int(tries) if isinstance(tries, int) else None


def _alert(context) -> None:
    """The runner's alert (``retraining._fail``): pipeline, step, attempts, error, run_dir, at."""
    ti = context["task_instance"]
    exception = context.get("exception")
    error = str(exception) if exception is not None else ""
    retraining.Alerter(
        webhook_url=_env("RETRAINING_ALERT_WEBHOOK") or None,
        # Always a file too: with neither variable set the alert went nowhere.
        alert_file=_env("RETRAINING_ALERT_FILE", "build/retraining/alerts.jsonl"),
    ).send(
        {
            "pipeline": "retraining",
            "step": ti.task_id,
            "attempts": _attempts(ti),
            "error": error.splitlines()[0] if error else type(exception).__name__ if exception else "",
            "run_dir": f"build/retraining/{context['ds']}" if context.get("ds") else None,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )


def _run(step: str, **airflow_context) -> dict:
    ti = airflow_context["ti"]
    context = {"settings": SETTINGS, "run_dir": f"build/retraining/{airflow_context['ds']}"}
    for earlier in STEPS[: STEPS.index(step)]:
        context[earlier] = ti.xcom_pull(task_ids=earlier)
    try:
        return getattr(retraining, f"step_{step}")(context)
    except retraining.StepRefused as err:  # the gate's no: a retry would repeat it, so fail at once
        raise AirflowFailException(str(err)) from err


with DAG(
    dag_id="merlin_funnel_retraining",
    start_date=datetime(2026, 1, 1),
    schedule="@daily",
    catchup=False,
    default_args={
        "retries": _RUNNER_STEP.attempts - 1,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
        "execution_timeout": timedelta(seconds=_RUNNER_STEP.timeout_s),
        "on_failure_callback": _alert,
    },
) as dag:
    previous = None
    for name in STEPS:
        task = PythonOperator(task_id=name, python_callable=_run, op_kwargs={"step": name})
        if previous is not None:
            previous >> task
        previous = task
