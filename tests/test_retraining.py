"""The retraining pipeline's runner (retries, timeouts, idempotence, alerts) and the real steps."""

import json
import time
from pathlib import Path

import pytest

from models import registry
from online.retraining import Alerter, RetrainingFailed, Step, StepRefused, default_steps, run_pipeline


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


def cleans_up_when_stopped(context):
    """Like a roll-out: hangs inside a ``try:`` whose clean-up (putting the served version back) must run
    however the step ends; each clean-up appends a line to a file (state kept across processes)."""
    import os

    run = Path(context["run_dir"])
    with open(run / "restored.log", "a") as f:
        f.write(f"entered {os.getpid()}\n")
    try:
        time.sleep(30)
    except BaseException as err:
        with open(run / "restored.log", "a") as f:
            f.write(f"except {type(err).__name__} {os.getpid()}\n")
        raise
    finally:
        with open(run / "restored.log", "a") as f:
            f.write(f"finally {os.getpid()}\n")
    return {}


def test_a_timed_out_step_runs_its_clean_up_then_is_retried_and_alerted(tmp_path):
    """The timeout's SIGTERM ended the step by its default action: no ``finally:`` or ``except
    BaseException:`` ran, so a roll-out cut short left its half-applied state served (the old router
    version or funnel config never put back) while the run was reported failed."""
    alerter = Alerter(alert_file=tmp_path / "alerts.jsonl")
    started = time.monotonic()
    with pytest.raises(RetrainingFailed, match="timed out"):
        run_pipeline(
            [Step("s", cleans_up_when_stopped, timeout_s=2.0, attempts=2)],
            tmp_path / "run",
            {},
            alerter,
            backoff_s=0.01,
        )
    assert time.monotonic() - started < 14  # it unwound at once, not at the SIGKILL 5 s after each timeout
    log = tmp_path / "run" / "restored.log"
    lines = log.read_text().splitlines() if log.exists() else []
    # Each attempt that got as far as the step ran its clean-up. On a loaded machine an attempt's process
    # can still be starting when its timeout comes: then the step never ran, and nothing needs undoing.
    by_attempt = {}
    for line in lines:
        what, pid = line.rsplit(" ", 1)
        by_attempt.setdefault(pid, []).append(what)
    unwound = ["entered", "except StepTerminated", "finally"]
    assert by_attempt and all(seen == unwound for seen in by_attempt.values()), lines
    alert = json.loads((tmp_path / "alerts.jsonl").read_text().splitlines()[-1])
    assert alert["step"] == "s" and alert["attempts"] == 2 and "timed out" in alert["error"]
    assert not (tmp_path / "run" / "s.json").exists()


def forks_then_cleans_up_when_stopped(context):
    """A step whose forked copy (``os.fork``, a ``fork`` multiprocessing worker) runs beside it."""
    import os

    if os.fork() == 0:  # the copy: it must not unwind through the step's clean-up too
        (Path(context["run_dir"]) / "fork.pid").write_text(str(os.getpid()))
    return cleans_up_when_stopped(context)


def test_a_steps_forked_copy_ends_on_the_timeout_without_running_the_steps_clean_up(tmp_path):
    """The handler that unwinds the step is inherited by what it forks: the copy, ended by SIGTERM's
    default action as before, must not run the step's clean-up a second time."""
    import os
    import signal

    run = tmp_path / "run"
    try:
        with pytest.raises(RetrainingFailed, match="timed out"):
            run_pipeline([Step("s", forks_then_cleans_up_when_stopped, timeout_s=3.0, attempts=1)], run, {}, Alerter())
        fork_pid = int((run / "fork.pid").read_text())
        deadline = time.monotonic() + 5
        while _running(fork_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(fork_pid)
        lines = (run / "restored.log").read_text().splitlines()
        pids = {line.split()[-1] for line in lines if not line.startswith("entered")}
        assert pids and str(fork_pid) not in pids, lines  # the step's own clean-up, once
    finally:
        if (run / "fork.pid").exists() and _running(pid := int((run / "fork.pid").read_text())):
            os.kill(pid, signal.SIGKILL)


def fails_differently(context):
    """Fails on every attempt, each time for another reason (state kept in a file across processes)."""
    counter = Path(context["run_dir"]) / "fails.count"
    n = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(n))
    raise OSError(f"reason {n}")


def test_every_failed_attempt_is_logged_with_its_number_and_reason(tmp_path, caplog):
    """Only the last attempt's error reached the alert and the exception; the runner logged nothing, so
    why the earlier attempts failed (an out-of-memory kill before a timeout) was lost."""
    caplog.set_level("WARNING", logger="online.retraining")
    with pytest.raises(RetrainingFailed, match="reason 2"):
        run_pipeline(
            [Step("s", fails_differently, timeout_s=60, attempts=2)], tmp_path / "run", {}, Alerter(), backoff_s=0.01
        )
    messages = [r.getMessage() for r in caplog.records if r.name == "online.retraining"]
    assert len(messages) == 2, messages
    assert "'s' attempt 1 of 2 failed" in messages[0] and "OSError: reason 1" in messages[0]
    assert "'s' attempt 2 of 2 failed" in messages[1] and "OSError: reason 2" in messages[1]
    assert "Traceback" in messages[0]  # the step's own traceback, from its process


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


def test_the_alert_webhook_timeout_bounds_a_hanging_name_lookup(monkeypatch, tmp_path):
    """urlopen's timeout bounds socket operations, not ``getaddrinfo``: a hanging DNS lookup held the
    alert (and the failing run) for as long as the lookup took. The delivery is bounded as a whole; a
    timeout is a failed delivery, and the alert file is written first."""
    import socket

    def hanging_lookup(*args, **kwargs):
        time.sleep(3)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", hanging_lookup)
    alerter = Alerter(webhook_url="http://alerts.invalid/hook", alert_file=tmp_path / "alerts.jsonl", timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(OSError, match="did not answer within 0.5 s"):
        alerter.send({"step": "s", "error": "disk full"})
    assert time.monotonic() - started < 2
    assert json.loads((tmp_path / "alerts.jsonl").read_text())["step"] == "s"


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
    assert first["export"]["checklist"] == "passed"  # the served scores of the exported version
    # Gate the same candidate against itself with a tolerance no model can meet: refused. The run
    # folder keeps ingest/workflow/train, so only evaluate and gate run again (idempotent steps).
    for step in ("evaluate", "gate", "export"):
        (tmp_path / "gen1" / f"{step}.json").unlink()
    strict = {**settings, "current_version": first["train"]["version"], "max_auc_drop": -1.0}
    with pytest.raises(RetrainingFailed, match="gate"):
        run_pipeline(default_steps(timeout_s=600, attempts=1), tmp_path / "gen1", strict, alerter)
    assert "AUC regressed" in alerter.sent[-1]["error"]
    assert not (tmp_path / "gen1" / "export.json").exists()  # a refused candidate is never exported
    # and the registry says so: a script run without --version does not take it as the latest
    version = first["train"]["version"]
    assert "AUC regressed" in registry.refusal(Path(settings["registry"]) / str(version))
    with pytest.raises(FileNotFoundError, match="was refused"):
        registry.latest(settings["registry"])
    assert registry.get(settings["registry"], version).version == version  # by its number it still opens


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


def starts_a_worker(context):
    """A step that starts a process of its own (a worker, a server) and then hangs."""
    import subprocess

    worker = subprocess.Popen(["sleep", "120"])
    (Path(context["run_dir"]) / "worker.pid").write_text(str(worker.pid))
    time.sleep(120)
    return {}


def _running(pid: int) -> bool:
    try:  # a zombie (state Z) has ended; only its parent's reaping is left
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_timeout_also_ends_the_processes_the_step_started(tmp_path):
    """Only the step's own process was terminated: what it started ran on beside the retry (two
    trainings writing one registry)."""
    import os
    import signal

    alerter = Alerter(alert_file=tmp_path / "alerts.jsonl")
    try:
        with pytest.raises(RetrainingFailed, match="timed out"):
            run_pipeline([Step("w", starts_a_worker, timeout_s=3, attempts=1)], tmp_path / "run", {}, alerter)
        pid = int((tmp_path / "run" / "worker.pid").read_text())
        deadline = time.monotonic() + 5
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(pid), "the step's worker outlived the step's timeout"
    finally:
        if (tmp_path / "run" / "worker.pid").exists() and _running(
            pid := int((tmp_path / "run" / "worker.pid").read_text())
        ):
            os.kill(pid, signal.SIGKILL)


def one(context):
    return {"v": 1}


@pytest.mark.parametrize("content", ["", '{"result": {"v"'])
def test_a_marker_cut_short_by_a_crash_reruns_its_step(tmp_path, content):
    """The marker is renamed into place after its data is synced; one left empty or half-written by an
    older run (or a crash the sync did not cover) re-runs the step instead of failing every run."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "s.json").write_text(content)
    out = run_pipeline([Step("s", one, timeout_s=60, attempts=1)], tmp_path / "run", {}, Alerter())
    assert out == {"s": {"v": 1}}
    assert json.loads((tmp_path / "run" / "s.json").read_text())["result"] == {"v": 1}


def _gate(monkeypatch, candidate, current=None, max_auc_drop=0.01):
    import evaluation.checklist
    from online.retraining import step_gate

    monkeypatch.setattr(evaluation.checklist, "run_checklist", lambda path: [])
    evaluate = {"candidate_metrics": candidate, **({"current_metrics": current} if current is not None else {})}
    return step_gate({"settings": {"max_auc_drop": max_auc_drop}, "evaluate": evaluate, "train": {"path": "x"}})


def test_the_gate_refuses_a_nan_auc_and_compares_the_same_head(monkeypatch):
    """Comparisons with NaN are False, so a NaN AUC (a head whose validation labels have one class)
    or a NaN tolerance passed; and the served version was read on its own first head, not the
    candidate's."""
    served = {"heavy_ranker": {"auc_click": 0.70, "auc_like": 0.60}, "light_ranker": {"auc": 0.6}}
    nan = float("nan")
    for candidate, current, tolerance in [
        ({"heavy_ranker": {"auc_click": nan}}, served, 0.01),
        ({"heavy_ranker": {"auc_click": nan}}, None, 0.01),  # a first run: nothing served yet
        ({"heavy_ranker": {"auc_click": 0.10}}, served, nan),
        ({"heavy_ranker": {"auc_click": 0.71}}, {"heavy_ranker": {"auc_click": nan}}, 0.01),
        # the served version's heads in another order (an older config): its click AUC is 0.70, not 0.60
        ({"heavy_ranker": {"auc_click": 0.65}}, {"heavy_ranker": {"auc_like": 0.60, "auc_click": 0.70}}, 0.01),
    ]:
        with pytest.raises((RuntimeError, ValueError), match="gate refused|NaN"):
            _gate(monkeypatch, candidate, current, tolerance)
    assert _gate(monkeypatch, {"heavy_ranker": {"auc_click": 0.695}}, served)["passed"]
    assert _gate(monkeypatch, {"heavy_ranker": {"auc_click": 0.5}})["passed"]  # a first run: the checklist only


def test_evaluate_compares_with_the_version_the_live_repository_serves(tmp_path):
    """Without ``current_version`` in the settings (the Airflow DAG never sets it) the gate had
    nothing to compare with and a regressed candidate went on to the A/B test."""
    from online.retraining import step_evaluate

    for version, auc in ((1, 0.7), (2, 0.5)):
        (tmp_path / "registry" / str(version)).mkdir(parents=True)
        manifest = {"version": version, "metrics": {"heavy_ranker": {"auc_click": auc}}}
        (tmp_path / "registry" / str(version) / "manifest.json").write_text(json.dumps(manifest))
    settings = {"registry": str(tmp_path / "registry"), "live_repo": str(tmp_path / "live")}
    train = {"version": 2, "metrics": {"heavy_ranker": {"auc_click": 0.5}}}
    first = step_evaluate({"settings": settings, "train": train})  # a first run: no live repository yet
    assert "current_metrics" not in first
    (tmp_path / "live").mkdir()
    (tmp_path / "live" / "export.json").write_text(json.dumps({"version": 1}))
    result = step_evaluate({"settings": settings, "train": train})
    assert result["current"] == 1 and result["current_metrics"] == {"heavy_ranker": {"auc_click": 0.7}}


def _load_dag(monkeypatch):
    """Run online/airflow_dag.py against a stand-in for Airflow (not installed here)."""
    import runpy
    import sys
    import types

    from online import retraining

    class Operator:
        def __init__(self, task_id, python_callable, op_kwargs):
            self.task_id = task_id

        def __rshift__(self, other):
            return other

    class DAG:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    airflow = types.ModuleType("airflow")
    airflow.DAG = DAG
    python = types.ModuleType("airflow.operators.python")
    python.PythonOperator = Operator
    exceptions = types.ModuleType("airflow.exceptions")
    exceptions.AirflowFailException = type("AirflowFailException", (Exception,), {})
    monkeypatch.setitem(sys.modules, "airflow.exceptions", exceptions)
    monkeypatch.setitem(sys.modules, "airflow", airflow)
    monkeypatch.setitem(sys.modules, "airflow.operators", types.ModuleType("airflow.operators"))
    monkeypatch.setitem(sys.modules, "airflow.operators.python", python)
    return runpy.run_path(str(Path(retraining.__file__).parent / "airflow_dag.py"))


def test_the_dag_loads_with_empty_variables_and_its_alerts_reach_a_file(monkeypatch, tmp_path):
    """``RETRAINING_MAX_AUC_DROP=`` (set, empty) made float("") fail at import, so Airflow dropped the
    DAG; and with no webhook or file configured the failure alert went nowhere."""
    from types import SimpleNamespace

    for name in ("RETRAINING_MAX_AUC_DROP", "RETRAINING_RAW_DIR", "RETRAINING_ALERT_WEBHOOK", "RETRAINING_ALERT_FILE"):
        monkeypatch.setenv(name, "")
    monkeypatch.chdir(tmp_path)
    dag = _load_dag(monkeypatch)
    assert dag["SETTINGS"]["max_auc_drop"] == 0.01 and dag["SETTINGS"]["raw_dir"] == "data/raw"
    dag["_alert"]({"task_instance": SimpleNamespace(task_id="train"), "exception": OSError("disk full\nTraceback")})
    alert = json.loads((tmp_path / "build" / "retraining" / "alerts.jsonl").read_text().splitlines()[-1])
    at = alert.pop("at")
    assert alert == {"pipeline": "retraining", "step": "train", "attempts": None, "error": "disk full", "run_dir": None}
    assert time.strptime(at, "%Y-%m-%dT%H:%M:%SZ")


def test_the_dags_failure_alert_has_the_runners_shape_and_attempt_count(monkeypatch, tmp_path):
    """The DAG's alert said pipeline, step and error only; the runner's says how many attempts were
    made, the run's folder and when. Airflow 2 (to 2.9) reports try_number one too high once the task
    has failed (prev_attempted_tries is the count), Airflow 3 only try_number (then exact)."""
    from types import SimpleNamespace

    monkeypatch.setenv("RETRAINING_ALERT_FILE", str(tmp_path / "alerts.jsonl"))
    monkeypatch.delenv("RETRAINING_ALERT_WEBHOOK", raising=False)
    dag = _load_dag(monkeypatch)
    airflow2 = SimpleNamespace(task_id="train", try_number=4, prev_attempted_tries=3)
    airflow3 = SimpleNamespace(task_id="gate", try_number=1)
    dag["_alert"]({"task_instance": airflow2, "ti": airflow2, "ds": "2026-05-01", "exception": OSError("disk full")})
    dag["_alert"]({"task_instance": airflow3, "ti": airflow3, "ds": "2026-05-01", "exception": TimeoutError()})
    alerts = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    runner = {"pipeline", "step", "attempts", "error", "run_dir", "at"}  # retraining._fail's keys
    assert [set(a) for a in alerts] == [runner, runner]
    assert [(a["step"], a["attempts"], a["error"]) for a in alerts] == [
        ("train", 3, "disk full"),
        ("gate", 1, "TimeoutError"),  # no message: its type, as the runner says
    ]
    assert alerts[0]["run_dir"] == "build/retraining/2026-05-01"


def test_the_dag_tries_each_task_as_often_and_as_long_as_the_runner(monkeypatch):
    """Airflow's ``retries`` counts the tries after the first: ``retries: 3`` ran each task 4 times where
    the runner's steps have 3 attempts."""
    from datetime import timedelta

    default_args = _load_dag(monkeypatch)["dag"].kwargs["default_args"]
    for step in default_steps():
        assert default_args["retries"] + 1 == step.attempts
        assert default_args["execution_timeout"] == timedelta(seconds=step.timeout_s)


def test_the_webhook_gets_the_alert_when_the_alert_file_cannot_be_written(tmp_path, monkeypatch):
    """A full disk is one of the failures the alert reports: the file's OSError skipped the webhook, so
    the alert went nowhere."""
    import urllib.request

    posted = []
    monkeypatch.setattr(
        urllib.request, "urlopen", lambda req, timeout: posted.append(json.loads(req.data)) or open(__file__)
    )
    (tmp_path / "not-a-folder").write_text("")
    alerter = Alerter(webhook_url="http://hook.invalid/", alert_file=tmp_path / "not-a-folder" / "alerts.jsonl")
    with pytest.raises(RetrainingFailed, match="disk full.*could not be delivered"):
        run_pipeline([Step("s", disk_full, timeout_s=60, attempts=1)], tmp_path / "run", {}, alerter)
    assert [a["step"] for a in posted] == ["s"] and "disk full" in posted[0]["error"]


def numpy_result(context):
    import numpy as np

    return {"rows": np.int64(3)}


def refuses(context):
    counter = Path(context["run_dir"]) / "refuses.count"
    counter.write_text(str(int(counter.read_text()) + 1 if counter.exists() else 1))
    raise StepRefused("gate refused the candidate: AUC regressed")


def test_a_result_that_is_not_json_is_alerted_not_crashed(tmp_path):
    """The step succeeded, then writing its marker raised ``TypeError`` out of the runner: the run
    crashed with no alert and left a half-made marker file."""
    alerter = Alerter(alert_file=tmp_path / "alerts.jsonl")
    with pytest.raises(RetrainingFailed, match="could not be recorded.*int64"):
        run_pipeline([Step("s", numpy_result, timeout_s=60, attempts=3)], tmp_path / "run", {}, alerter)
    alert = json.loads((tmp_path / "alerts.jsonl").read_text().splitlines()[-1])
    assert alert["step"] == "s" and alert["attempts"] == 1 and "could not be recorded" in alert["error"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # no marker, no half-written .tmp


def test_a_gate_refusal_is_alerted_at_once_not_retried(tmp_path):
    """A refusal is the same answer on every try: it was retried ``attempts`` times (a checklist run
    and a backoff each) before the alert."""
    alerter = Alerter(alert_file=tmp_path / "alerts.jsonl")
    with pytest.raises(RetrainingFailed, match="after 1 attempts: StepRefused: gate refused"):
        run_pipeline([Step("gate", refuses, timeout_s=60, attempts=3)], tmp_path / "run", {}, alerter, backoff_s=0.01)
    assert (tmp_path / "run" / "refuses.count").read_text() == "1"
    assert json.loads((tmp_path / "alerts.jsonl").read_text().splitlines()[-1])["attempts"] == 1
    assert not (tmp_path / "run" / "gate.json").exists()


def test_the_dag_fails_a_gate_refusal_without_retries(monkeypatch, tmp_path):
    """Airflow retries any exception but ``AirflowFailException``: a refused candidate took every retry."""
    from types import SimpleNamespace

    from online import retraining

    dag = _load_dag(monkeypatch)
    monkeypatch.setattr(retraining, "step_gate", lambda context: refuses({"run_dir": str(tmp_path)}))
    ti = SimpleNamespace(xcom_pull=lambda task_ids: {})
    with pytest.raises(Exception, match="gate refused") as raised:
        dag["_run"]("gate", ti=ti, ds="2026-01-01")
    assert type(raised.value).__name__ == "AirflowFailException"


def interrupts_the_runner(context):
    """Counts its tries, then the runner is interrupted (Ctrl-C) while the step runs."""
    import os
    import signal

    counter = Path(context["run_dir"]) / "interrupted.count"
    counter.write_text(str(int(counter.read_text()) + 1 if counter.exists() else 1))
    os.kill(os.getppid(), signal.SIGINT)
    time.sleep(30)
    return {}


def test_an_interrupted_run_stops_instead_of_retrying_the_step(tmp_path):
    """tenacity retried every exception but ``StepRefused``, ``KeyboardInterrupt`` too: Ctrl-C started the
    step (a training) again after the backoff, ``attempts`` times, and ended in a 'failed' alert."""
    alerter = Alerter(alert_file=tmp_path / "alerts.jsonl")
    steps = [Step("s", interrupts_the_runner, timeout_s=60, attempts=3)]
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(steps, tmp_path / "run", {}, alerter, backoff_s=0.01)
    assert (tmp_path / "run" / "interrupted.count").read_text() == "1"
    assert not alerter.sent


def new_version(context):
    """Like training: every run makes a new version."""
    counter = Path(context["run_dir"]) / "versions.count"
    n = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(n))
    return {"version": n}


def uses_version(context):
    return {"exported": context["train"]["version"]}


def test_a_step_that_runs_again_also_reruns_the_steps_that_used_its_result(tmp_path):
    """A step re-run (its marker unreadable) gave a new result, but later steps kept their markers from the
    old one: the run reported version 2 trained and version 1 exported, and version 2 was never exported."""
    steps = [Step("train", new_version, timeout_s=60, attempts=1), Step("export", uses_version, timeout_s=60)]
    first = run_pipeline(steps, tmp_path / "run", {}, Alerter())
    assert first == {"train": {"version": 1}, "export": {"exported": 1}}
    (tmp_path / "run" / "train.json").write_text("")  # cut short
    again = run_pipeline(steps, tmp_path / "run", {}, Alerter())
    assert again == {"train": {"version": 2}, "export": {"exported": 2}}
    assert run_pipeline(steps, tmp_path / "run", {}, Alerter()) == again  # and then nothing reruns


def test_the_holdout_is_the_same_users_for_every_candidate(monkeypatch, tmp_path):
    """Each candidate's experiment had the salt ``<salt>-v<candidate>`` for the holdout too, so every
    retraining reshuffled which 2% of users were held out: users flipped in and out of the yardstick
    (docs/monitoring.md). The holdout is now drawn by the config's salt; the arms still reshuffle."""
    import deployment.rollout
    import online.experiments
    from online.retraining import step_experiment
    from serving.assignment import HOLDOUT, Rollout

    started = []
    monkeypatch.setattr(deployment.rollout, "current_rollout", lambda repo: None)
    monkeypatch.setattr(
        online.experiments, "start_experiment", lambda url, repo, rollout, **kw: started.append(rollout)
    )
    for current, candidate in ((1, 2), (2, 3)):
        settings = {"grpc_url": "localhost:1", "current_version": current}
        step_experiment({"settings": settings, "export": {"repo": str(tmp_path), "version": candidate, "live": True}})
    first, second = started
    users = range(20_000)
    held = [{u for u in users if r.version_for(u)[0] == HOLDOUT} for r in started]
    assert len(held[0]) > 200 and held[0] == held[1]  # old code: two different sets
    treated = [{u for u in users if r.version_for(u)[0] == "treatment"} for r in started]
    assert 0.4 < len(treated[0] & treated[1]) / len(treated[0]) < 0.6  # the arms are reshuffled
    assert first.experiment.salt != second.experiment.salt
    assert Rollout.from_dict(json.loads(json.dumps(second.to_dict()))).to_dict() == second.to_dict()


def test_the_holdout_stays_on_its_model_from_one_candidate_to_the_next(monkeypatch, tmp_path):
    """Each candidate's experiment put the holdout on the served version: once v2 was shipped over v1, the
    experiment of candidate v3 moved the holdout to v2, so the yardstick of docs/monitoring.md followed
    the served model a generation behind and could not show a drift across generations. It now stays on
    the model it is served by while the holdout is the same users."""
    import deployment.rollout
    import online.experiments
    from online.retraining import step_experiment
    from serving.assignment import HOLDOUT, single_version

    routers = [None]  # what the router serves: nothing yet, then each experiment started
    monkeypatch.setattr(deployment.rollout, "current_rollout", lambda repo: routers[-1])
    monkeypatch.setattr(
        online.experiments, "start_experiment", lambda url, repo, rollout, **kw: routers.append(rollout)
    )

    def experiment(current, candidate):
        settings = {"grpc_url": "localhost:1", "current_version": current}
        export = {"repo": str(tmp_path), "version": candidate, "live": True}
        return step_experiment({"settings": settings, "export": export})

    experiment(1, 2)
    assert routers[-1].control_version == 1
    routers.append(routers[-1].roll_out("treatment"))  # v2 wins and is shipped; the holdout stays on v1
    experiment(2, 3)
    third = routers[-1]
    assert third.versions == {"control": 2, "treatment": 3}
    assert third.control_version == 1  # old code: 2, the holdout moved to the new control
    held = next(u for u in range(10_000) if third.version_for(u)[0] == HOLDOUT)
    assert third.version_for(held) == (HOLDOUT, 1)
    assert experiment(2, 3)["router_version"] is None and routers[-1] is third  # a re-run starts nothing
    # a holdout ended (every user on one version) is drawn anew on the served model
    routers.append(single_version(3))
    experiment(3, 4)
    assert routers[-1].control_version == 3


def test_the_export_refuses_a_candidate_whose_served_scores_fail_the_checklist(monkeypatch, tmp_path):
    """The gate's checklist runs before the export, without a repository, so the served lists' scores
    (``scores_in_unit_range``) were never checked in a retraining run and a candidate serving scores
    outside [0, 1] went on to the A/B test. The export step now runs the checklist on what it exported."""
    import types

    import deployment.export
    import evaluation.checklist
    from evaluation.checklist import CheckResult
    from models import registry
    from online import retraining

    seen = []

    def checklist(model_dir, repo=None):
        seen.append((model_dir, repo))
        return [CheckResult("versions_consistent", True, ""), CheckResult("scores_in_unit_range", False, "users [7]")]

    refused = []
    monkeypatch.setattr(registry, "get", lambda path, version: types.SimpleNamespace(version=version))
    monkeypatch.setattr(registry, "refuse", lambda path, version, reason: refused.append((path, version, reason)))
    monkeypatch.setattr(deployment.export, "export_repository", lambda model, out, replace=False: out)
    monkeypatch.setattr(evaluation.checklist, "run_checklist", checklist)
    context = {
        "settings": {"registry": "r", "export_dir": str(tmp_path)},
        "train": {"version": 3, "path": "trained"},
    }
    with pytest.raises(retraining.StepRefused, match=r"checklist of version 3 .* scores_in_unit_range: users \[7\]"):
        retraining.step_export(context)
    assert seen == [("trained", tmp_path / "v3")]
    assert [(path, version) for path, version, _ in refused] == [("r", 3)]  # latest passes it over


def records_its_pid_and_hangs(context):
    (Path(context["run_dir"]) / "step.pid.tmp").write_text(str(__import__("os").getpid()))
    (Path(context["run_dir"]) / "step.pid.tmp").rename(Path(context["run_dir"]) / "step.pid")
    time.sleep(60)
    return {}


def test_a_step_ends_when_its_runner_is_killed(tmp_path):
    """The step runs in its own process group, so nothing that ended the runner reached it (a SIGKILL, an
    out-of-memory kill, ``timeout``'s signal to the runner's group): the step trained on, orphaned, beside
    the resumed run's retry of it."""
    import os
    import signal
    import subprocess
    import sys

    run = tmp_path / "run"
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from test_retraining import records_its_pid_and_hangs as f;"
        "from online.retraining import Alerter, Step, run_pipeline;"
        "run_pipeline([Step('s', f, timeout_s=120, attempts=1)], sys.argv[2], {}, Alerter())"
    )
    runner = subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).parent), str(run)])
    pid = None
    try:
        deadline = time.monotonic() + 60
        while not (run / "step.pid").exists() and time.monotonic() < deadline and runner.poll() is None:
            time.sleep(0.1)
        pid = int((run / "step.pid").read_text())
        runner.kill()
        runner.wait()
        deadline = time.monotonic() + 10
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(pid), "the step ran on after its runner was killed"
    finally:
        runner.kill()
        if pid is not None and _running(pid):
            os.kill(pid, signal.SIGKILL)


def waits_for_release(context):
    run = Path(context["run_dir"])
    counter = run / "runs.count"
    counter.write_text(str(int(counter.read_text()) + 1 if counter.exists() else 1))
    deadline = time.monotonic() + 30
    while not (run / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return {"released": (run / "release").exists()}


def test_a_second_runner_of_the_same_run_is_refused(tmp_path):
    """Nothing kept two runners out of one run folder (a manual re-run beside the scheduled one): both ran
    every step, two trainings, one processed folder written twice at once, two experiments."""
    import threading

    run = tmp_path / "run"
    steps = [Step("s", waits_for_release, timeout_s=60, attempts=1)]
    first: dict = {}
    runner = threading.Thread(target=lambda: first.update(run_pipeline(steps, run, {}, Alerter())))
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while not (run / "runs.count").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        alerter = Alerter()
        with pytest.raises(RuntimeError, match="another runner is running"):
            run_pipeline([Step("s", waits_for_release, timeout_s=2, attempts=1)], run, {}, alerter)
        assert (run / "runs.count").read_text() == "1" and not alerter.sent
    finally:
        (run / "release").write_text("")
        runner.join(60)
    assert first == {"s": {"released": True}}
    assert run_pipeline(steps, run, {}, Alerter()) == first  # the lock went with the first runner


def returns_but_its_process_lingers(context):
    """Returns its result, but a non-daemon thread (holding a lock on a file) keeps its process alive."""
    import fcntl
    import os
    import threading

    run = Path(context["run_dir"])

    def hold():
        fd = os.open(run / "shared.lock", os.O_CREAT | os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        time.sleep(60)

    threading.Thread(target=hold).start()
    while not (run / "shared.lock").exists():
        time.sleep(0.01)
    (run / "step.pid").write_text(str(os.getpid()))
    return {"ok": 1}


def test_a_finished_steps_process_that_does_not_exit_is_stopped(tmp_path):
    """The runner took the result, waited 5 s for the step's process to exit and went on without it: the
    process ran on beside the next steps, holding its files and locks, until the runner exited."""
    import fcntl
    import os
    import signal

    run = tmp_path / "run"
    try:
        out = run_pipeline([Step("s", returns_but_its_process_lingers, timeout_s=60, attempts=1)], run, {}, Alerter())
        assert out == {"s": {"ok": 1}}
        pid = int((run / "step.pid").read_text())
        assert not _running(pid), "the finished step's process ran on"
        fd = os.open(run / "shared.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # its lock went with it
        finally:
            os.close(fd)
    finally:
        if (run / "step.pid").exists() and _running(pid := int((run / "step.pid").read_text())):
            os.kill(pid, signal.SIGKILL)
