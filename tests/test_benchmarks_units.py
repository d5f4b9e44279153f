"""Small checks of the benchmarks' own arithmetic and baselines (benchmarks/), no server."""

from __future__ import annotations

import traceback

import pytest


def test_the_pandas_baseline_of_the_workflow_benchmark_does_the_workflows_split(tmp_path):
    """benchmarks/benchmark_workflow.py compares the workflow with the same steps in pandas; the
    workflow holds out the last valid_fraction + test_fraction of time (train / valid / test), the
    baseline held out only valid_fraction (train / valid): a larger train part and no test part, so
    the two did different work and ``same_train_rows`` was false at every size."""
    from benchmarks.benchmark_workflow import generate, run_one

    generate(3000, tmp_path / "raw")
    workflow = run_one("workflow", tmp_path / "raw", tmp_path / "workflow", False)
    pandas = run_one("pandas", tmp_path / "raw", tmp_path / "pandas", False)
    rows = ("train_rows", "valid_rows", "test_rows")
    assert {r: pandas.get(r) for r in rows} == {r: workflow.get(r) for r in rows}


def test_the_holdout_alert_benchmark_takes_the_rate_its_help_names(monkeypatch, capsys):
    """benchmarks/benchmark_holdout_alert.py's help says each user's outcome is ``--rate`` in the
    holdout; the flag was not parsed (argparse exited 2), so every run simulated a rate of 0.7."""
    import json
    import sys

    from benchmarks import benchmark_holdout_alert

    argv = ["benchmark_holdout_alert", "--rate", "0.3", "--drops", "0", "--users-per-day", "2000"]
    monkeypatch.setattr(sys, "argv", [*argv, "--days", "1", "--runs", "5"])
    benchmark_holdout_alert.main()
    assert json.loads(capsys.readouterr().out)["rate"] == 0.3


def test_profile_serving_in_process_refuses_fewer_requests_than_its_warm_up(tmp_path, monkeypatch, capsys):
    """benchmarks/profile_serving.py --mode in-process leaves its first 20 requests (with --batch N: its
    first 2 batches) untimed; --requests 20 or fewer ran every stage and then failed in
    np.percentile on no timings (IndexError). It is a usage error now, said before the stages load."""
    import json
    import sqlite3
    import sys
    import types

    import numpy as np

    from benchmarks import profile_serving

    (tmp_path / "export.json").write_text(json.dumps({"version": 1}))
    (tmp_path / "feature_lookup" / "1").mkdir(parents=True)
    with sqlite3.connect(tmp_path / "feature_lookup" / "1" / "online_store.sqlite") as con:
        con.execute("CREATE TABLE user_features (user_id_raw INTEGER)")
        con.executemany("INSERT INTO user_features VALUES (?)", [(u,) for u in range(5)])
    con.close()

    class Stage:  # answers at once: the profile's own arithmetic is what is under test
        def __init__(self, folder):
            pass

        def run(self, x):
            return {}

        def run_batch(self, xs):
            return [{} for _ in xs]

        def close(self):  # as serving.stages.Stage: the profile closes each stage's stores
            pass

    fake = types.ModuleType("serving.stages")
    fake.FUNNEL, fake.STAGES = ("a", "b"), {"a": Stage, "b": Stage}
    monkeypatch.setitem(sys.modules, "serving.stages", fake)
    monkeypatch.setattr(sys.modules["serving"], "stages", fake, raising=False)
    for extra in ([], ["--batch", "4"]):
        monkeypatch.setattr(sys, "argv", ["profile_serving", str(tmp_path), "--requests", "8", *extra])
        with pytest.raises(SystemExit) as exited:
            profile_serving.main()
        assert exited.value.code == 2 and "warm-up" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["profile_serving", str(tmp_path), "--requests", "21"])
    profile_serving.main()  # one timed request is enough
    assert np.isfinite(float(capsys.readouterr().out.split("p99")[1].split()[0]))


def test_a_server_that_fails_requests_does_not_meet_the_serving_targets():
    """The serving and batching benchmarks judge latency and requests/s on answered requests only
    (``LoadReport.summary``); with no target on the failed ones, a server refusing 5% of its requests
    met every target."""
    from benchmarks.benchmark_batching import targets as batching_targets
    from benchmarks.benchmark_serving import targets as serving_targets

    fast = {"requests": 100, "ok": 100, "errors": 0, "requests_per_s": 2000.0, "p99_ms": 5.0}
    failing = {**fast, "ok": 95, "errors": 5}
    assert all(serving_targets(fast, fast, speedup=20.0, ndcg_ratio=1.0).values())
    judged = serving_targets(fast, failing, speedup=20.0, ndcg_ratio=1.0)
    assert judged["rps_ge_300"] and not judged["no_failed_requests"]
    row = {"batched": {"in_flight_1": fast, "in_flight_32": fast}}
    assert all(batching_targets(row, "batched").values())
    row["batched"]["in_flight_32"] = failing
    judged = batching_targets(row, "batched")
    assert judged["rps_ge_1000_at_32_in_flight"] and not judged["no_failed_requests"]


def stand_in_export(tmp_path):
    """An export with only what benchmark_live reads before it serves: 3 items, 5 known users."""
    import json
    import sqlite3

    import pandas as pd

    repo = tmp_path / "export"
    (repo / "ordering" / "1").mkdir(parents=True)
    (repo / "feature_lookup" / "1").mkdir(parents=True)
    (repo / "export.json").write_text(json.dumps({"version": 1}))
    pd.DataFrame({"item_id_raw": [7, 8, 9]}).to_parquet(repo / "ordering" / "1" / "item_features.parquet")
    with sqlite3.connect(repo / "feature_lookup" / "1" / "online_store.sqlite") as con:
        con.execute("CREATE TABLE user_features (user_id_raw INTEGER)")
        con.executemany("INSERT INTO user_features VALUES (?)", [(u,) for u in range(5)])
    con.close()
    return repo


class StandInServer:
    """No tritonserver: the benchmark's own handling of its processes and folders is under test."""

    grpc_url = "localhost:1"

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def cpu_seconds_by_process(self):
        return {}


class StandInWriter:
    """benchmark_live's writer process, stood in: ready at once, its figures queued."""

    def __init__(self, target, args, daemon=None):
        self.args = args

    def start(self):
        self.args[5].set()  # ready
        self.args[7].put({"writer_cpu_s": 0.1, "writer_seconds": 1.0})

    def join(self, timeout=None):
        pass


def test_the_live_benchmark_stops_its_writer_when_a_phase_fails(tmp_path, monkeypatch):
    """benchmarks/benchmark_live.py starts a writer process for each write phase and set its stop
    event only after the phase: a phase that raised (a load that failed, the fresh-history trials)
    left the writer writing, and, as a non-daemonic child, multiprocessing's exit handler then
    waited on it for ever, so the benchmark hung after its traceback."""
    import multiprocessing
    import queue
    import sys
    import threading

    import benchmarks.loadgen
    import deployment.server
    from benchmarks import benchmark_live
    from benchmarks.loadgen import LoadReport, Request, Result

    repo = stand_in_export(tmp_path)

    calls = []

    def run_load(url, requests, **kwargs):  # the warm-up, the first read-only phase, then a failure
        calls.append(len(requests))
        if len(calls) == 3:
            raise RuntimeError("the with-writes load failed")
        return LoadReport([Result(Request(1, 10), 0.01) for _ in requests], 0.1)

    started = []

    class Process:
        def __init__(self, target, args, daemon=None):
            self.target, self.args, self.daemon = target, args, daemon

        def start(self):
            started.append(self)
            self.args[5].set()  # ready

        def join(self, timeout=None):
            pass

    context = type("Context", (), {"Event": threading.Event, "Queue": queue.Queue, "Process": Process})
    monkeypatch.setattr(multiprocessing, "get_context", lambda method=None: context)
    monkeypatch.setattr(deployment.server, "TritonServer", StandInServer)
    monkeypatch.setattr(benchmarks.loadgen, "run_load", run_load)
    monkeypatch.setattr(sys, "argv", ["benchmark_live", "--repository", str(repo), "--workdir", str(tmp_path / "w")])
    with pytest.raises(RuntimeError, match="with-writes load failed"):
        benchmark_live.main()
    assert [p.target for p in started] == [benchmark_live.write_stream]
    writer = started[0]
    assert writer.args[6].is_set(), "the writer was left writing"
    assert writer.daemon, "a writer stuck before its stop would hold the interpreter's exit"


def test_a_perf_analyzer_timeout_does_not_print_the_admin_key(monkeypatch):
    """``subprocess.TimeoutExpired``'s message is the whole command line, which carries the admin key
    in its ``-H`` header: a benchmark that timed out printed the key in its traceback."""
    import subprocess

    from benchmarks import perf_analyzer

    def timeout(command, **kwargs):
        raise subprocess.TimeoutExpired(command, kwargs["timeout"])

    monkeypatch.setattr(perf_analyzer, "unavailable", lambda: None)
    monkeypatch.setattr(perf_analyzer, "binary", lambda: "perf_analyzer")
    monkeypatch.setattr(perf_analyzer, "library_path", lambda: "")
    monkeypatch.setattr(perf_analyzer.subprocess, "run", timeout)
    key = "the-secret-admin-key-" + "0123"  # a name in the traceback's source lines, not the value
    with pytest.raises(Exception) as err:
        perf_analyzer.run("localhost:8000", key, [1, 2], concurrency=1, timeout_s=5)
    assert "did not finish within 5 s" in str(err.value)
    assert key not in "".join(traceback.format_exception(err.value))


def test_the_live_benchmark_removes_its_temporary_folder(tmp_path, monkeypatch):
    """benchmarks/benchmark_live.py without --workdir copies the repository (or builds a world) in
    a temporary folder of its own and never removed it: every run left a copy of the export (at 1M
    items, gigabytes) in the system's temporary folder."""
    import multiprocessing
    import queue
    import sys
    import tempfile
    import threading

    import benchmarks.loadgen
    import deployment.server
    from benchmarks import benchmark_live
    from benchmarks.loadgen import LoadReport, Request, Result

    repo = stand_in_export(tmp_path)

    def run_load(url, requests, **kwargs):
        return LoadReport([Result(Request(1, 10), 0.01) for _ in requests], 0.1)

    made = tmp_path / "made-by-mkdtemp"
    context = type("Context", (), {"Event": threading.Event, "Queue": queue.Queue, "Process": StandInWriter})
    monkeypatch.setattr(multiprocessing, "get_context", lambda method=None: context)
    monkeypatch.setattr(deployment.server, "TritonServer", StandInServer)
    monkeypatch.setattr(benchmarks.loadgen, "run_load", run_load)
    monkeypatch.setattr(benchmark_live, "fresh_history_trials", lambda *args: {})
    monkeypatch.setattr(tempfile, "mkdtemp", lambda prefix=None: str(made.mkdir() or made))
    argv = ["benchmark_live", "--repository", str(repo), "--rounds", "1", "--no-same-cpu"]
    monkeypatch.setattr(sys, "argv", argv)
    benchmark_live.main()
    assert made.is_dir() is False, "the benchmark's temporary folder was left behind"


@pytest.mark.parametrize(
    "script, flag, value",
    [
        ("benchmark_serving", "--latency-requests", "0"),  # KeyError 'p50_ms' after the world and the server
        ("benchmark_serving", "--baseline-users", "0"),  # IndexError on eval_users[0] after serving
        ("benchmark_batching", "--latency-requests", "0"),  # KeyError 'p99_ms' in the targets, after every export
        ("benchmark_live", "--rounds", "0"),  # np.concatenate of no phase, after the server's warm-up
        ("benchmark_live", "--trials", "0"),  # np.percentile of no trial, in the last write phase
        ("benchmark_serving", "--users", "0"),  # ZeroDivisionError in measure_size
        ("benchmark_batching", "--users", "0"),  # ZeroDivisionError in measure_size
        ("benchmark_batching", "--max-batch-size", "0"),  # BatchingConfig's ValueError, after the world was built
        ("benchmark_batching", "--instances", "0"),  # the same
        ("benchmark_batching", "--fused-instances", "0"),  # the same
        ("benchmark_batching", "--warmup", "-1"),  # rng.choice's ValueError, after the world and the server
        ("benchmark_batching", "--max-queue-delay-us", "-1"),  # BatchingConfig's ValueError, after the world
        # the writer's pacing divided by the rate: 0 killed every writing thread (ZeroDivisionError) and the
        # "with_writes" phase ran with no writes, meeting the 1.2x target; below 0 it wrote unpaced
        ("benchmark_live", "--events-per-s", "0"),
        ("benchmark_live", "--events-per-s", "-5"),
        ("benchmark_live", "--events-per-s", "nan"),
    ],
)
def test_benchmark_counts_of_zero_are_usage_errors(script, flag, value, tmp_path, monkeypatch, capsys):
    """These counts were plain ints: 0 (or, for those that may be 0, -1) ran the benchmark's long part
    (a world built, a server started and loaded) and then failed on no measurement or on a config
    that refused it; they are argparse errors now."""
    import importlib
    import sys

    module = importlib.import_module(f"benchmarks.{script}")

    def not_reached(*args, **kwargs):
        raise AssertionError(f"{script} {flag} {value} went on to measure")

    monkeypatch.setattr(module, "measure_size", not_reached, raising=False)
    where = ["--repository", str(tmp_path / "no-such-export")] if script == "benchmark_live" else ["--sizes", "10"]
    monkeypatch.setattr(sys, "argv", [script, flag, value, *where])
    with pytest.raises(SystemExit) as exited:
        module.main()
    assert exited.value.code == 2 and flag in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--users", "0"), ("--users", "-5"), ("--items", "0"), ("--batch-size", "0")])
def test_the_training_benchmarks_counts_are_checked(flag, value, monkeypatch, capsys):
    """``benchmark_training --users 0`` (``--items``, ``--batch-size``) was read as "not given" and ran on the
    config's value without a word; a negative count failed later in the config. Both are usage errors."""
    import sys

    from benchmarks import benchmark_training

    def not_reached(*args, **kwargs):
        raise AssertionError(f"benchmark_training {flag} {value} went on to measure")

    monkeypatch.setattr(benchmark_training, "benchmark", not_reached)
    monkeypatch.setattr(sys, "argv", ["benchmark_training", flag, value])
    with pytest.raises(SystemExit) as exited:
        benchmark_training.main()
    assert exited.value.code == 2 and flag in capsys.readouterr().err


@pytest.mark.parametrize("script", ["benchmark_serving", "benchmark_batching"])
def test_the_serving_benchmarks_remove_their_temporary_folder(script, tmp_path, monkeypatch, capsys):
    """Without ``--workdir`` the serving and batching benchmarks build their worlds in a ``mkdtemp``
    folder; they removed each world in it but not the folder, so every run left one in /tmp."""
    import importlib
    import json
    import sys
    import tempfile

    module = importlib.import_module(f"benchmarks.{script}")
    made = tmp_path / "made-by-mkdtemp"
    monkeypatch.setattr(tempfile, "mkdtemp", lambda prefix=None: str(made.mkdir() or made))
    monkeypatch.setattr(module, "measure_size", lambda size, args, workdir: {"num_items_generated": size})
    monkeypatch.setattr(sys, "argv", [script, "--sizes", "10"])
    module.main()
    assert json.loads(capsys.readouterr().out)["sizes"] == [{"num_items_generated": 10}]
    assert made.is_dir() is False, "the benchmark's temporary folder was left behind"
    made.mkdir()  # --keep: the worlds stay where they are
    monkeypatch.setattr(tempfile, "mkdtemp", lambda prefix=None: str(made))
    monkeypatch.setattr(sys, "argv", [script, "--sizes", "10", "--keep"])
    module.main()
    assert made.is_dir()


def test_the_training_benchmark_writes_out_into_a_folder_not_made_yet(tmp_path, monkeypatch, capsys):
    """benchmarks/benchmark_training.py wrote ``--out`` with ``Path.write_text`` alone: an ``--out`` in
    a folder that did not exist yet (``build/`` in a fresh clone) failed with FileNotFoundError after
    the whole benchmark had run, and its figures were lost. The other benchmarks make the folder."""
    import json
    import sys
    import types

    import workflows.pipeline
    import workflows.sources.synthetic
    from benchmarks import benchmark_training

    class Data:
        def write_parquet(self, folder):
            return {"events": None, "users": None, "items": None}

    processed = types.SimpleNamespace(train=lambda: None)
    monkeypatch.setitem(sys.modules, "tensorflow_recommenders", types.SimpleNamespace(__version__="0"))
    monkeypatch.setattr(workflows.sources.synthetic, "generate", lambda config: Data())
    monkeypatch.setattr(workflows.pipeline, "run_dataset_pipeline", lambda *args: processed)
    monkeypatch.setattr(benchmark_training, "benchmark", lambda *args, **kwargs: {"examples": 1})
    out = tmp_path / "build" / "bench.json"
    monkeypatch.setattr(sys, "argv", ["benchmark_training", "--out", str(out)])
    benchmark_training.main()
    assert json.loads(out.read_text())["examples"] == 1
    assert json.loads(capsys.readouterr().out)["examples"] == 1


@pytest.mark.parametrize("effect", ["0", "-0.1", "nan"])
def test_the_holdout_alert_benchmark_refuses_an_effect_that_is_not_positive(effect, monkeypatch, capsys):
    """``--effect`` is the gap the sequential test's mixture is tuned to: at 0 or below its p-value is
    NaN and the sequential rule never fired, so the benchmark reported 0 alerts even at a 25% drop
    (which the one-look rule caught in every run), as if the rule had no false alarms and no power."""
    import sys

    from benchmarks import benchmark_holdout_alert

    argv = ["benchmark_holdout_alert", "--effect", effect, "--drops", "0.25", "--users-per-day", "10000"]
    monkeypatch.setattr(sys, "argv", [*argv, "--days", "2", "--runs", "5"])
    with pytest.raises(SystemExit) as exited:
        benchmark_holdout_alert.main()
    assert exited.value.code == 2 and "--effect" in capsys.readouterr().err


def test_the_workflow_benchmark_finds_a_relative_work_folder_from_another_folder(tmp_path, monkeypatch, capsys):
    """benchmarks/benchmark_workflow.py runs each implementation in a child process started in the
    repository's root, and passed it ``--work``'s folders as given: ``--work scratch`` from any other
    folder generated the data in ``./scratch`` and the children read ``<repository>/scratch`` (no
    such input: the workflow failed and the benchmark exited 1)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from benchmarks import benchmark_workflow

    seen = []

    def run(cmd, cwd=None, **kwargs):
        raw = Path(cwd) / cmd[cmd.index("--_raw") + 1]  # where the child, in cwd, reads
        seen.append(raw)
        counts = {"seconds": 1.0, "peak_rss_mb": 1.0, "train_rows": 1} if raw.is_dir() else {}
        return subprocess.CompletedProcess(cmd, 0 if counts else 1, json.dumps(counts), "no input")

    def generate(events, folder):
        folder.mkdir(parents=True)
        return {"events": events, "users": 1, "items": 1}

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(benchmark_workflow, "generate", generate)
    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(sys, "argv", ["benchmark_workflow", "--sizes", "10", "--work", "scratch"])
    benchmark_workflow.main()
    assert seen and all(raw == tmp_path / "scratch" / "10" / "raw" for raw in seen), seen
    assert json.loads(capsys.readouterr().out)["sizes"][0]["same_train_rows"] is True


def test_a_level_with_no_answered_request_fails_its_targets_instead_of_crashing():
    """``LoadReport.summary`` has no percentiles when no request was answered; the serving and batching
    benchmarks' targets read ``p99_ms`` (and the serving one divided by ``p50_ms``) unguarded, so a
    server that failed every request of a level ended the run with KeyError after every configuration
    had been measured, and its figures were never printed."""
    from benchmarks.benchmark_batching import targets as batching_targets
    from benchmarks.benchmark_serving import targets as serving_targets
    from benchmarks.loadgen import LoadReport, Request, Result

    refused = LoadReport([Result(Request(1, 10), 0.001, error="refused") for _ in range(4)], 0.1).summary()
    assert "p99_ms" not in refused and refused["requests_per_s"] == 0
    fast = {"requests": 100, "ok": 100, "errors": 0, "requests_per_s": 2000.0, "p99_ms": 5.0}
    row = {"unbatched": {"in_flight_1": fast}, "batched": {"in_flight_1": refused, "in_flight_32": refused}}
    judged = batching_targets(row, "batched")
    assert not any(judged.values()), judged
    judged = serving_targets(refused, refused, speedup=None, ndcg_ratio=1.0)
    assert not (judged["p99_le_10ms"] or judged["speedup_ge_10x"] or judged["no_failed_requests"])


def test_the_machine_context_names_the_cpu_and_the_versions_that_decide_the_figures():
    """The benchmarks recorded the CPU count (and some Python, the GPU count or TensorFlow's version):
    nothing named the CPU model or the versions of numpy, Merlin, faiss, tritonclient or the
    tritonserver wheel, so two JSON files could not say whether they were taken with the same stack.
    ``benchmarks.machine()`` did not exist."""
    from importlib.metadata import version

    from benchmarks import machine

    context = machine()
    assert {"cpus", "cpu_model", "gpus", "gpu_models", "python", "platform", "versions"} <= set(context)
    assert context["gpus"] == len(context["gpu_models"])
    versions = context["versions"]
    wanted = {"numpy", "pandas", "dask", "tensorflow", "merlin-core", "nvtabular", "faiss"}
    assert wanted | {"nvidia-pytriton", "tritonclient", "cudf"} <= set(versions)
    for name in ("numpy", "pandas", "nvtabular", "merlin-core", "nvidia-pytriton", "tritonclient"):
        assert versions[name] == version(name), name
    assert versions["tensorflow"] and versions["faiss"]  # tensorflow-cpu, faiss-cpu here: named as such


def _figures_of(script, tmp_path, monkeypatch, capsys) -> dict:
    """Run ``benchmarks.<script>``'s main with its measuring stood in for; the JSON it printed."""
    import importlib
    import json
    import subprocess
    import sys
    import types

    module = importlib.import_module(f"benchmarks.{script}")
    argv = [script, "--sizes", "10", "--workdir", str(tmp_path / "w")]
    if script in ("benchmark_serving", "benchmark_batching"):
        monkeypatch.setattr(module, "measure_size", lambda size, args, workdir: {"num_items_generated": size})
    elif script == "benchmark_workflow":

        def run(cmd, **kwargs):
            counts = {"seconds": 1.0, "peak_rss_mb": 1.0, "train_rows": 1}
            return subprocess.CompletedProcess(cmd, 0, json.dumps(counts), "")

        monkeypatch.setattr(module, "generate", lambda events, folder: {"events": events, "users": 1, "items": 1})
        monkeypatch.setattr(subprocess, "run", run)
        argv = [script, "--sizes", "10", "--work", str(tmp_path / "w")]
    else:  # benchmark_training
        import workflows.pipeline
        import workflows.sources.synthetic

        data = types.SimpleNamespace(write_parquet=lambda folder: {"events": None, "users": None, "items": None})
        monkeypatch.setitem(sys.modules, "tensorflow_recommenders", types.SimpleNamespace(__version__="0"))
        monkeypatch.setattr(workflows.sources.synthetic, "generate", lambda config: data)
        monkeypatch.setattr(
            workflows.pipeline, "run_dataset_pipeline", lambda *a: types.SimpleNamespace(train=lambda: None)
        )
        monkeypatch.setattr(module, "benchmark", lambda *args, **kwargs: {"examples": 1})
        argv = [script]
    monkeypatch.setattr(sys, "argv", argv)
    module.main()
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    "script", ["benchmark_serving", "benchmark_batching", "benchmark_workflow", "benchmark_training"]
)
def test_every_benchmarks_json_carries_the_machine_context(script, tmp_path, monkeypatch, capsys):
    """Each benchmark's JSON has ``machine``, ``benchmarks.machine()``: serving and batching had only
    ``machine_cpus``, the workflow CPUs, Python and GPUs, training TensorFlow's and TFRS's versions."""
    from benchmarks import machine

    figures = _figures_of(script, tmp_path, monkeypatch, capsys)
    assert figures["machine"]["versions"] == machine()["versions"]
    assert figures["machine"]["cpu_model"] == machine()["cpu_model"]


def test_the_live_benchmarks_json_carries_the_machine_context(tmp_path, monkeypatch, capsys):
    """benchmarks/benchmark_live.py recorded no machine at all (not even the CPU count)."""
    import json
    import multiprocessing
    import queue
    import sys
    import threading

    import benchmarks.loadgen
    import deployment.server
    from benchmarks import benchmark_live, machine
    from benchmarks.loadgen import LoadReport, Request, Result

    repo = stand_in_export(tmp_path)

    context = type("Context", (), {"Event": threading.Event, "Queue": queue.Queue, "Process": StandInWriter})
    monkeypatch.setattr(multiprocessing, "get_context", lambda method=None: context)
    monkeypatch.setattr(deployment.server, "TritonServer", StandInServer)
    run_load = lambda url, requests, **kwargs: LoadReport([Result(Request(1, 10), 0.01) for _ in requests], 0.1)  # noqa: E731
    monkeypatch.setattr(benchmarks.loadgen, "run_load", run_load)
    monkeypatch.setattr(benchmark_live, "fresh_history_trials", lambda *args: {})
    argv = ["benchmark_live", "--repository", str(repo), "--workdir", str(tmp_path / "w"), "--rounds", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--no-same-cpu"])
    benchmark_live.main()
    assert json.loads(capsys.readouterr().out)["machine"]["versions"] == machine()["versions"]


@pytest.mark.parametrize("size", ["0", "-5"])
def test_the_workflow_benchmark_refuses_sizes_below_one(size, tmp_path, monkeypatch, capsys):
    """``benchmark_workflow --sizes 0`` (or below) generated the synthetic minimum (100 users, 6,000
    events) and reported it as the size asked for; it is a usage error now, as in the other benchmarks."""
    import sys

    from benchmarks import benchmark_workflow

    def not_reached(*args, **kwargs):
        raise AssertionError(f"--sizes {size} went on to generate")

    monkeypatch.setattr(benchmark_workflow, "generate", not_reached)
    monkeypatch.setattr(sys, "argv", ["benchmark_workflow", "--sizes", size, "--work", str(tmp_path)])
    with pytest.raises(SystemExit) as exited:
        benchmark_workflow.main()
    assert exited.value.code == 2 and "--sizes" in capsys.readouterr().err


def test_the_workflow_benchmark_writes_out_as_the_others_do(tmp_path, monkeypatch, capsys):
    """benchmark_workflow had no ``--out`` (argparse exited 2 on it): its JSON went to stdout only. It
    takes one now, checked before the run (a folder is refused) and made where missing."""
    import json
    import subprocess
    import sys

    from benchmarks import benchmark_workflow

    monkeypatch.setattr(sys, "argv", ["benchmark_workflow", "--sizes", "10", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exited:
        benchmark_workflow.main()
    assert exited.value.code == 2 and "is a folder" in capsys.readouterr().err

    def run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 0, json.dumps({"seconds": 1.0, "train_rows": 1}), "")

    monkeypatch.setattr(benchmark_workflow, "generate", lambda events, folder: {"events": events})
    monkeypatch.setattr(subprocess, "run", run)
    out = tmp_path / "build" / "workflow.json"
    monkeypatch.setattr(
        sys, "argv", ["benchmark_workflow", "--sizes", "10", "--work", str(tmp_path), "--out", str(out)]
    )
    benchmark_workflow.main()
    assert json.loads(out.read_text()) == json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text())["sizes"][0]["events"] == 10
