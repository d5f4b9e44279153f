"""The retraining pipeline's runner (retries, timeouts, idempotence, alerts) and the real steps."""

import json
import time
from pathlib import Path

import pytest

from online.retraining import Alerter, RetrainingFailed, Step, default_steps, run_pipeline


def flaky(context):
    """Fails on its first attempt, succeeds on the second (state kept in a file across processes)."""
    counter = Path(context["run_dir"]) / "flaky.count"
    n = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(n + 1))
    if n == 0:
        raise OSError("store unavailable")
    return {"attempt": n + 1}


def slow(context):
    time.sleep(30)
    return {}


def count_runs(context):
    marker = Path(context["run_dir"]) / "runs.count"
    marker.write_text(str(int(marker.read_text()) + 1 if marker.exists() else 1))
    return {"flaky_attempt": context["flaky"]["attempt"]}


def test_transient_failure_is_retried_and_finished_steps_are_not_rerun(tmp_path):
    alerter = Alerter(alert_file=tmp_path / "alerts.jsonl")
    steps = [Step("flaky", flaky, timeout_s=60), Step("after", count_runs, timeout_s=60)]
    out = run_pipeline(steps, tmp_path / "run", {}, alerter, backoff_s=0.01)
    assert out == {"flaky": {"attempt": 2}, "after": {"flaky_attempt": 2}}
    assert json.loads((tmp_path / "run" / "flaky.json").read_text())["attempts"] == 2
    run_pipeline(steps, tmp_path / "run", {}, alerter, backoff_s=0.01)  # again: nothing reruns
    assert (tmp_path / "run" / "runs.count").read_text() == "1"
    assert not alerter.sent


def test_a_hanging_step_times_out_retries_then_alerts(tmp_path):
    alerter = Alerter(alert_file=tmp_path / "alerts.jsonl")
    started = time.monotonic()
    with pytest.raises(RetrainingFailed, match="slow"):
        run_pipeline([Step("slow", slow, timeout_s=1.0, attempts=2)], tmp_path / "run", {}, alerter, backoff_s=0.01)
    assert time.monotonic() - started < 25  # terminated, not waited out
    alert = json.loads((tmp_path / "alerts.jsonl").read_text().splitlines()[-1])
    assert alert["step"] == "slow" and alert["attempts"] == 2 and "timed out" in alert["error"]
    assert not (tmp_path / "run" / "slow.json").exists()


def big_result(context):
    return {"rows": [f"{n:0100d}" for n in range(2000)]}  # about 200 KB: more than a pipe's buffer


def disk_full(context):
    raise OSError("disk full")


def test_a_step_with_a_large_result_finishes_instead_of_timing_out(tmp_path):
    """The child cannot exit before a result larger than the pipe's buffer is read: joining it first
    waited out the timeout and reported a finished step as hung."""
    alerter = Alerter(alert_file=tmp_path / "alerts.jsonl")
    started = time.monotonic()
    out = run_pipeline([Step("big", big_result, timeout_s=20, attempts=1)], tmp_path / "run", {}, alerter)
    assert len(out["big"]["rows"]) == 2000 and time.monotonic() - started < 15
    assert not alerter.sent


def test_alerts_reach_the_file_when_the_webhook_is_down_or_the_path_is_a_string(tmp_path):
    """The Airflow DAG passes the alert file as a string (an environment variable); a webhook that
    cannot be reached must neither lose the file's alert nor replace the step's failure."""
    alerter = Alerter(webhook_url="http://127.0.0.1:9/hook", alert_file=str(tmp_path / "alerts.jsonl"))
    with pytest.raises(RetrainingFailed, match="disk full.*could not be delivered"):
        run_pipeline([Step("s", disk_full, timeout_s=60, attempts=1)], tmp_path / "run", {}, alerter)
    alert = json.loads((tmp_path / "alerts.jsonl").read_text().splitlines()[-1])
    assert alert["step"] == "s" and "disk full" in alert["error"]


@pytest.mark.slow
def test_real_steps_retrain_gate_and_export(raw_paths, tmp_path):
    from conftest import SMALL

    settings = {
        "raw_dir": str(Path(raw_paths["events"]).parent),
        "overrides": SMALL,
        "registry": str(tmp_path / "registry"),
        "export_dir": str(tmp_path / "exports"),
    }
    alerter = Alerter(alert_file=tmp_path / "alerts.jsonl")
    first = run_pipeline(default_steps(timeout_s=600), tmp_path / "gen1", settings, alerter)
    assert first["gate"]["passed"] and Path(first["export"]["repo"], "funnel", "config.pbtxt").exists()
    # Gate the same candidate against itself with a tolerance no model can meet: refused. The run
    # folder keeps ingest/workflow/train, so only evaluate and gate run again (idempotent steps).
    for step in ("evaluate", "gate", "export"):
        (tmp_path / "gen1" / f"{step}.json").unlink()
    strict = {**settings, "current_version": first["train"]["version"], "max_auc_drop": -1.0}
    with pytest.raises(RetrainingFailed, match="gate"):
        run_pipeline(default_steps(timeout_s=600, attempts=1), tmp_path / "gen1", strict, alerter)
    assert "AUC regressed" in alerter.sent[-1]["error"]
    assert not (tmp_path / "gen1" / "export.json").exists()  # a refused candidate is never exported


def test_airflow_dag_declares_the_runners_steps_in_order():
    import ast

    from online import retraining

    tree = ast.parse((Path(retraining.__file__).parent / "airflow_dag.py").read_text())
    steps = next(
        ast.literal_eval(n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "STEPS"
    )
    assert steps == [s.name for s in default_steps()]
    assert all(hasattr(retraining, f"step_{name}") for name in steps)
