"""The retraining pipeline: new logs -> workflow -> train -> evaluate -> gate -> export -> A/B test.

Retraining breaks for reasons that are not bugs (a full disk, a flaky store, a run that hangs), so
every step is

* idempotent: its result is written to ``<run_dir>/<step>.json`` and a re-run skips finished steps
  (not one whose earlier steps' results changed since it ran);
* retried with exponential backoff (``tenacity``) on failure, except a deliberate refusal
  (``StepRefused``: the gate saying no), which the same inputs would only repeat; every failed
  attempt is logged (a warning: step, attempt number, the error with the step's traceback);
* bounded by a timeout: the step runs in a child process that is terminated when it overruns
  (SIGTERM, which raises ``StepTerminated`` in the step so that its clean-up runs, then SIGKILL after
  5 s), that ends itself when the runner is gone, and that is stopped when it does not exit after its
  result;
* alerting: a step that still fails appends an alert to a local file and sends it to a webhook URL
  (JSON POST, bounded as a whole by ``Alerter.timeout_s``, name lookup included), and the run stops
  with ``RetrainingFailed``.

One runner a run folder at a time (an flock on it): a second is refused with ``RunInProgress``.

``default_steps`` wires the project's own stages; ``online/airflow_dag.py`` declares the same steps as
an Airflow DAG for production schedulers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty
from typing import NoReturn

from tenacity import RetryError, Retrying, retry_if_exception, stop_after_attempt, wait_exponential

log = logging.getLogger(__name__)

StepFn = Callable[[dict], dict]  # context (results of earlier steps + settings) -> this step's result


class RetrainingFailed(RuntimeError):
    pass


class StepTimeout(RuntimeError):
    pass


class StepTerminated(BaseException):
    """Raised in a step's process by the SIGTERM that stops it (a timeout, an interrupted runner): the
    step unwinds, its ``finally:`` and ``except BaseException:`` blocks run (a roll-out puts the served
    version back), where SIGTERM's default action ended it on the spot, its clean-up never run. Not an
    ``Exception``, so a step's ``except Exception:`` does not swallow it."""


class RunInProgress(RuntimeError):
    """Another runner holds the run folder: two runners of one run trained twice, wrote one processed
    folder at once and could each start an experiment."""


class StepRefused(RuntimeError):
    """A step's deliberate no (the gate refusing a candidate): the same inputs give the same answer,
    so it is alerted at once instead of retried."""


@dataclass
class Step:
    name: str
    fn: StepFn
    timeout_s: float = 600.0
    attempts: int = 3


@dataclass
class Alerter:
    """Where failures go: a local JSON-lines file and a webhook (JSON POST, at most ``timeout_s``), each
    where set."""

    webhook_url: str | None = None
    alert_file: Path | str | None = None  # a str too: the Airflow DAG passes an environment variable
    sent: list[dict] = field(default_factory=list)
    # The whole webhook delivery, name lookup included: urlopen's timeout bounds each socket operation,
    # not getaddrinfo, so a hanging DNS lookup held the failing run past it (14 s with a 14 s lookup).
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        self.alert_file = Path(self.alert_file) if self.alert_file else None

    def send(self, alert: dict) -> None:
        """The file first (local, the one that cannot be down), then the webhook; either that fails
        raises ``OSError`` after the other has been tried."""
        self.sent.append(alert)
        errors: list[OSError] = []
        if self.alert_file:
            try:
                self.alert_file.parent.mkdir(parents=True, exist_ok=True)
                with open(self.alert_file, "a") as f:
                    f.write(json.dumps(alert) + "\n")
            except OSError as err:  # a full disk is one of the failures to report: the webhook still gets it
                errors.append(err)
        if self.webhook_url:
            err = self._post(alert)
            if err is not None:
                errors.append(err)
        if errors:
            raise OSError("; ".join(f"{type(e).__name__}: {e}" for e in errors)) from errors[0]

    def _post(self, alert: dict) -> OSError | None:
        """POST ``alert`` to the webhook in a daemon thread and wait at most ``timeout_s``: the failure
        (``TimeoutError`` where it did not finish in time), or None. A thread still stuck in the lookup
        is left behind; being a daemon it does not keep the process alive."""
        req = urllib.request.Request(
            self.webhook_url, data=json.dumps(alert).encode(), headers={"Content-Type": "application/json"}
        )
        outcome: list[BaseException | None] = []

        def deliver() -> None:
            try:
                urllib.request.urlopen(req, timeout=self.timeout_s).close()
            except BaseException as err:  # handed to the caller, not lost in the thread
                outcome.append(err)
            else:
                outcome.append(None)

        thread = threading.Thread(target=deliver, name="alert-webhook", daemon=True)
        thread.start()
        thread.join(self.timeout_s)
        if not outcome:
            return TimeoutError(f"the webhook did not answer within {self.timeout_s:g} s")
        err = outcome[0]
        if err is not None and not isinstance(err, OSError):
            raise err  # as before: not a delivery failure (a malformed URL), the caller's to see
        return err


def _child(fn: StepFn, context: dict, queue, runner_pid: int) -> None:
    if hasattr(os, "setpgrp"):
        # Its own process group, so that a timeout also ends what the step started (a subprocess, a
        # worker): an orphan left training would write the registry beside the retry.
        os.setpgrp()
        # Out of the runner's group, nothing that ends the runner reaches the step (a SIGKILL, an
        # out-of-memory kill, ``timeout``'s or a supervisor's signal to the runner's group): it trained
        # on, orphaned, beside the resumed run's retry of the same step.
        threading.Thread(target=_end_with_runner, args=(runner_pid,), daemon=True).start()
    step_pid = os.getpid()
    try:
        # Only while the step runs: a process that lingers after its result is ended by SIGTERM as before.
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: _terminated(step_pid))
        try:
            result = fn(context)
        finally:
            signal.signal(signal.SIGTERM, previous)
        queue.put(("ok", result))
    except StepTerminated:  # stopped by the runner, which reads no result any more
        raise SystemExit(128 + signal.SIGTERM) from None
    except BaseException as err:  # report every failure to the parent, which decides on retries
        status = "refused" if isinstance(err, StepRefused) else "error"
        queue.put((status, f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=5)}"))


def _terminated(step_pid: int) -> None:
    """The step's SIGTERM handler: unwind the step (``StepTerminated``) so that its clean-up runs; the
    SIGKILL that follows after a grace still ends a step stuck in C code. A process the step forked
    inherits the handler: it gets SIGTERM's default action, as before."""
    if os.getpid() != step_pid:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise StepTerminated("stopped by the retraining runner (SIGTERM)")


def _end_with_runner(runner_pid: int, poll_s: float = 0.5) -> None:
    """In the step's process: once the runner is gone (it is no longer this process's parent), end the
    step's process group, this process included."""
    while os.getppid() == runner_pid:
        time.sleep(poll_s)
    os.killpg(0, signal.SIGKILL)


def _stop(proc) -> None:
    """End the step's process and what it started: SIGTERM to its process group (the step unwinds
    with ``StepTerminated``, running its clean-up), then SIGKILL after 5 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        _signal_group(proc, sig)
        proc.join(5)


def _signal_group(proc, sig: int) -> None:
    try:
        if hasattr(os, "killpg"):
            try:
                leads = os.getpgid(proc.pid) == proc.pid
            except ProcessLookupError:  # it exited; its group lives on while a grandchild is in it
                leads = True
            if leads:
                os.killpg(proc.pid, sig)
                return
        if proc.exitcode is None:  # not yet in its own group: it has started nothing either
            os.kill(proc.pid, sig)
    except (ProcessLookupError, PermissionError):  # nothing left to stop
        pass


def run_with_timeout(fn: StepFn, context: dict, timeout_s: float) -> dict:
    """Run ``fn(context)`` in a child process; terminate it (and the processes it started) and raise
    ``StepTimeout`` on overrun."""
    ctx = mp.get_context("spawn")  # a fresh interpreter: forking a process with TF threads can hang
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, context, queue, os.getpid()), daemon=True)
    proc.start()
    try:
        status, payload = _wait(proc, queue, timeout_s)
    except BaseException:  # a timeout, or the runner interrupted: nothing of the step may run on
        _stop(proc)
        raise
    proc.join(5)
    if proc.is_alive():
        # The result is in, but the step's process does not exit (a non-daemon thread, an interpreter
        # teardown that hangs): left alone it held its files, locks and memory beside the next steps
        # until the runner exited.
        log.warning("the step's process did not exit within 5 s of its result: stopping it")
        _stop(proc)
    if status in ("error", "refused"):
        _stop(proc)  # a failed step's leftovers must not race its retry
        raise (StepRefused if status == "refused" else RuntimeError)(payload)
    return payload


def _wait(proc, queue, timeout_s: float) -> tuple[str, object]:
    # Read the result before joining: a child that put more than a pipe's buffer (64 KiB) on the
    # queue cannot exit until it is read, so joining first would wait out the timeout.
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            status, payload = queue.get(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
            break
        except Empty:
            pass
        if not proc.is_alive():  # what it put is flushed before it exits
            try:
                status, payload = queue.get(timeout=1.0)
                break
            except Empty:
                raise RuntimeError(f"step process exited with code {proc.exitcode} without a result") from None
        if time.monotonic() >= deadline:
            raise StepTimeout(f"timed out after {timeout_s:.0f}s")
    return status, payload


def run_pipeline(
    steps: list[Step], run_dir: str | Path, settings: dict, alerter: Alerter, backoff_s: float = 1.0
) -> dict:
    """Run ``steps`` in order; return every step's result. Finished steps are not run again, unless an
    earlier step's result has changed since they ran."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with _run_lock(run_dir):
        return _run_steps(steps, run_dir, settings, alerter, backoff_s)


@contextmanager
def _run_lock(run_dir: Path):
    """One runner a run folder at a time: an flock on the folder, held for the run (the kernel releases
    it when the runner dies, so a crashed run leaves nothing to clear). A second runner is refused at
    once with ``RunInProgress``, without an alert: the run in progress alerts for itself."""
    from models.registry import lock_folder

    try:
        fd = lock_folder(run_dir)
    except OSError as err:  # no flock on this file system
        log.warning("no lock on %s (%s): a second runner of this run is not refused", run_dir, err)
        fd = None
    else:
        if fd is None:
            raise RunInProgress(f"another runner is running {run_dir}")
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _run_steps(steps: list[Step], run_dir: Path, settings: dict, alerter: Alerter, backoff_s: float) -> dict:
    context = {"settings": settings, "run_dir": str(run_dir)}
    for i, step in enumerate(steps):
        marker = run_dir / f"{step.name}.json"
        # What the step read of the earlier steps: one of them run again with a new result (a new
        # version trained) makes this step's marker stale. Settings are not part of it (a re-run may
        # change them without redoing finished steps). An older marker without it is taken as it is.
        inputs = hashlib.sha256(json.dumps([context[s.name] for s in steps[:i]], sort_keys=True).encode()).hexdigest()
        done = _read_marker(marker)
        if done is not None and done.get("inputs", inputs) == inputs:
            context[step.name] = done["result"]
            continue
        started = time.time()
        attempts = []
        try:
            for attempt in Retrying(
                stop=stop_after_attempt(step.attempts),
                wait=wait_exponential(multiplier=backoff_s, max=60),
                # Not a refusal, and not an interrupted runner (Ctrl-C, SystemExit): those end the run.
                retry=retry_if_exception(lambda e: isinstance(e, Exception) and not isinstance(e, StepRefused)),
                reraise=False,
            ):
                with attempt:
                    attempts.append(time.time())
                    try:
                        result = run_with_timeout(step.fn, context, step.timeout_s)
                    except Exception as err:  # each attempt's failure, not only the last one's in the alert
                        log.warning(
                            "retraining step %r attempt %d of %d %s: %s",
                            step.name,
                            len(attempts),
                            step.attempts,
                            "refused" if isinstance(err, StepRefused) else "failed",
                            err,
                        )
                        raise
        except RetryError as err:
            _fail(step.name, len(attempts), err.last_attempt.exception(), run_dir, alerter)
        except StepRefused as err:
            _fail(step.name, len(attempts), err, run_dir, alerter)
        try:
            seconds = time.time() - started
            _write_marker(marker, {"result": result, "attempts": len(attempts), "seconds": seconds, "inputs": inputs})
        except (TypeError, ValueError, OSError) as err:
            # The step finished, but a result that is not JSON (an ``np.int64``) or a full disk leaves
            # no marker: the run is stopped and alerted like a failed step, not crashed silently.
            _fail(step.name, len(attempts), RuntimeError(f"its result could not be recorded: {err}"), run_dir, alerter)
        context[step.name] = result
    return {s.name: context[s.name] for s in steps}


def _fail(step: str, attempts: int, last: BaseException, run_dir: Path, alerter: Alerter) -> NoReturn:
    """Alert that ``step`` failed, then stop the run with ``RetrainingFailed``."""
    alert = {
        "pipeline": "retraining",
        "step": step,
        "attempts": attempts,
        "error": str(last).splitlines()[0] if str(last) else type(last).__name__,
        "run_dir": str(run_dir),
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    undelivered = ""
    try:
        alerter.send(alert)
    except Exception as err:  # the step's failure is the news; a down webhook must not replace it
        undelivered = f" (the alert could not be delivered: {type(err).__name__}: {err})"
    raise RetrainingFailed(f"step {step!r} failed after {attempts} attempts: {alert['error']}{undelivered}") from last


def _read_marker(marker: Path) -> dict | None:
    """A finished step's marker, or None: a marker that cannot be read (cut short by a crash that came
    before its data reached the disk) means the step is run again, not that every later run fails."""
    try:
        done = json.loads(marker.read_text())
    except (OSError, ValueError):  # absent, or unreadable
        return None
    return done if isinstance(done, dict) and "result" in done else None


def _write_marker(marker: Path, content: dict) -> None:
    data = json.dumps(content)  # before the file is opened: a result that is not JSON leaves nothing
    tmp = marker.with_name(marker.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # the data on disk before the rename makes the marker visible
    tmp.rename(marker)  # the marker appears only once the result is whole
    try:
        fd = os.open(marker.parent, os.O_RDONLY)
    except OSError:  # a platform that cannot open folders
        return
    try:
        os.fsync(fd)  # and the rename itself survives a crash
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the project's steps


def step_ingest(context: dict) -> dict:
    """New logs: the raw tables of this generation (settings['raw_dir'] holds events/users/items)."""
    raw = Path(context["settings"]["raw_dir"])
    paths = {name: str(raw / f"{name}.parquet") for name in ("events", "users", "items")}
    missing = [p for p in paths.values() if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"missing raw tables: {missing}")
    return paths


def step_workflow(context: dict) -> dict:
    from configs import load_config
    from workflows.pipeline import run_dataset_pipeline

    s, raw = context["settings"], context["ingest"]
    config = load_config(s.get("config"), s.get("overrides"))
    out = Path(context["run_dir"]) / "processed"
    processed = run_dataset_pipeline(raw["events"], raw["users"], raw["items"], out, config.workflow)
    return {"processed": str(processed.root), "summary": processed.summary}


def step_train(context: dict) -> dict:
    from configs import load_config
    from models.train import train_all
    from workflows.pipeline import ProcessedData

    s = context["settings"]
    config = load_config(s.get("config"), s.get("overrides"))
    model = train_all(ProcessedData(Path(context["workflow"]["processed"])), config, s["registry"], verbose=0)
    return {"version": model.version, "path": str(model.path), "metrics": model.manifest["metrics"]}


def step_evaluate(context: dict) -> dict:
    """Candidate vs the currently served version: each one's validation metrics, measured on its own
    validation part (docs/online-loop.md: a coarse check; the A/B test decides)."""
    from models import registry

    s, new = context["settings"], context["train"]
    current = s.get("current_version")
    if current is None and s.get("live_repo") and (Path(s["live_repo"]) / "export.json").exists():
        from deployment.rollout import served_version

        # What the live repository serves, as the experiment step reads it: without it the gate
        # compared nothing and a regressed candidate went to the A/B test. A first run has none.
        current = served_version(s["live_repo"])
    result = {"candidate": new["version"], "candidate_metrics": new["metrics"]}
    if current is not None:
        result["current"] = current
        result["current_metrics"] = registry.get(s["registry"], current).manifest["metrics"]
    return result


def _headline(metrics: dict) -> tuple[str, str]:
    """The gate's offline metric: the heavy ranker's validation AUC of its first head, as
    ``(stage, key)`` so the served version is read on the same head."""
    for stage in ("heavy_ranker", "light_ranker"):
        stage_metrics = metrics.get(stage, {})
        for key in stage_metrics:  # the heavy ranker's first head ("auc_click") first
            if key == "auc" or key.startswith("auc_"):
                return stage, key
    raise KeyError(f"no ranker AUC in metrics {sorted(metrics)}")


def step_gate(context: dict) -> dict:
    """No offline regression beyond the tolerance, and the correctness checklist passes."""
    from evaluation.checklist import run_checklist

    s, ev = context["settings"], context["evaluate"]
    tolerance = float(s.get("max_auc_drop", 0.01))
    if math.isnan(tolerance):  # every comparison with NaN is False: it would pass any candidate
        raise ValueError("max_auc_drop is NaN")
    checks = run_checklist(context["train"]["path"])
    failed = [c.name for c in checks if not c.passed]
    stage, key = _headline(ev["candidate_metrics"])
    new_auc = float(ev["candidate_metrics"][stage][key])
    reasons = [f"checklist failed: {failed}"] if failed else []
    # NaN (a head whose validation labels have one class, models.ranker.head_aucs) is no evidence.
    if not math.isfinite(new_auc):
        reasons.append(f"the candidate's {stage} {key} is {new_auc}")
    elif "current_metrics" in ev:
        old = ev["current_metrics"].get(stage, {}).get(key)
        old_auc = float("nan") if old is None else float(old)
        if not math.isfinite(old_auc):
            reasons.append(f"the served version has no {stage} {key} to compare with ({old})")
        elif not new_auc >= old_auc - tolerance:
            reasons.append(f"AUC regressed ({stage} {key}) {old_auc:.4f} -> {new_auc:.4f} (tolerance {tolerance})")
    if reasons:
        _refuse(context, "gate refused the candidate: " + "; ".join(reasons))
    return {"passed": True, "auc": new_auc, "metric": f"{stage}.{key}"}


def _refuse(context: dict, message: str) -> None:
    """Raise ``StepRefused``, the refusal recorded in the registry first (``registry.refuse``): a
    script run without ``--version`` would otherwise export or roll out this candidate as the latest."""
    from models import registry

    if context["settings"].get("registry") is not None:
        registry.refuse(context["settings"]["registry"], context["train"]["version"], message)
    raise StepRefused(message)


def step_export(context: dict) -> dict:
    """Export the candidate: into the live repository as a new version beside the served one when
    ``settings['live_repo']`` is set (``deployment.rollout.add_version``), else as its own repository.
    Then the checklist again, on the exported version: its served lists (known users and an unknown
    one) must hold scores in [0, 1], in order, the rankers' own scores in [0, 1] too, and the exported
    index file must be the one the registry's ``item_index.json`` records. The gate's checklist ran
    before the export and could not see them. A failure refuses the candidate (``StepRefused``): no
    experiment starts, and the version stays in the repository, unserved."""
    from deployment.export import export_repository
    from deployment.rollout import add_version
    from evaluation.checklist import run_checklist
    from models import registry
    from serving.interface import ensemble_name

    s = context["settings"]
    model = registry.get(s["registry"], context["train"]["version"])
    if s.get("live_repo"):
        repo = Path(s["live_repo"])
        if not (repo / ensemble_name(model.version)).exists():  # a re-run finds it already added
            add_version(model, repo)
        live = True
    else:
        repo = export_repository(model, Path(s["export_dir"]) / f"v{model.version}", replace=True)
        live = False
    failed = [f"{c.name}: {c.detail}" for c in run_checklist(context["train"]["path"], repo) if not c.passed]
    if failed:
        _refuse(
            context,
            f"export refused the candidate: the checklist of version {model.version} as exported to {repo} failed: "
            + "; ".join(failed),
        )
    registry.clear_refusal(s["registry"], model.version)  # an earlier run's refusal no longer holds
    return {"repo": str(repo), "version": model.version, "live": live, "checklist": "passed"}


def step_experiment(context: dict) -> dict:
    """A/B test the candidate against the served version on the live server (``settings['grpc_url']``;
    ``settings['tls_ca']``, the PEM file that signed its certificate, where its gRPC speaks TLS):
    the router sends the treatment share to the candidate. The holdout is the same users from one
    candidate to the next and stays on the model it is served by (the running experiment's holdout
    version), so it remains one fixed yardstick across generations; a first experiment (or one after
    the holdout was ended or drawn anew) holds it out on the current model.
    Without a server (or a current version) the candidate waits in the repository."""
    from configs import load_config
    from deployment.rollout import current_rollout, served_version
    from online.experiments import start_experiment
    from serving.assignment import Rollout, ab_rollout

    s, export = context["settings"], context["export"]
    if not (s.get("grpc_url") and export.get("live")):
        return {"started": False, "reason": "no live server: the candidate waits in the repository"}
    current = s.get("current_version")
    current = int(current) if current is not None else served_version(export["repo"])
    exp = load_config(s.get("config"), s.get("overrides")).online.experiment
    candidate = int(export["version"])
    if current == candidate:
        return {"started": False, "reason": f"version {candidate} is already the served one"}
    # Each candidate's own salt reshuffles the arms; the holdout is drawn by the config's salt, so it
    # stays the same users from one candidate to the next (the yardstick of docs/monitoring.md).
    rollout = ab_rollout(
        f"{exp.name}-v{candidate}",
        f"{exp.salt}-v{candidate}",
        current,
        candidate,
        exp.holdout,
        exp.treatment_share,
        holdout_salt=exp.salt,
    )
    running = current_rollout(export["repo"])
    if running is not None and running.experiment.holds_out_the_same_users(rollout.experiment):
        # It stays on its model: moving it to each new control (v2 once v2 was shipped) made the yardstick
        # a generation behind at most, blind to a drift across generations.
        rollout = Rollout(rollout.experiment, rollout.versions, running.control_version)
    if running is not None and running.to_dict() == rollout.to_dict():  # a re-run: already started
        return {"started": True, "experiment": rollout.to_dict(), "router_version": None}
    router_version = start_experiment(s["grpc_url"], export["repo"], rollout, root_certificates=s.get("tls_ca") or None)
    return {"started": True, "experiment": rollout.to_dict(), "router_version": router_version}


def default_steps(timeout_s: float = 1800.0, attempts: int = 3) -> list[Step]:
    fns = [
        ("ingest", step_ingest),
        ("workflow", step_workflow),
        ("train", step_train),
        ("evaluate", step_evaluate),
        ("gate", step_gate),
        ("export", step_export),
        ("experiment", step_experiment),
    ]
    return [Step(name, fn, timeout_s=timeout_s, attempts=attempts) for name, fn in fns]
