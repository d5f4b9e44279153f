"""The thin scripts a user runs by hand, run as a user would (a subprocess, real arguments), where
no other test or notebook runs them: their glue (arguments, printing) is code too - ``make demo``
once crashed in a print line that no test ran (``tests/test_demo.py``)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
# serve.py refuses a port another process listens on before anything else: tests of other refusals
# ask for free ports, so a server on the defaults (a make demo running) cannot answer for them.
ANY_PORTS = ("--grpc-port", "0", "--http-port", "0", "--metrics-port", "0")


def script(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check:
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return run


def test_generate_data_writes_the_world_it_is_asked_for(tmp_path):
    run = script("scripts/generate_data.py", "--out", str(tmp_path), "--num-users", "60", "--num-items", "40")
    assert "60 users" in run.stdout
    assert pd.read_parquet(tmp_path / "users.parquet")["user_id"].nunique() == 60
    # 40 items plus the planted defects' extra ids (the same item under a second id)
    assert 40 <= pd.read_parquet(tmp_path / "items.parquet")["item_id"].nunique() <= 45
    assert {"events.parquet", "items.parquet", "dataset.yaml"} <= {p.name for p in tmp_path.iterdir()}


@pytest.mark.slow
def test_export_triton_exports_a_registry_version(model_version, tmp_path):
    out = tmp_path / "triton_repo"
    registry = model_version.path.parent
    run = script(
        "scripts/export_triton.py",
        "--registry",
        str(registry),
        "--version",
        str(model_version.version),
        "--out",
        str(out),
    )
    assert f"exported version {model_version.version}" in run.stdout
    assert json.loads((out / "export.json").read_text())["version"] == int(model_version.version)
    assert (out / "funnel" / "config.pbtxt").exists()
    # An existing repository is never overwritten unless asked (--replace)
    again = script("scripts/export_triton.py", "--registry", str(registry), "--out", str(out), check=False)
    assert again.returncode != 0 and "exists" in (again.stdout + again.stderr)
    assert (out / "heavy_ranker" / str(model_version.version)).is_dir()  # the default: seven stage models
    # The same version re-exported fused, without retraining: one model behind the same ensembles.
    args = ["--registry", str(registry), "--out", str(out), "--replace", "--fuse-stages"]
    fused = script("scripts/export_triton.py", *args)
    assert "fused (one model)" in fused.stdout
    assert (out / "fused_funnel" / str(model_version.version) / "heavy_ranker").is_dir()
    assert not (out / "heavy_ranker").exists()


@pytest.mark.slow
def test_evaluate_takes_a_dataset_spec_and_scores_its_own_split_files(tmp_path):
    """``scripts/evaluate.py --spec``: your own log (the shop example: view / add_to_cart / purchase,
    customer segments and regions) under an explicit split written as files (leave-last-two-out:
    each customer's last event the test part, the one before it the validation part), the funnel
    beside the peers, sliced by the spec's own user attributes. The parts scored are the files'
    rows, cleaned as the pipeline cleans them (canonical item ids; the validation file's, which the
    tuning step chose on, excluded from ranking), and the report's Pop figure recomputed from them
    agrees. A broken log or an unusable split is refused before anything is written. (The temporal
    protocol's run is ``make demo``'s, tests/test_demo.py.)"""
    import yaml

    from evaluation import offline
    from evaluation.peers import Popularity
    from evaluation.pipeline import canonical, held_out_positives
    from workflows.pipeline import ProcessedData
    from workflows.reader import load_inputs
    from workflows.sources.shop import generate
    from workflows.spec import load_spec

    paths = generate(customers=200, skus=120, events_per_customer=25, seed=4).write(tmp_path / "data")
    spec = str(tmp_path / "data" / "dataset.yaml")
    events = load_inputs(load_spec(spec)).events.compute()
    keys = events[["user_id", "item_id", "timestamp"]].drop_duplicates().sort_values(["user_id", "timestamp"])
    from_end = keys.groupby("user_id").cumcount(ascending=False)
    files = {name: str(tmp_path / f"{name}.parquet") for name in ("train", "valid", "test")}
    for name, part in zip(files, (keys[from_end >= 2], keys[from_end == 1], keys[from_end == 0])):
        part.to_parquet(files[name], index=False)

    config = tmp_path / "tiny.yaml"
    stages = ("candidate_generator", "light_ranker", "heavy_ranker")
    tiny = {stage: {"epochs": 1, "batch_size": 512} for stage in stages}
    tiny["serving"] = {"retrieval_k": 80, "light_ranker_k": 30, "max_k": 40}
    split = {"kind": "explicit", "train_file": files["train"], "valid_file": files["valid"]}
    # An explicit split must name the test part it scores (the validation part is tuned on) and
    # files that exist; both are refused before any work.
    config.write_text(yaml.safe_dump({**tiny, "workflow": {"split": split}}))
    no_test = script(
        "scripts/evaluate.py", "--spec", spec, "--config", str(config), "--out", str(tmp_path / "no"), check=False
    )
    assert no_test.returncode == 2 and "workflow.split.test_file" in no_test.stderr and not (tmp_path / "no").exists()
    missing = {**split, "train_file": str(tmp_path / "none.parquet"), "test_file": files["test"]}
    config.write_text(yaml.safe_dump({**tiny, "workflow": {"split": missing}}))
    run = script(
        "scripts/evaluate.py", "--spec", spec, "--config", str(config), "--out", str(tmp_path / "no"), check=False
    )
    assert run.returncode == 2 and "none.parquet" in run.stderr and not (tmp_path / "no").exists()

    split["test_file"] = files["test"]
    config.write_text(yaml.safe_dump({**tiny, "workflow": {"split": split, "checks": {"point_in_time_probe": False}}}))
    out = tmp_path / "evaluation"
    run = script("scripts/evaluate.py", "--spec", spec, "--config", str(config), "--out", str(out), "--no-mitigation")
    results = json.loads((out / "report" / "results.json").read_text())
    assert [r["name"] for r in results["results"]] == ["Pop", "EASE", "ALS", "funnel (served)"]
    funnel = results["results"][-1]["metrics"]
    assert 0 < funnel["ndcg@10"] <= 1 and f"funnel (served)    ndcg@10 {funnel['ndcg@10']:.4f}" in run.stdout
    report = (out / "report" / "report.md").read_text()
    assert report.startswith("# Offline evaluation: shop (") and "positive: view" in report.splitlines()[0]
    assert "explicit split files" in report
    assert "| segment " in report and "| region " in report  # the spec's user attributes as slices

    # The parts scored are the files' rows, cleaned as the pipeline cleans them (canonical item ids).
    processed = ProcessedData(out / "processed")
    train, test, valid = held_out_positives(processed)

    def positives_of(name: str) -> set:
        rows = pd.read_parquet(files[name]).merge(events, on=["user_id", "item_id", "timestamp"])
        rows = canonical(rows[rows["click"] > 0], processed.item_id_map, processed.summary["unsafe_items"])
        return set(zip(rows["user_id"], rows["item_id"]))

    pairs = {
        name: set(zip(f["user_id"], f["item_id"])) for name, f in (("train", train), ("test", test), ("valid", valid))
    }
    assert pairs["test"] == positives_of("test") and pairs["valid"] == positives_of("valid")
    assert pairs["train"] and pairs["train"] <= positives_of("train")  # inactive users' training rows dropped
    # ... and what the report's Pop figure was computed on: recomputed from those parts, it agrees.
    data = offline.Interactions.from_split(train, test, valid)
    pop = offline.evaluate_scores(
        "Pop", Popularity().fit(data.matrix()).scores(np.arange(len(data.user_ids))), data, ks=(10,), n_bootstrap=10
    )
    assert results["results"][0]["metrics"]["ndcg@10"] == pytest.approx(pop.metrics["ndcg@10"])

    # A log with a defect: exit 2, the file and column named, no report.
    broken = pd.read_csv(paths["events_0"])
    broken.loc[3, "ts"] = "yesterday"
    broken.to_csv(paths["events_0"], index=False)
    bad = script("scripts/evaluate.py", "--spec", spec, "--out", str(tmp_path / "bad"), check=False)
    assert bad.returncode == 2 and "ts" in bad.stderr and not (tmp_path / "bad" / "report").exists()


def test_bad_arguments_are_refused_before_anything_is_deleted_or_trained(tmp_path):
    """A bad count, a config that does not exist, or a benchmark pointed at its own scratch copy is
    an error naming the argument (exit 2 from argparse, or a one-line error), and the work folder
    from the last run is still there."""
    from configs.cli import non_negative_int, port, positive_int

    assert positive_int("3") == 3 and non_negative_int("0") == 0 and port("8001") == 8001
    for parse, text in ((positive_int, "0"), (positive_int, "x"), (non_negative_int, "-1"), (port, "70000")):
        with pytest.raises(Exception, match="must be|invalid integer"):
            parse(text)
    work = tmp_path / "demo"
    work.mkdir()
    (work / "kept").write_text("the last run's output")
    run = script("scripts/demo.py", "--workdir", str(work), "--k", "0", check=False)
    assert run.returncode == 2 and "argument --k: must be >= 1, got 0" in run.stderr
    run = script("scripts/demo.py", "--workdir", str(work), "--config", str(tmp_path / "nope.yaml"), check=False)
    assert run.returncode == 2 and "argument --config: no such file: " in run.stderr and "nope.yaml" in run.stderr
    typo = tmp_path / "typo.yaml"
    typo.write_text("serving: {retrival_k: 300}\n")  # a misspelt key is named, not a traceback after the imports
    run = script("scripts/train.py", "--config", str(typo), "--data", str(work), check=False)
    assert run.returncode == 2 and "serving: unknown key(s) ['retrival_k']" in run.stderr
    assert "Traceback" not in run.stderr
    assert (work / "kept").exists()
    run = script("scripts/feedback_loop.py", "--out", str(work), "--holdout", "0.1", check=False)
    assert run.returncode == 2 and "--holdout: must be in [0, 0.05], got 0.1" in run.stderr
    own = tmp_path / "bench" / "triton_repo"
    run = script("-m", "benchmarks.benchmark_live", "--repository", str(own), "--workdir", str(own.parent), check=False)
    assert run.returncode == 2 and "it would be replaced" in run.stderr


def test_load_generator_refuses_no_concurrency():
    from benchmarks.loadgen import run_load

    with pytest.raises(ValueError, match="concurrency must be >= 1, got 0"):  # it used to wait forever
        run_load("127.0.0.1:1", [], concurrency=0)


def test_a_request_whose_answer_never_comes_is_an_error_of_the_load_not_left_out(monkeypatch):
    """The load waits for every callback up to its timeout; a request whose callback never came was
    dropped from the report, which then counted fewer requests and no error for it."""
    import tritonclient.grpc as grpcclient

    from benchmarks.loadgen import Request, run_load

    class SilentForUserTwo:  # answers every request but user 2's, which gets no callback at all
        def __init__(self, url):
            pass

        def async_infer(self, model_name, inputs, callback, outputs, client_timeout):
            user = next(int(np.frombuffer(i._raw_content, dtype=np.int64)[0]) for i in inputs if i.name() == "user_id")
            if user != 2:
                callback(None, RuntimeError(f"refused user {user}"))

        def close(self):
            pass

    monkeypatch.setattr(grpcclient, "InferenceServerClient", SilentForUserTwo)
    report = run_load("127.0.0.1:1", [Request(u, 5) for u in (1, 2, 3)], concurrency=8, timeout_s=0.2)
    assert [r.request.user_id for r in report.results] == [1, 2, 3]
    assert report.results[1].error.startswith("no response within")
    assert report.summary()["errors"] == 3 and report.summary()["requests"] == 3


SLOW_CONFIG = """name: "slow"
backend: "python"
max_batch_size: 0
input [ { name: "x" data_type: TYPE_INT64 dims: [ 1 ] } ]
output [ { name: "y" data_type: TYPE_INT64 dims: [ 1 ] } ]
"""
SLOW_MODEL = """import time
class TritonPythonModel:
    def initialize(self, args):
        time.sleep(120)
    def execute(self, requests):
        return []
"""


# scripts/serve.py, taking a repository that is no export (it refuses one otherwise): the one-model test repository.
SERVE_ANY_REPOSITORY = """
import importlib.util
spec = importlib.util.spec_from_file_location("serve_script", "scripts/serve.py")
serve = importlib.util.module_from_spec(spec)
spec.loader.exec_module(serve)
serve.export_problem = lambda repository: None
serve.main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_serve_stops_at_once_when_interrupted_while_models_load(tmp_path, sig):
    """Ctrl-C (or a container's SIGTERM) while the models load: serve.py ignored it until every model
    was ready (up to 420 s), so only a SIGKILL stopped it, which left tritonserver running."""
    import os
    import signal
    import time

    from deployment.monitoring import find_tritonserver
    from deployment.server import free_port

    repo = tmp_path / "repo"
    (repo / "slow" / "1").mkdir(parents=True)
    (repo / "slow" / "config.pbtxt").write_text(SLOW_CONFIG)
    (repo / "slow" / "1" / "model.py").write_text(SLOW_MODEL)
    log, metrics_port = tmp_path / "server.log", free_port()
    ports = ["--grpc-port", str(free_port()), "--http-port", str(free_port()), "--metrics-port", str(metrics_port)]
    serve = subprocess.Popen(
        [sys.executable, "-c", SERVE_ANY_REPOSITORY, "--model-repository", str(repo), *ports, "--log", str(log)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while "loading: slow:1" not in (log.read_text() if log.exists() else ""):
            assert serve.poll() is None and time.monotonic() < deadline, "the server never began loading"
            time.sleep(0.2)
        assert find_tritonserver(metrics_port) is not None
        serve.send_signal(getattr(signal, sig))
        output, _ = serve.communicate(timeout=30)
    finally:
        serve.kill()
        serve.wait()
        left = find_tritonserver(metrics_port)
        if left is not None:  # a failed run's server: its own process group
            os.killpg(left, signal.SIGKILL)
    assert serve.returncode == 0 and "stopped while it loaded" in output, output[-2000:]
    assert left is None


def refused(run: subprocess.CompletedProcess, *words: str) -> None:
    """A user mistake: exit status 2 and one line naming it, no traceback."""
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert "Traceback" not in run.stderr, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert all(w in last for w in words), last


def test_a_registry_without_versions_or_a_folder_that_is_no_export_is_refused_in_one_line(tmp_path):
    empty, not_export = tmp_path / "registry", tmp_path / "not_export"
    empty.mkdir()
    not_export.mkdir()
    out = tmp_path / "triton_repo"
    refused(
        script("scripts/export_triton.py", "--registry", str(empty), "--out", str(out), check=False),
        "--registry",
        "no model version",
    )
    assert not out.exists()
    refused(
        script("scripts/checklist.py", "--registry", str(empty), "--repo", str(not_export), check=False),
        "--repo",
        "export.json",
    )
    refused(
        script("scripts/rollout.py", "--registry", str(empty), "--repository", str(not_export), check=False),
        "--registry",
    )
    refused(script("scripts/rollout.py", "--tls-ca", str(tmp_path / "nope.pem"), check=False), "--tls-ca", "nope.pem")
    afile = tmp_path / "registry.txt"  # a file: listdir's NotADirectoryError was a traceback, exit 1
    afile.write_text("not a registry")
    for name in ("export_triton.py", "checklist.py"):
        refused(script(f"scripts/{name}", "--registry", str(afile), check=False), "--registry", "is a file")


def test_bad_values_are_argument_errors_not_tracebacks(tmp_path):
    for treatment in ("{bad", "[1]", '{"nosuch": 1}'):
        run = script("scripts/ab_test.py", "--treatment", treatment, "--workdir", str(tmp_path / "ab"), check=False)
        refused(run, "--treatment")
    assert not (tmp_path / "ab").exists()
    run = script("scripts/feedback_loop.py", "--report-only", "--out", str(tmp_path / "none"), check=False)
    refused(run, "--report-only", "history.json")
    run = script(
        "scripts/make_shop_data.py", "--out", str(tmp_path / "shop"), "--events-per-customer", "-5", check=False
    )
    refused(run, "--events-per-customer")
    assert not (tmp_path / "shop").exists()
    # inf passed the > 0 check and died in numpy ('negative dimensions are not allowed'), exit 1
    run = script(
        "scripts/make_shop_data.py", "--out", str(tmp_path / "shop"), "--events-per-customer", "inf", check=False
    )
    refused(run, "--events-per-customer", "finite")
    assert not (tmp_path / "shop").exists()
    run = script("scripts/fetch_movielens.py", "--grouplens", str(tmp_path), "--out", str(tmp_path / "ml"), check=False)
    refused(run, "--grouplens", "u.data")
    (tmp_path / "u.data").write_text("1\t1\t5\t100\n")  # a file, not the folder: was a BadZipFile traceback
    run = script("scripts/fetch_movielens.py", "--grouplens", str(tmp_path / "u.data"), check=False)
    refused(run, "--grouplens", "is not a folder")
    run = script("scripts/monitor.py", "--port", "-5", "--data-dir", str(tmp_path / "prom"), "--check", check=False)
    refused(run, "--port")
    for interval in ("900", "0"):  # at 900 s or more HoldoutMonitorDown would fire all along
        args = ["--holdout-interval", interval, "--port", "0", "--data-dir", str(tmp_path / "prom"), "--check"]
        run = script("scripts/monitor.py", *args, check=False)
        refused(run, "--holdout-interval")
    # An IPv6 host: Triton's HTTP and metrics services cannot bind it (the start waited out its timeout)
    run = script("scripts/serve.py", "--model-repository", str(tmp_path), "--host", "::1", check=False)
    refused(run, "'::1'", "IPv6")
    run = script("scripts/serve.py", "--model-repository", str(tmp_path / "nope"), *ANY_PORTS, check=False)
    refused(run, "nope", "does not exist")


def test_an_output_folder_that_is_a_file_or_under_one_is_an_argument_error(tmp_path):
    """--out / --registry naming a file (or a folder under one) was mkdir's FileExistsError or
    NotADirectoryError, a traceback with exit 1, for prepare_data and train only after the work."""
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    refused(script("scripts/generate_data.py", "--out", str(afile), check=False), "--out", "is a file, not a folder")
    run = script("scripts/make_shop_data.py", "--out", str(afile / "shop"), check=False)
    refused(run, "--out", f"{afile} is a file, not a folder")
    run = script("scripts/train.py", "--registry", str(afile), "--data", str(tmp_path), check=False)
    refused(run, "--registry", "is a file, not a folder")
    run = script("scripts/feedback_loop.py", "--out", str(afile / "loop"), check=False)
    refused(run, "--out", f"{afile} is a file, not a folder")
    run = script("scripts/monitor.py", "--port", "0", "--data-dir", str(afile), "--check", check=False)
    refused(run, "--data-dir", "is a file, not a folder")  # was a traceback once the sidecar had started
    assert afile.read_text() == "not a folder"


def start_monitor(tmp_path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """``scripts/monitor.py`` on free ports with its data under ``tmp_path``, its output piped: Alertmanager
    too (its defaults are port 9093 and ``build/monitor`` in the checkout, shared with whatever else runs there)."""
    cmd = [sys.executable, "scripts/monitor.py", "--metrics-port", "1", "--port", "0"]
    cmd += ["--data-dir", str(tmp_path / "prom"), "--holdout-interval", "600"]
    cmd += ["--alertmanager-port", "0", "--alertmanager-data-dir", str(tmp_path / "alertmanager")]
    cmd += ["--alert-log", str(tmp_path / "alerts.jsonl"), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def read_until_started(proc: subprocess.Popen) -> list[str]:
    """Its output up to the "Ctrl-C ..." line it prints once everything runs."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Ctrl-C"):
            break
    return lines


def test_monitor_prints_a_feedback_log_dsn_without_its_password(tmp_path):
    """$FUNNEL_FEEDBACK_LOG may be a DSN with a password: the startup lines, which a terminal or a
    service's log keeps, name the log without it."""
    import os
    import shutil
    import signal

    if shutil.which("prometheus") is None:  # the line is printed once Prometheus runs
        pytest.skip("no prometheus binary (make services)")
    dsn = "postgresql://funnel:s3cret-pw@127.0.0.1:1/funnel"  # nothing listens: the line comes first
    proc = start_monitor(tmp_path, env={**os.environ, "FUNNEL_FEEDBACK_LOG": dsn})
    try:
        lines = read_until_started(proc)
    finally:
        proc.send_signal(signal.SIGINT)
        out = "".join(lines) + proc.communicate(timeout=60)[0]
    assert "feedback log postgresql://funnel@127.0.0.1:1/funnel" in out, out
    assert "s3cret-pw" not in out


def test_a_workdir_no_run_made_is_refused_not_deleted(tmp_path):
    """demo, ab_test and retention_weights delete --workdir to start from nothing: only a folder an
    earlier run made; a folder of the user's (a typo, ``--workdir ~``) is refused, its files kept."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("not a run's output")
    for name in ("demo", "ab_test", "retention_weights"):
        run = script(f"scripts/{name}.py", "--workdir", str(precious), check=False)
        refused(run, "--workdir", "name a new or empty folder")
        assert (precious / "notes.txt").read_text() == "not a run's output"
    # The feedback loop's --out too (before 2026-12-06 a run went into any folder, an earlier run's
    # included, and appended to its feedback logs and registry): refused before anything trains.
    refused(script("scripts/feedback_loop.py", "--out", str(precious), check=False), "--out", "name a new or empty")
    assert (precious / "notes.txt").read_text() == "not a run's output"
    import argparse

    from configs.cli import WORKDIR_MARK, fresh_workdir

    parser = argparse.ArgumentParser()
    fresh = fresh_workdir(parser, tmp_path / "new" / "work")  # a new folder, then the same again: its run's
    (fresh / "raw").mkdir()
    assert (fresh_workdir(parser, fresh) / WORKDIR_MARK).exists() and not (fresh / "raw").exists()
    # A folder of trained models is not a run's: refused, kept (it was deleted if it had a registry/).
    models = tmp_path / "artifacts"
    (models / "registry" / "1").mkdir(parents=True)
    with pytest.raises(SystemExit):
        fresh_workdir(parser, models)
    assert (models / "registry" / "1").is_dir()
    # The script's own default folder from a run before the mark is its own: emptied.
    old = tmp_path / "build" / "demo"
    (old / "registry").mkdir(parents=True)
    parser.add_argument("--workdir", default=str(old))
    assert not (fresh_workdir(parser, old) / "registry").exists()


def test_report_only_describes_the_run_it_reports_not_the_current_flags(tmp_path):
    """``--report-only`` rebuilt the report's context (world size, days, holdout share) from the flags
    and config of the rebuilding command (before 2026-12-06), so a run of 60 users with no holdout
    was reported as the config's 1000 users with a 5% holdout; the run's own context is kept now."""
    from online.feedback_loop import Generation, write_loop_report

    live = {"users": 60.0, "requests": 100.0, "ctr": 0.2, "retention": 0.5}
    history = [Generation(1, 1, 300, {0.5: 10, 0.9: 20, 1.0: 30}, 0.4, 0.75, live, {}, {})]
    context = {"world": "60 users, 40 items", "holdout": "0% of users on generation 0's model", "wall time": "9s"}
    write_loop_report(history, tmp_path / "report", context)
    script("scripts/feedback_loop.py", "--report-only", "--out", str(tmp_path))
    report = (tmp_path / "report" / "report.md").read_text()
    assert "60 users, 40 items" in report and "0% of users" in report, report[:1000]
    assert "1000 users" not in report and "5% of users" not in report


def test_serve_refuses_a_port_outside_the_tcp_range_before_starting(tmp_path):
    """--grpc-port 70000 or -1 started tritonserver, which then failed (after its models loaded) with
    a traceback, exit 1; a port outside 0-65535 is an argument error now (0: a free one, as before)."""
    for flag, value in (("--grpc-port", "70000"), ("--http-port", "-1"), ("--metrics-port", "65536")):
        run = script("scripts/serve.py", "--model-repository", str(tmp_path), flag, value, check=False)
        refused(run, f"argument {flag}", value)


def test_evaluate_refuses_a_negative_seed_as_an_argument_error(tmp_path):
    """--seed -1 passed argparse (type=int) and ended in load_config's ValueError traceback, exit 1."""
    run = script("scripts/evaluate.py", "--seed", "-1", "--out", str(tmp_path / "ev"), check=False)
    refused(run, "argument --seed", "must be >= 0, got -1")
    assert not (tmp_path / "ev").exists()


def test_evaluate_refuses_a_movielens_path_that_is_no_wheel_or_ml100k_folder(tmp_path):
    """--movielens with a wrong path was a FileNotFoundError traceback, exit 1 (fetch_movielens.py's
    --grouplens is an argument error)."""
    for source, words in ((tmp_path / "nope.whl", "not found"), (tmp_path, "u.data")):
        args = ["--source", "movielens", "--movielens", str(source), "--out", str(tmp_path / "ev")]
        refused(script("scripts/evaluate.py", *args, check=False), "argument --movielens", words)
    assert not (tmp_path / "ev").exists()


def test_checklist_refuses_a_repo_that_is_no_export_with_a_version_too(tmp_path):
    """--repo was checked only without --version: with it, a missing --repo was a traceback, exit 1."""
    (tmp_path / "registry" / "1").mkdir(parents=True)
    (tmp_path / "registry" / "1" / "manifest.json").write_text('{"version": 1}')
    args = ["--registry", str(tmp_path / "registry"), "--version", "1", "--repo", str(tmp_path / "nope")]
    refused(script("scripts/checklist.py", *args, check=False), "argument --repo", "export.json")


def test_export_refuses_an_out_it_would_not_replace_as_an_argument_error(tmp_path):
    """An existing --out without --replace, a file, or a folder that is no export was
    export_repository's FileExistsError/NotADirectoryError/FileNotFoundError traceback, exit 1."""
    version = tmp_path / "registry" / "1"  # a stand-in version that passes the export's own checks
    version.mkdir(parents=True)
    (version / "manifest.json").write_text('{"version": 1, "config": {"serving": {}}}')
    for stamp in ("query_tower.json", "item_index.json"):
        (version / stamp).write_text('{"version": 1}')
    folder, file = tmp_path / "mine", tmp_path / "file"
    folder.mkdir()
    (folder / "notes.txt").write_text("kept")
    file.write_text("kept")
    for out, flags, words in (
        (folder, [], ["exists", "--replace"]),
        (file, ["--replace"], ["is a file"]),
        (folder, ["--replace"], ["export.json"]),
    ):
        run = script("scripts/export_triton.py", "--registry", str(tmp_path / "registry"), "--out", str(out), *flags,
                     check=False)  # fmt: skip
        refused(run, "argument --out", *words)
    assert (folder / "notes.txt").read_text() == "kept" and file.read_text() == "kept"


def test_monitor_refuses_a_holdout_effect_or_window_under_which_the_alert_never_fires(tmp_path):
    """--holdout-effect nan/inf made every sequential p-value NaN, --holdout-window-days -1 compared
    no request at all (the window began tomorrow): the monitor ran and LiveBelowHoldout never fired."""
    common = ["--port", "0", "--metrics-port", "1", "--data-dir", str(tmp_path / "prom"), "--check"]
    for flag, value in (
        ("--holdout-effect", "nan"),
        ("--holdout-effect", "inf"),
        ("--holdout-window-days", "-1"),
        ("--holdout-window-days", "nan"),
    ):
        refused(script("scripts/monitor.py", flag, value, *common, check=False), f"argument {flag}")
    assert not (tmp_path / "prom").exists()


def test_monitor_passes_holdout_retired_after_to_the_holdout_monitor(tmp_path, monkeypatch):
    """HoldoutMonitor's retired_after_s (a version without live responses for that long drops out) had
    no flag: it was one hour whatever the deployment's traffic. --holdout-retired-after sets it, 'none'
    keeps every version, and a value that is no positive finite number of seconds is refused."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("monitor_script", ROOT / "scripts" / "monitor.py")
    monitor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(monitor)

    class Built(Exception):  # stops main() once the monitor is built, before anything starts
        pass

    def built(*args, **kwargs):
        raise Built(kwargs)

    monkeypatch.setattr(monitor, "HoldoutMonitor", built)
    common = ["monitor.py", "--data-dir", str(tmp_path / "prom")]
    for flags, expected in (([], 3600.0), (["--holdout-retired-after", "7200"], 7200.0)):
        monkeypatch.setattr(sys, "argv", [*common, *flags])
        with pytest.raises(Built) as made:
            monitor.main()
        assert made.value.args[0]["retired_after_s"] == expected
    monkeypatch.setattr(sys, "argv", [*common, "--holdout-retired-after", "None"])
    with pytest.raises(Built) as made:
        monitor.main()
    assert made.value.args[0]["retired_after_s"] is None
    common = ["--port", "0", "--metrics-port", "1", "--data-dir", str(tmp_path / "prom"), "--check"]
    for value in ("0", "-5", "nan", "inf", "an hour"):
        run = script("scripts/monitor.py", "--holdout-retired-after", value, *common, check=False)
        refused(run, "argument --holdout-retired-after", repr(value))
    assert not (tmp_path / "prom").exists()


def test_monitor_refuses_an_interval_prometheus_cannot_parse_before_starting_it(tmp_path):
    """--scrape-interval abc (or 15, 1.5s) went into Prometheus' config, Prometheus exited at start and
    monitor.py ended in a ServerError traceback, exit status 1, after starting the sidecar."""
    common = ["--port", "0", "--metrics-port", "1", "--data-dir", str(tmp_path / "prom"), "--check"]
    for flag, value in (("--scrape-interval", "abc"), ("--scrape-interval", "15"), ("--evaluation-interval", "1.5s")):
        refused(script("scripts/monitor.py", flag, value, *common, check=False), f"argument {flag}", repr(value))
    assert not (tmp_path / "prom").exists()


def test_ab_test_refuses_the_experiment_name_none_before_training(tmp_path):
    """--name was set on the loaded config, past ExperimentConfig's check: 'none' (the state without an
    experiment) trained both arms and then died in ab_rollout with a ValueError traceback."""
    run = script("scripts/ab_test.py", "--name", "none", "--workdir", str(tmp_path / "ab"), check=False)
    refused(run, "argument --name", "'none'")
    assert not (tmp_path / "ab").exists()
    # '' was read as no --name (the configured name served); it is the log's unknown experiment: refused too.
    run = script("scripts/ab_test.py", "--name", "", "--workdir", str(tmp_path / "ab"), check=False)
    refused(run, "argument --name", "must not be empty")
    assert not (tmp_path / "ab").exists()


def test_query_refuses_k_below_one_without_asking_the_server():
    """--k 0 or -3 (type=int) went to the server, whose refusal (or a connection error) was exit 1."""
    for k in ("0", "-3"):
        run = script("scripts/query.py", "--user-id", "1", "--k", k, "--url", "127.0.0.1:1", check=False)
        refused(run, "argument --k", "must be >= 1")


@pytest.mark.parametrize(
    "name, extra", [("query", ["--user-id", "1"]), ("rollout", []), ("takedown", ["--item", "1"]), ("probe", [])]
)
def test_a_script_refuses_a_url_without_a_port_as_an_argument(name, extra):
    """--url localhost went to gRPC, which dialed port 443 and printed "failed to connect to all
    addresses ... 127.0.0.1:443", exit 1, naming neither the --url given nor that it lacked a port
    (query.py; rollout.py, takedown.py and probe.py took it too, to fail later the same way)."""
    run = script(f"scripts/{name}.py", *extra, "--url", "localhost", check=False)
    refused(run, "argument --url", "'localhost' is not a gRPC address: expected host:port")


def test_query_sends_the_excluded_ids_and_waits_at_most_its_timeout(monkeypatch, capsys):
    """query.py had no --exclude (the request's exclude_item_ids, docs/serving.md) and no --timeout
    (FunnelClient's timeout_s): the script always waited 30 s and could not leave items out."""
    import importlib.util

    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    sent = []

    class Recording:  # takes the request, then refuses it, so that nothing needs a server
        def __init__(self, url, **kw):
            pass

        def infer(self, model_name, inputs, outputs, client_timeout):
            tensors = {i.name(): np.frombuffer(i._raw_content, dtype=np.int64) for i in inputs if i.name() != "k"}
            sent.append((tensors, client_timeout))
            raise InferenceServerException("refused", "StatusCode.INVALID_ARGUMENT")

        def close(self):
            pass

    monkeypatch.setattr(grpcclient, "InferenceServerClient", Recording)
    spec = importlib.util.spec_from_file_location("query_script", ROOT / "scripts" / "query.py")
    query = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(query)
    for argv, excluded, timeout in [
        (["--user-id", "1", "--exclude", "7", "9", "--timeout", "2.5"], [7, 9], 2.5),
        (["--user-id", "1"], None, 30.0),
    ]:
        with pytest.raises(SystemExit) as exit_:
            query.main(argv)
        assert exit_.value.code == 1 and "refused" in capsys.readouterr().err
        tensors, client_timeout = sent.pop()
        assert client_timeout == timeout
        assert (tensors["exclude_item_ids"].tolist() if "exclude_item_ids" in tensors else None) == excluded


def test_query_gives_up_after_its_timeout_and_refuses_a_bad_timeout_or_exclude(silent_grpc_server):
    run = script("scripts/query.py", "--user-id", "1", "--url", silent_grpc_server, "--timeout", "0.5", check=False)
    assert run.returncode == 1 and "did not answer funnel within 0.5 s" in run.stderr, run.stderr[-2000:]
    for flag, value, words in [
        ("--timeout", "0", "must be a finite number of seconds > 0"),
        ("--timeout", "nan", "must be a finite number of seconds > 0"),
        ("--timeout", "soon", "must be a number of seconds"),
        ("--exclude", "7.5", "invalid integer '7.5'"),
        # out of INT64 (or, for k, INT32) range: the client refused them before sending, but as exit 1,
        # the code for a server's refusal
        ("--exclude", str(2**64), "must fit a 64-bit integer"),
        ("--user-id", str(-(2**63) - 1), "must fit a 64-bit integer"),
        ("--k", str(2**31), "must be at most 2147483647"),
    ]:
        run = script("scripts/query.py", "--user-id", "1", "--url", "127.0.0.1:1", flag, value, check=False)
        refused(run, f"argument {flag}", words)


def test_probe_refuses_a_tls_ca_that_does_not_exist():
    """A missing --tls-ca was reported as an unhealthy server (exit 1) with tritonclient's
    AttributeError traceback from its __del__; query.py and rollout.py refuse it as an argument."""
    run = script("scripts/probe.py", "--url", "127.0.0.1:1", "--tls-ca", "/nonexistent/ca.pem", check=False)
    refused(run, "argument --tls-ca", "/nonexistent/ca.pem")


def test_demo_refuses_a_json_path_it_could_not_write_before_it_runs(tmp_path):
    """--json into a folder that does not exist was written after the whole demo (minutes of
    training and serving) and failed there with a FileNotFoundError traceback, exit 1."""
    args = ["--workdir", str(tmp_path / "demo"), "--json", str(tmp_path / "nope" / "out.json")]
    refused(script("scripts/demo.py", *args, check=False), "argument --json", "nope")
    assert not (tmp_path / "demo").exists()


def test_prepare_data_refuses_a_scheduler_that_is_no_address_as_an_argument_error(tmp_path):
    """--scheduler host:8786 (no tcp://) was a ValueError traceback, exit 1, raised only once the
    pipeline started: with --source movielens after the wheel was fetched and the tables written."""
    raw = tmp_path / "ml"
    args = ["--source", "movielens", "--raw", str(raw), "--cache", str(tmp_path / "cache"), "--scheduler", "host:8786"]
    refused(script("scripts/prepare_data.py", *args, check=False), "--scheduler", "tcp://host:8786")
    assert not raw.exists() and not (tmp_path / "cache").exists()


def test_prepare_data_prints_a_warning_as_the_defect_reads(tmp_path, monkeypatch, capsys):
    """The script spelt each input warning out itself: "(1 rows, e.g. ...)" for an event of one unknown
    item (checks.missing_items: warn). It prints the warning as its Defect reads: "1 row", "2 rows"."""
    import importlib.util
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("prepare_data_script", ROOT / "scripts" / "prepare_data.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    message = "refers to items missing from the item table items.csv"
    warnings = [
        {"file": "events-000.csv", "column": "sku", "message": message, "rows": 1, "example": "X1"},
        {"file": "events-001.csv", "column": "sku", "message": message, "rows": 2, "example": 7},
    ]
    keys = ("cutoff", "train_rows", "valid_rows", "known_users", "known_items", "duplicate_items")
    summary = {
        **dict.fromkeys(keys, 0),
        "dataset": {"name": "shop", "labels": [], "adaptations": [], "warnings": warnings},
        "steps": [],
        "checks": [],
    }
    monkeypatch.setattr(prepare, "load_spec", lambda path: path)
    monkeypatch.setattr(prepare, "prepare_dataset", lambda *args, **kwargs: SimpleNamespace(summary=summary))
    monkeypatch.setattr(sys, "argv", ["prepare_data.py", "--spec", "shop/dataset.yaml", "--out", str(tmp_path / "out")])
    prepare.main()
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert printed == [
        f"warning: events-000.csv: column 'sku': {message} (1 row, e.g. 'X1')",
        f"warning: events-001.csv: column 'sku': {message} (2 rows, e.g. 7)",
    ], printed


class ServerThatDies:
    """scripts/serve.py's TritonServer, up at once, whose process then exits on its own (a crash)."""

    def __init__(self, *args, **kwargs):
        self.log_path, self.stopped = "server.log", False
        self.process = type("Exited", (), {"poll": lambda self: 1})()

    def start(self, cancelled=None):
        return self

    def listening(self) -> str:
        return "grpc 127.0.0.1:1"

    def log_tail(self) -> str:
        return "Segmentation fault"

    def stop(self) -> None:
        self.stopped = True


def serve_module():
    """scripts/serve.py imported as a module, for tests that call its main() in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve_script", ROOT / "scripts" / "serve.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    return serve


def skeleton_export(repo: Path, version: int = 1) -> Path:
    """The files ``check_complete`` asks of ``version`` (seven stages, their artifacts, both
    ensembles) and ``export.json``, every one empty but the manifests: an export's shape, no models."""
    from deployment.export import STAGE_ARTIFACTS
    from models.registry import MANIFEST
    from serving.interface import FUNNEL, ensemble_name

    for stage, artifacts in STAGE_ARTIFACTS.items():
        folder = repo / stage / str(version)
        folder.mkdir(parents=True)
        (repo / stage / "config.pbtxt").write_text("")
        (folder / "model.py").write_text("")
        (folder / MANIFEST).write_text(json.dumps({"version": version}))
        for name in artifacts:
            (folder / name).write_text("")
    for ensemble in (FUNNEL, ensemble_name(version)):
        (repo / ensemble / "1").mkdir(parents=True)
        (repo / ensemble / "config.pbtxt").write_text("")
    (repo / "export.json").write_text(json.dumps({"version": version}))
    return repo


def test_serve_refuses_a_folder_that_is_no_complete_export_before_starting_a_server(tmp_path, monkeypatch):
    """An empty folder (or one that is no export, or a partial export) started tritonserver, which then
    served nothing (or a funnel that could not load); it is an argument error now, before any start."""
    serve = serve_module()
    started = []

    class NeverStarted(ServerThatDies):
        def start(self):
            started.append(self)
            raise AssertionError("the server was started")

        def cleanup(self) -> None:
            self.stopped = True

    monkeypatch.setattr(serve, "TritonServer", NeverStarted)
    empty, partial = tmp_path / "empty", skeleton_export(tmp_path / "partial")
    empty.mkdir()
    (partial / "heavy_ranker" / "1" / "heavy_ranker").unlink()
    for repo in (empty, partial):
        monkeypatch.setattr(sys, "argv", ["serve.py", "--model-repository", str(repo)])
        with pytest.raises(SystemExit) as exited:
            serve.main()
        assert exited.value.code == 2
    assert not started
    assert serve.export_problem(skeleton_export(tmp_path / "complete")) is None
    not_json = skeleton_export(tmp_path / "not_json")
    (not_json / "export.json").write_text("{")
    assert "export.json is unreadable" in serve.export_problem(not_json)
    # and as a user sees it: exit status 2, one line naming the folder and what is missing
    run = script("scripts/serve.py", "--model-repository", str(empty), *ANY_PORTS, check=False)
    refused(run, str(empty), "export.json")
    run = script("scripts/serve.py", "--model-repository", str(partial), *ANY_PORTS, check=False)
    refused(run, "--model-repository", str(partial), "heavy_ranker/1/heavy_ranker is missing")


def serve_with_stand_in(server_class, monkeypatch):
    """Run serve.py's main() on a stand-in ``TritonServer`` (a class taking no arguments) for a
    repository that counts as a complete export, on free ports; return the servers it made and the
    ``SystemExit`` it ended with. Its signal handlers are put back."""
    import signal

    serve = serve_module()
    servers = []
    monkeypatch.setattr(serve, "TritonServer", lambda *a, **k: servers.append(server_class()) or servers[-1])
    monkeypatch.setattr(serve, "export_problem", lambda repo: None)  # "repo" stands for a complete export
    monkeypatch.setattr(sys, "argv", ["serve.py", "--model-repository", "repo", *ANY_PORTS])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as exited:
            serve.main()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return servers, exited


def test_serve_exits_non_zero_when_the_server_exits_on_its_own(monkeypatch, capsys):
    """A tritonserver that died while serving ended serve.py with exit status 0, as a Ctrl-C does, so a
    service manager restarting on failure (systemd's on-failure, a shell's ``&&``) took it for a stop."""
    servers, exited = serve_with_stand_in(ServerThatDies, monkeypatch)
    assert exited.value.code not in (0, None), capsys.readouterr().out
    assert servers[0].stopped and "Segmentation fault" in capsys.readouterr().out


def test_serve_refuses_a_port_another_process_listens_on_before_starting(tmp_path):
    """A second serve.py on the default ports (or any port taken): tritonserver loaded every model
    (minutes on a real repository), then found the port taken and serve.py ended in a PortTaken
    traceback, exit 1. The port is checked first: one line naming the flag, exit 2."""
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        ports = ["--grpc-port", "0", "--http-port", str(port), "--metrics-port", "0"]
        run = script("scripts/serve.py", "--model-repository", str(tmp_path), *ports, check=False)
    refused(run, f"--http-port {port}", "already in use")


class ServerThatFailsToStart(ServerThatDies):
    """A start that fails as one whose port was taken while the models loaded does."""

    def start(self, cancelled=None):
        from deployment.server import PortTaken

        err = PortTaken([8001], "GRPC port 8001 already in use. tritonserver exited with code 1")
        err.add_note("tritonserver log: server.log")
        raise err


def test_serve_reports_a_failed_start_in_a_message_not_a_traceback(monkeypatch, capsys):
    """A start that failed (the port taken meanwhile, a model that does not load) ended serve.py in
    a traceback; now the error and the log's path, exit 1."""
    servers, exited = serve_with_stand_in(ServerThatFailsToStart, monkeypatch)
    err = capsys.readouterr().err
    assert exited.value.code == 1 and servers[0].stopped
    assert "did not start: GRPC port 8001 already in use" in err and "tritonserver log: server.log" in err, err


SERVE_SIGNALLED_IN_EXEC = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("serve_script", "scripts/serve.py")
serve = importlib.util.module_from_spec(spec)
spec.loader.exec_module(serve)

class SignalledInExec:
    log_path = "server.log"

    def start(self, cancelled):  # the SIGTERM lands while the start runs code made by exec (a namedtuple, a dataclass)
        exec("import os, signal, time; os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.5)")
        if cancelled():
            from deployment.server import StartCancelled

            raise StartCancelled("tritonserver start cancelled while it loaded")
        raise AssertionError("the signal did not cancel the start")

    def stop(self):
        pass

serve.TritonServer = lambda *a, **k: SignalledInExec()
serve.export_problem = lambda repository: None
sys.argv = ["serve.py", "--model-repository", "repo", "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0"]
serve.main()
"""


def test_serve_interrupted_while_the_start_runs_exec_code_exits_zero():
    """A SIGTERM whose handler's KeyboardInterrupt passed out of an ``exec`` (the start's lazy import of
    tritonclient.http makes namedtuples and dataclasses that way): serve.py printed "stopped while it
    loaded" and returned, then CPython ended the process by SIGINT, exit status -2 (about once in 15
    full test runs of the real-server test)."""
    run = subprocess.run(
        [sys.executable, "-c", SERVE_SIGNALLED_IN_EXEC],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "stopped while it loaded" in run.stdout, run.stdout + run.stderr
    assert run.returncode == 0, run.stdout + run.stderr


def test_monitor_exits_non_zero_when_prometheus_exits_on_its_own(tmp_path):
    """Prometheus that died under monitor.py (a full disk, a kill) ended it with exit status 0."""
    import shutil
    import signal

    import psutil

    if shutil.which("prometheus") is None:
        pytest.skip("no prometheus binary (make services)")
    proc = start_monitor(tmp_path, "--feedback-log", str(tmp_path / "f"))
    try:
        lines = read_until_started(proc)
        children = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.name() == "prometheus"]
        assert children, "".join(lines)
        for child in children:
            child.send_signal(signal.SIGKILL)
        out = "".join(lines) + proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=60)
    assert "prometheus exited" in out, out
    assert proc.returncode != 0, out


def test_monitor_refuses_a_rule_file_that_does_not_exist_as_an_argument_error(tmp_path):
    """A mistyped --rules path was a FileNotFoundError traceback after the sidecar had started."""
    args = ["--rules", str(tmp_path / "nope.yml"), "--port", "0", "--data-dir", str(tmp_path / "prom"), "--check"]
    refused(script("scripts/monitor.py", *args, check=False), "--rules", "nope.yml")
    assert not (tmp_path / "prom").exists()


def test_takedown_list_refuses_a_change_beside_it_and_creates_no_store(tmp_path, monkeypatch):
    """``takedown.py --list --item 5 --undo`` listed and exited 0, the undo dropped in silence; and
    ``--list`` created ``<repository>-live.sqlite`` where there was none: a read left state behind."""
    monkeypatch.delenv("FUNNEL_STORE_URL", raising=False)
    repo = tmp_path / "triton_repo"
    repo.mkdir()
    store = tmp_path / "triton_repo-live.sqlite"
    run = script("scripts/takedown.py", "--repository", str(repo), "--list", "--item", "0", "--undo", check=False)
    refused(run, "--list", "--item", "--undo")
    listed = script("scripts/takedown.py", "--repository", str(repo), "--list")
    assert "no item has been taken down" in listed.stdout
    assert not store.exists()


class ServerSignalledTwice(ServerThatDies):
    """A server whose start is interrupted by a SIGTERM, and whose stop gets a second one (a second
    Ctrl-C, or a service manager repeating its SIGTERM, while tritonserver shuts down)."""

    def start(self, cancelled):
        import os
        import signal
        import time

        from deployment.server import StartCancelled

        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the start's poll
            if cancelled():
                raise StartCancelled("tritonserver start cancelled while it loaded")
            time.sleep(0.1)
        raise AssertionError("the first signal did not cancel the start")

    def stop(self) -> None:
        import os
        import signal
        import time

        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # the handler runs here
        self.stopped = True


def test_a_second_signal_while_serve_stops_an_interrupted_start_does_not_cut_the_stop_short(monkeypatch, capsys):
    """The handler raised KeyboardInterrupt for every signal until the start's cleanup was over: a
    second one during ``server.stop()`` (up to its 30 s) cut the stop short, leaving tritonserver to the
    watchdog, and ended serve.py in a KeyboardInterrupt traceback, exit status -2."""
    import signal

    serve = serve_module()
    servers = []
    monkeypatch.setattr(serve, "TritonServer", lambda *a, **k: servers.append(ServerSignalledTwice()) or servers[-1])
    monkeypatch.setattr(serve, "export_problem", lambda repo: None)
    monkeypatch.setattr(sys, "argv", ["serve.py", "--model-repository", "repo", *ANY_PORTS])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.main()  # returns: an interrupted start is a stop, exit status 0
    except KeyboardInterrupt:  # not left to pytest, which would stop the whole session
        pytest.fail("the second signal raised KeyboardInterrupt out of serve.py's main()")
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert servers[0].stopped
    assert "tritonserver stopped while it loaded" in capsys.readouterr().out


class ServerWhoseStartSwallowsExceptions(ServerThatDies):
    """A start whose main thread is almost always inside code that drops exceptions (a ``__del__``
    here; a weakref callback or a gevent callback alike): a signal handler's exception raised there is
    printed as "Exception ignored in ..." and lost. It stops only when ``cancelled`` asks it to."""

    LOAD_S = 10.0

    def start(self, cancelled=None):
        import os
        import signal
        import threading
        import time

        from deployment.server import StartCancelled

        class Finalised:
            def __del__(self):
                time.sleep(0.05)  # the signal's handler runs here

        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
        deadline = time.monotonic() + self.LOAD_S
        while time.monotonic() < deadline:  # the models load
            if cancelled is not None and cancelled():
                self.stop()
                raise StartCancelled("tritonserver start cancelled while it loaded")
            Finalised()
        self.process = type("Running", (), {"poll": lambda self: None})()
        return self


def test_serve_stops_at_once_when_the_signal_lands_in_code_that_drops_exceptions(monkeypatch, capsys):
    """The handler raised its interrupt wherever the main thread was: landing in a ``__del__`` (or any
    code that ignores exceptions) it was printed and dropped, the handler had already stopped treating
    signals as interrupts, and the start went on loading for up to its whole timeout (420 s), so a
    container's SIGTERM was lost and only the SIGKILL after it stopped serve.py."""
    import signal
    import time

    serve = serve_module()
    servers = []
    monkeypatch.setattr(
        serve, "TritonServer", lambda *a, **k: servers.append(ServerWhoseStartSwallowsExceptions()) or servers[-1]
    )
    monkeypatch.setattr(serve, "export_problem", lambda repo: None)
    monkeypatch.setattr(sys, "argv", ["serve.py", "--model-repository", "repo", *ANY_PORTS])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    began = time.monotonic()
    try:
        serve.main()  # returns: an interrupted start is a stop, exit status 0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    took = time.monotonic() - began
    out = capsys.readouterr().out
    assert took < 3.0, f"serve.py stopped {took:.1f} s after the SIGTERM: {out}"
    assert servers[0].stopped and "tritonserver stopped while it loaded" in out, out


def test_export_and_rollout_say_in_one_line_that_another_writer_kept_the_repository(monkeypatch, tmp_path):
    """A writer that waited LOCK_TIMEOUT_S for another one's repository_lock raised RepositoryBusyError
    out of export_triton.py and rollout.py as a traceback, where their other failures are one line."""
    import contextlib
    import importlib.util
    import sys
    from types import SimpleNamespace

    from deployment.export import RepositoryBusyError

    busy = RepositoryBusyError(f"{tmp_path} stayed locked for 3600 s by pid 1; nothing was changed")

    def load(name):
        spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    def raise_busy(*args, **kwargs):
        raise busy

    @contextlib.contextmanager
    def held(*args, **kwargs):
        raise busy
        yield

    version = SimpleNamespace(version=2, manifest={}, path=tmp_path)
    export = load("export_triton")
    monkeypatch.setattr(export.registry, "get", lambda *args: version)
    monkeypatch.setattr(export, "batching_of", lambda manifest: SimpleNamespace(fuse_stages=False))
    monkeypatch.setattr(export, "export_repository", raise_busy)
    monkeypatch.setattr(sys, "argv", ["export_triton.py", "--registry", str(tmp_path), "--out", str(tmp_path / "r")])
    with pytest.raises(SystemExit) as exit_:  # old code: RepositoryBusyError
        export.main()
    assert exit_.value.code == f"export: {busy}"

    rollout = load("rollout")
    monkeypatch.setattr(rollout, "served_version", lambda repo: 1)
    monkeypatch.setattr(rollout, "confirm_key_with_server", lambda *args, **kwargs: None)
    monkeypatch.setattr(rollout, "repository_lock", held)
    monkeypatch.setattr(sys, "argv", ["rollout.py", "--registry", str(tmp_path), "--repository", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:  # old code: RepositoryBusyError
        rollout.main()
    assert exit_.value.code == f"rollout: {busy}"


def test_demo_refuses_a_json_path_that_is_a_folder_before_it_runs(tmp_path):
    """--json naming a folder passed the check of its parent and was written after the whole demo
    (minutes of training and serving): an IsADirectoryError traceback, exit 1. A non-empty --workdir
    no run made is refused after the --json check, so the old code failed here at once, not minutes later."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("not a run's output")
    args = ["--workdir", str(precious), "--json", str(tmp_path)]
    refused(script("scripts/demo.py", *args, check=False), "argument --json", "is a folder, not a file")
    assert (precious / "notes.txt").exists()


def test_demo_refuses_a_user_id_no_request_can_carry_before_it_runs(tmp_path):
    """--users 2**63 was taken as an int and refused by the client (an INT64 tensor) only in the last
    step, after minutes of training and a server start: a traceback, exit 1. (A non-empty --workdir no
    run made is refused after parsing, so the old code failed here at once, naming --workdir.)"""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("not a run's output")
    run = script("scripts/demo.py", "--workdir", str(precious), "--users", "1", str(2**63), check=False)
    refused(run, "argument --users", "64-bit")
    assert (precious / "notes.txt").exists()


def test_rollout_refuses_a_timeout_that_is_not_a_finite_number_of_seconds(tmp_path):
    """--timeout inf passed ``timeout > 0``: after the key check and the version's stages were added
    to the repository, gRPC's deadline overflowed and every load failed at once with 'Deadline
    Exceeded'. (With no registry, the old code's next check named --registry instead.)"""
    for value in ("inf", "nan", "0"):
        run = script("scripts/rollout.py", "--registry", str(tmp_path / "nope"), "--timeout", value, check=False)
        refused(run, "argument --timeout", repr(value))


def test_monitor_refuses_an_alert_webhook_with_no_alertmanager(tmp_path):
    """--no-alertmanager --alert-webhook URL: the webhook was dropped without a word (no Alertmanager
    delivers to it) and the monitor ran. (With a missing rule file, the old code's next check named --rules.)"""
    args = ["--no-alertmanager", "--alert-webhook", "http://127.0.0.1:9/hook", "--rules", str(tmp_path / "nope.yml")]
    args += ["--port", "0", "--data-dir", str(tmp_path / "prom"), "--check"]
    refused(script("scripts/monitor.py", *args, check=False), "argument --alert-webhook", "--no-alertmanager")
    assert not (tmp_path / "prom").exists()


def test_monitor_refuses_an_alert_log_under_a_file_before_starting_anything(tmp_path):
    """--alert-log under a file (a typo for its folder) passed the folder check and failed in mkdir with
    a FileExistsError traceback, exit 1, once the sidecar had started. (With a missing rule file, the
    old code's next check named --rules.)"""
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    args = ["--alert-log", str(afile / "alerts.jsonl"), "--rules", str(tmp_path / "nope.yml")]
    args += ["--port", "0", "--data-dir", str(tmp_path / "prom"), "--check"]
    refused(
        script("scripts/monitor.py", *args, check=False), "argument --alert-log", f"{afile} is a file, not a folder"
    )
    assert afile.read_text() == "not a folder" and not (tmp_path / "prom").exists()


def test_evaluate_refuses_movielens_flags_without_source_movielens(tmp_path):
    """--movielens PATH or --protocol without --source movielens was ignored: the synthetic data was
    evaluated (minutes of training) instead of the MovieLens data named. (With --k past serving.max_k,
    the old code's next check named --k.)"""
    for flag, value in (("--movielens", str(tmp_path)), ("--protocol", "temporal")):
        args = [flag, value, "--k", "100000", "--out", str(tmp_path / "ev")]
        refused(script("scripts/evaluate.py", *args, check=False), f"argument {flag}", "only with --source movielens")
    refused(script("scripts/evaluate.py", "--spec", "x.yaml", "--protocol", "recbole", check=False), "--protocol")
    assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize(
    "module, later_mistake",
    [
        ("benchmark_training", ["--epochs", "1"]),
        ("benchmark_live", ["--events-per-s", "0"]),
        ("benchmark_serving", ["--requests", "0"]),
        ("benchmark_batching", ["--requests", "0"]),
    ],
)
def test_a_benchmark_refuses_an_out_it_could_not_write_before_it_runs(tmp_path, module, later_mistake):
    """--out naming a folder, or a path under a file, was written only after the whole benchmark (minutes
    to hours): an IsADirectoryError or FileExistsError traceback, the figures lost. (The old code went on
    to the later mistake given after it and named that flag.)"""
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for out, words in ((tmp_path, "is a folder, not a file"), (afile / "r.json", f"{afile} is a file, not a folder")):
        run = script("-m", f"benchmarks.{module}", "--out", str(out), *later_mistake, check=False)
        refused(run, "argument --out", words)
