"""The fused funnel (``serving.batching.fuse_stages``, ``serving/fused.py``): every stage inside one
Triton model, one hop per request. Its export is complete and served by the same ensembles, and it
answers every request as the seven-model funnel does: in process, one at a time and in a batch, and
through the real tritonserver, alone and in a burst, with every stage's metrics still published."""

import time

import numpy as np
import pandas as pd
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from configs import BatchingConfig
from deployment.export import STAGE_ARTIFACTS, check_complete, export_repository, version_models
from serving import stages
from serving.fused import CANDIDATE_STAGES
from serving.interface import FUNNEL, FUNNEL_OUTPUTS, FUSED, ROUTER, ensemble_name, names, stage_folder
from tests.test_batching import SCORE_TOLERANCE, assert_same_outputs


def parsed(path) -> mc.ModelConfig:
    config = mc.ModelConfig()
    text_format.Parse(path.read_text(), config)
    return config


def assert_same_response(expected: dict, got: dict, where: str) -> None:
    """The funnel's response tensors equal (scores to 1e-6, as batching allows)."""
    response = names(FUNNEL_OUTPUTS)
    assert_same_outputs({n: expected[n] for n in response}, {n: got[n] for n in response}, where)


@pytest.fixture(scope="module")
def fused_repo(model_version, tmp_path_factory):
    batching = BatchingConfig(fuse_stages=True, instances=2, max_queue_delay_us=200)
    return export_repository(model_version, tmp_path_factory.mktemp("fused") / "triton_repo", batching=batching)


@pytest.fixture(scope="module")
def requests(model_version):
    users = pd.read_parquet(model_version.path / "user_features.parquet")["user_id_raw"].astype(int).tolist()[:24]
    out = [{"user_id": np.array([u], dtype=np.int64), "k": np.array([10], dtype=np.int32)} for u in users]
    out.append({"user_id": np.array([10**9], dtype=np.int64), "k": np.array([5], dtype=np.int32)})  # unknown
    out[2]["exclude_item_ids"] = np.array([1, 2, 3], dtype=np.int64)
    return out


@pytest.fixture(scope="module")
def staged_answers(triton_repo, model_version, requests):
    """Each request through the seven stage classes of the default export, one after the other."""
    v = model_version.version
    funnel = [stages.STAGES[name](stage_folder(triton_repo, name, v)) for name in stages.FUNNEL]
    answers = []
    for request in requests:
        x = dict(request)
        for stage in funnel:
            x.update(stage.run(x))
        answers.append(x)
    return answers


@pytest.mark.slow
def test_the_fused_export_is_one_model_behind_the_same_ensembles(fused_repo, model_version):
    v = str(model_version.version)
    check_complete(fused_repo, v)
    assert version_models(fused_repo, v) == [FUSED]
    assert not any((fused_repo / stage).exists() for stage in STAGE_ARTIFACTS)  # no idle stage models
    for stage in STAGE_ARTIFACTS:  # every stage's artifacts, in the fused model's version folder
        assert stage_folder(fused_repo, stage, v) == fused_repo / FUSED / v / stage
    model = parsed(fused_repo / FUSED / "config.pbtxt")
    assert model.max_batch_size == 64 and model.dynamic_batching.max_queue_delay_microseconds == 200
    assert [g.count for g in model.instance_group] == [2]
    for ensemble in (FUNNEL, ensemble_name(v)):
        config = parsed(fused_repo / ensemble / "config.pbtxt")
        (step,) = config.ensemble_scheduling.step
        assert (step.model_name, step.model_version) == (FUSED, int(v))
        assert set(step.input_map) == {t.name for t in config.input} == set(step.input_map.values())
        assert set(step.output_map) == {t.name for t in config.output} == set(step.output_map.values())
    # A missing artifact is named: a fused export is checked as thoroughly as a staged one.
    index = stage_folder(fused_repo, "retrieval", v) / "item_index.faiss"
    index.rename(index.with_suffix(".moved"))
    try:
        with pytest.raises(RuntimeError, match="retrieval/item_index.faiss is missing"):
            check_complete(fused_repo, v)
    finally:
        index.with_suffix(".moved").rename(index)


@pytest.mark.slow
def test_the_fused_funnel_answers_as_the_stages_do_alone_and_in_a_batch(
    fused_repo, model_version, requests, staged_answers
):
    from serving.fused import FusedFunnel

    fused = FusedFunnel(fused_repo / FUSED / str(model_version.version))
    try:
        batched = fused.run_batch(requests)
        assert set(fused.timings) == set(stages.FUNNEL) and all(t > 0 for t in fused.timings.values())
        for i, (request, expected, in_batch) in enumerate(zip(requests, staged_answers, batched)):
            assert_same_response(expected, fused.run(request), f"request {i} alone")
            assert_same_response(expected, in_batch, f"request {i} in the batch")
    finally:
        fused.close()
    assert {a["served_by"][0] for a in staged_answers} == {b"model", b"fallback"}


@pytest.mark.slow
def test_the_served_fused_funnel_answers_as_the_stages_do(fused_repo, requests, staged_answers, tmp_path):
    """Through the real tritonserver: one request at a time, then a burst (batched: fewer
    executions than requests) with a malformed request that fails alone, named; and every stage's
    own metrics, as the seven-model funnel publishes them."""
    from benchmarks.loadgen import Request, counted, run_load, settled_statistics, wait_until_counted
    from deployment.security import ControlClient
    from deployment.server import TritonServer
    from serving.client import BadRequest, FunnelClient
    from serving.metrics import scrape

    users = [int(r["user_id"][0]) for r in requests]
    expected = {u: a for u, a in zip(users, staged_answers) if "exclude_item_ids" not in requests[users.index(u)]}
    with TritonServer(fused_repo, log_path=tmp_path / "server.log") as server:
        with FunnelClient(server.grpc_url) as client:
            for user, answer in expected.items():
                got = client.recommend(user, int(answer["k"][0]))
                assert got.item_ids == answer["item_ids"].tolist(), user
                np.testing.assert_allclose(got.scores, answer["scores"], rtol=0, atol=SCORE_TOLERANCE)
                assert got.served_by == answer["served_by"][0].decode()
                assert list(got.stage_counts.values()) == answer["stage_counts"].tolist()
            with pytest.raises(BadRequest, match="k must be between"):
                client.recommend(users[0], 0)
        with ControlClient(server.grpc_url, fused_repo) as control:
            before = settled_statistics(control, FUSED)  # the earlier requests all counted
            burst = [Request(u, int(expected[u]["k"][0])) for u in expected for _ in range(3)]
            burst.append(Request(users[0], 10, malformed="k_zero"))
            report = run_load(server.grpc_url, burst, concurrency=32)
            wait_until_counted(control, FUSED, counted(before) + len(burst))
            after = control.get_inference_statistics(FUSED, as_json=True)["model_stats"]
        inferences = counted(after) - counted(before)
        executions = counted(after, "execution_count") - counted(before, "execution_count")
        assert inferences == len(burst) and executions < inferences
        for result in report.results:
            if result.request.malformed:
                assert result.error and "INVALID_ARG" in result.error and "k must be between" in result.error
                continue
            assert result.error is None, result.error
            answer = expected[result.request.user_id]
            assert result.outputs["item_ids"].tolist() == answer["item_ids"].tolist()
            np.testing.assert_allclose(result.outputs["scores"], answer["scores"], rtol=0, atol=SCORE_TOLERANCE)
        served = len(expected) * 4  # alone, then three times each in the burst
        # A user the models never saw skips the candidate stages, which do not count their requests.
        unknown = 4 * sum(1 for a in expected.values() if not a["user_known"][0])
        want = {stage: served - (unknown if stage in CANDIDATE_STAGES else 0) for stage in stages.FUNNEL}
        metrics = {}
        for _ in range(50):  # the stub sends its queued updates at most every metrics_interval_s
            metrics = scrape(server.metrics_url)
            counts = {
                labels["stage"]: v for labels, v in metrics.get("funnel_stage_latency_ms_count", []) if labels["stage"]
            }
            if all(counts.get(stage) == want[stage] for stage in stages.FUNNEL) and counts.get(FUSED) == 2:
                break
            time.sleep(0.2)
        assert {stage: counts.get(stage) for stage in stages.FUNNEL} == want and unknown > 0
        errors = {
            (labels["stage"], labels["kind"]): v for labels, v in metrics.get("funnel_stage_errors_total", []) if v
        }
        assert errors == {(FUSED, "bad_request"): 2.0}  # counted once, by the model that refused it
        fallbacks = sum(v for _, v in metrics.get("funnel_fallback_total", []))
        assert fallbacks == 4 * sum(1 for a in expected.values() if a["served_by"][0] == b"fallback") > 0
        # The A/B router calls funnel_v<N>, now one step through the fused funnel, and takes feedback
        # (last: the click reaches the live store, and so the user's later lists).
        with FunnelClient(server.grpc_url, model_name=ROUTER) as router:
            user = next(iter(expected))
            routed = router.recommend(user, 10)
            assert routed.item_ids == expected[user]["item_ids"].tolist() and routed.arm and routed.request_id
            assert router.send_feedback(routed.request_id, [routed.item_ids[0]], ["click"], [1.0]) == 1
            assert routed.item_ids[0] not in router.recommend(user, 10).item_ids
        check_perf_analyzer(server, fused_repo, users)


def check_perf_analyzer(server, repo, users) -> None:
    """Triton's C++ load generator (the benchmark's ``--perf-analyzer``) drives the locked server:
    it needs the admin key to read the model's configuration, every request it sends is served, and
    it reports latencies as it measured them. The batching benchmark's reading of Triton's
    statistics counts those requests, and its CPU split charges them to the fused model's stubs and
    to tritonserver."""
    import os

    from benchmarks import perf_analyzer
    from benchmarks.benchmark_batching import cpu_between, served_requests, settled_stage_stats, stage_stats
    from deployment.security import ControlClient

    if reason := perf_analyzer.unavailable():
        pytest.skip(reason)
    with pytest.raises(RuntimeError, match="restricted"):
        perf_analyzer.run(server.http_url, "not-the-key", users, concurrency=2, window_requests=50)
    with ControlClient(server.grpc_url, repo) as control:
        before, cpu, started = stage_stats(control), server.cpu_seconds_by_process(), time.perf_counter()
        # Any three windows will do: the suite's other workers share the cores, so windows of 100
        # requests need not agree (the full suite once failed at perf_analyzer's 25% default).
        measured = perf_analyzer.run(
            server.http_url, server.admin_key, users, concurrency=4, window_requests=100, stability_percent=999
        )
        after = settled_stage_stats(control, FUSED)  # perf_analyzer's last responses are counted after they are sent
        inference_count = sum(
            int(m["inference_count"]) for m in control.get_inference_statistics(FUSED, as_json=True)["model_stats"]
        )
    served = served_requests(before, after)
    assert served >= 300  # at least three windows of 100
    assert after[FUSED]["requests"] == inference_count  # the statistics the benchmark reads are Triton's
    cores = cpu_between(cpu, server.cpu_seconds_by_process(), served, time.perf_counter() - started)
    assert cores["server_cpu_ms_per_request"][FUSED] > 0 and cores["server_cpu_ms_per_request"]["tritonserver"] > 0
    assert 0 < cores["server_cores_busy"] <= os.cpu_count()
    assert measured["requests_per_s"] > 0 and 0 < measured["p50_ms"] <= measured["p99_ms"]
    assert measured["client_cores_busy"] > 0


@pytest.mark.slow
def test_the_fused_funnel_reads_what_users_just_did_and_what_was_taken_down(model_version, requests, tmp_path):
    """The stages inside the fused funnel use the live store of the repository that holds it, as
    the stage models do (docs/live-features.md): a watched item leaves the user's next list, a
    taken-down item leaves every list, the popularity fallback's too. (An export of its own: the
    other tests compare the module's fused export with a store that holds no live events.)"""
    from serving.fused import FusedFunnel
    from workflows.live_store import LiveStore, store_location

    repo = export_repository(model_version, tmp_path / "triton_repo", batching=BatchingConfig(fuse_stages=True))
    fused = FusedFunnel(repo / FUSED / str(model_version.version))
    store = LiveStore(store_location(repo))
    try:
        known, unknown = requests[0], requests[-1]
        user = int(known["user_id"][0])
        watched = int(fused.run(known)["item_ids"][0])
        store.append_events([(user, watched, time.time(), "view", 1.0)], "ingest")
        after = fused.run(known)["item_ids"].tolist()
        assert watched not in after
        popular = int(fused.run(unknown)["item_ids"][0])
        for item in (after[0], popular):
            store.set_takedown(item, True, "test: unsafe", "tests")
        time.sleep(fused.stages[-1].live_config.takedown_refresh_s + 0.2)
        served = fused.run(known)
        assert after[0] not in served["item_ids"].tolist()
        # dropped by the filters, before the light ranker's cut (the fused filters read the same store)
        assert after[0] not in fused.stages[-1].raw_ids[served["filtered_ids"]].tolist()
        assert popular not in fused.run(unknown)["item_ids"].tolist()
    finally:
        store.close()
        fused.close()


class _Pb:
    """The parts of ``triton_python_backend_utils`` the adapter's ``execute_batch`` calls."""

    class TritonError:
        INVALID_ARG, INTERNAL = "invalid", "internal"

        def __init__(self, message, code):
            self.message, self.code = message, code

    class Logger:
        @staticmethod
        def log_warn(message):
            pass

    @staticmethod
    def get_input_tensor_by_name(request, name):
        value = request.get(name)
        return None if value is None else type("T", (), {"as_numpy": lambda self: value})()

    @staticmethod
    def Tensor(name, value):  # noqa: N802  (pb_utils' spelling)
        return name, value

    @staticmethod
    def InferenceResponse(output_tensors, error=None):  # noqa: N802
        return output_tensors, error


def test_a_batch_served_one_by_one_charges_each_stage_the_time_it_spent_on_the_batch():
    """A batch holding a malformed request falls back to one request at a time: the fused funnel ran
    every stage for the failed batch and for each request alone, and a stage model charges that
    whole time to each request it served (``StageModel.execute_batch``). The fused model charged the
    time of one request's run (the last that succeeded): latency panels read a fraction of it."""
    from serving.fused import FusedFunnel
    from serving.request import RequestError
    from serving.triton_model import FusedFunnelModel

    class Slow:
        inputs = outputs = ()

        def __init__(self, name):
            self.name = name

        def run(self, x):
            time.sleep(0.01)
            if int(x["k"][0]) == 0:
                raise RequestError("k must be between 1 and 100, got 0")
            return {}

        def run_batch(self, xs):
            return [self.run(x) for x in xs]

    fused = FusedFunnel.__new__(FusedFunnel)
    fused.stages, fused.timings, fused.spent = [Slow("a"), Slow("b")], {}, {"a": 0.0, "b": 0.0}
    model = FusedFunnelModel.__new__(FusedFunnelModel)
    model.pb, model.stage, model.input_names, model.outputs, model.batching = _Pb, fused, ["k"], [], True
    recorded = []
    model.metrics = type("M", (), {"observe": lambda self, *args: recorded.append(args)})()
    requests = [{"k": np.array([[k]], dtype=np.int32)} for k in (5, 5, 5, 0)]
    responses = model.execute(requests)
    assert [error is None for _, error in responses] == [True, True, True, False]
    served = [seconds for seconds, _, error_kind in recorded if error_kind is None]
    # "a" ran 4 requests in the failed batch and 4 alone (80 ms), "b" the 3 served alone; one run is 10 ms.
    assert len(served) == 3 and all(s["a"] >= 0.075 and s["b"] >= 0.025 for s in served), served


def test_closing_the_fused_funnel_or_a_stage_closes_every_store_it_opened(tmp_path):
    """The feature lookup's live store and the ordering stage's takedown store were never closed:
    ``FusedFunnel.close`` closed each stage's ``.store`` only (the lookup's online store), and no
    stage had a ``close`` of its own, so in-process users (offline evaluation, the tuning step,
    notebooks) kept their SQLite/PostgreSQL connections open until garbage collection."""
    import json
    import sqlite3

    from models.registry import MANIFEST
    from serving.fused import FusedFunnel
    from serving.online_store import build_online_store
    from workflows.live_store import LiveStore

    ids = np.arange(5)
    items = pd.DataFrame({"item_id": ids, "item_id_raw": ids + 1000})
    manifest = {"version": 1, "features": {"user_categorical": [], "user_continuous": []}, "config": {"serving": {}}}
    folders = {name: tmp_path / name / "1" for name in ("feature_lookup", "ordering")}
    for folder in folders.values():
        folder.mkdir(parents=True)
        (folder / MANIFEST).write_text(json.dumps(manifest))
    empty = pd.DataFrame({"user_id_raw": pd.Series(dtype="int64"), "item_id_raw": pd.Series(dtype="int64")})
    build_online_store(folders["feature_lookup"] / "online_store.sqlite", empty[["user_id_raw"]], [], [], empty, items)
    items.to_parquet(folders["ordering"] / "item_features.parquet")
    pd.DataFrame({"item_id": ids + 1000, "score": np.ones(5, np.float32)}).to_parquet(
        folders["ordering"] / "popularity.parquet"
    )
    live = str(tmp_path / "live.sqlite")
    LiveStore(live).close()

    def built():
        return (
            stages.FeatureLookup(folders["feature_lookup"], live_store=live),
            stages.Ordering(folders["ordering"], live_store=live),
        )

    def connections(lookup, ordering):
        return {
            "online store": lookup.store._con,
            "live store (feature lookup)": lookup.live.db._con,
            "live store (takedowns)": ordering.takedowns.store.db._con,
        }

    def still_open(cons) -> list[str]:
        out = []
        for name, con in cons.items():
            try:
                con.execute("SELECT 1")
                out.append(name)
            except sqlite3.ProgrammingError:  # "Cannot operate on a closed database."
                pass
        return out

    fused = FusedFunnel.__new__(FusedFunnel)
    fused.stages = list(built())
    cons = connections(*fused.stages)
    assert still_open(cons) == list(cons)
    fused.close()
    assert still_open(cons) == []  # old code: both live stores still open
    fused.close()  # idempotent

    lookup, ordering = built()
    cons = connections(lookup, ordering)
    lookup.close(), ordering.close()  # old code: AttributeError, no close
    assert still_open(cons) == []
    lookup.close(), ordering.close()
    stages.Ordering(folders["ordering"]).close()  # outside an exported repository: no live store to close


def test_a_taken_down_item_is_filtered_before_the_light_ranker_and_takes_none_of_its_places(tmp_path, monkeypatch):
    """Takedowns were dropped by the ordering stage alone, after both rankers: a taken-down candidate
    the light ranker liked took one of its ``light_ranker_k`` places, and the heavy ranker (and the
    list built from it) got one live candidate fewer. The filters stage drops them now, with the seen
    and the excluded items, a duplicate's id as its item's; nothing changes where nothing is down."""
    import json

    from models.registry import MANIFEST
    from serving.item_aliases import FILE as ALIASES
    from workflows.live_store import STORE_ENV, LiveStore, store_location

    monkeypatch.delenv(STORE_ENV, raising=False)
    ids = np.arange(10)
    repo = tmp_path / "triton_repo"  # an exported repository: its stages read the store beside it
    folder = repo / "filtering" / "1"
    folder.mkdir(parents=True)
    (repo / "export.json").write_text("{}")
    features = {"user_categorical": [], "user_continuous": []}
    manifest = {"version": 1, "features": features, "config": {"serving": {"live": {"takedown_refresh_s": 0.001}}}}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    pd.DataFrame({"item_id": ids, "item_id_raw": ids + 1000}).to_parquet(folder / "item_features.parquet")
    pd.DataFrame({"item_id_raw": [9005], "canonical_item_id_raw": [1005]}).to_parquet(folder / ALIASES)
    store = LiveStore(store_location(repo))
    filtering = stages.Filtering(folder)  # as Triton's model.py builds it
    request = {
        "candidate_ids": np.array([3, 0, 5, 7, 1, 2], dtype=np.int64),  # retrieval's order
        "seen_items": np.array([0], dtype=np.int64),
        "exclude_item_ids": np.array([1002], dtype=np.int64),
    }
    try:
        untouched = filtering.run(request)["filtered_ids"].tolist()
        assert untouched == [3, 5, 7, 1]  # nothing down: what the filters always gave
        store.set_takedown(1003, True, "unsafe", "tests")
        store.set_takedown(9005, True, "a copy of an unsafe item", "tests")  # the duplicate's id of 1005
        store.set_takedown(4242, True, "not in this catalog", "tests")
        time.sleep(0.01)  # past the list's refresh (1 ms here)
        filtered = filtering.run(request)["filtered_ids"]
        assert filtered.tolist() == [7, 1]  # old code: [3, 5, 7, 1], left to the ordering stage
        # The light ranker's cut is over live candidates only: its best 2 are both servable.
        light = stages.LightRanker.__new__(stages.LightRanker)
        light.keep = 2
        scores = np.array([0.9, 0.8], dtype=np.float32)
        assert light._keep_best(filtered, scores)["light_ids"].tolist() == [7, 1]
        store.set_takedown(1003, False, "appeal upheld", "tests")
        time.sleep(0.01)
        assert filtering.run(request)["filtered_ids"].tolist() == [3, 7, 1]
    finally:
        store.close()
        filtering.close()
        filtering.close()  # idempotent
    (repo / "export.json").unlink()
    assert stages.Filtering(folder).takedowns is None  # outside an exported repository: no live store
    given = stages.Filtering(folder, live_store=store_location(repo))  # as the fused funnel builds it
    assert given.run(request)["filtered_ids"].tolist() == [3, 7, 1]  # 1005 still down (by its copy 9005)
    given.close()


class _Recording(stages.Stage):
    """A stand-in stage: answers its outputs from ``answer`` and records the users it ran for."""

    def __init__(self, name, outputs, answer, calls):
        self.name, self.outputs, self.answer, self.calls = name, outputs, answer, calls

    def run(self, inputs):
        self.calls.append((self.name, int(inputs["user_id"][0])))
        return self.answer(inputs)


def test_the_fused_funnel_skips_the_candidate_stages_for_a_user_the_models_never_saw():
    """The ordering stage answers a user the models never saw from their history or the popularity
    fallback and reads none of the candidate stages' lists for them, yet the fused funnel ran the query
    tower, retrieval, the filters and both rankers on the user's out-of-vocabulary features (3.0 ms of
    a 3.0 ms request in process on the test world; 0.12 ms without). Now it skips them: alone and in a
    batch beside a known user, whose stages still run, and those stages' metrics do not count it."""
    from serving.fused import FusedFunnel
    from serving.metrics import SKIPPED_STAGES, FusedMetrics

    calls = []
    users = {1: True, 2: False}

    def answer_of(stage):
        if stage is stages.FeatureLookup:
            return lambda x: {"user_known": np.array([users[int(x["user_id"][0])]])}
        if stage is stages.Ordering:
            return lambda x: {"stage_counts": np.array([9, len(x["candidate_ids"]), 0, 0, 1])}
        dtypes = {"FP32": np.float32, "INT64": np.int64}
        return lambda x: {t.name: np.ones(3, dtype=dtypes[t.dtype]) for t in stage.outputs}

    fused = FusedFunnel.__new__(FusedFunnel)
    fused.stages = [_Recording(n, stages.STAGES[n].outputs, answer_of(stages.STAGES[n]), calls) for n in stages.FUNNEL]
    fused.spent = {n: 0.0 for n in stages.FUNNEL}
    request = {u: {"user_id": np.array([u], dtype=np.int64), "k": np.array([1], dtype=np.int32)} for u in users}

    unknown = fused.run(request[2])
    assert calls == [("feature_lookup", 2), ("ordering", 2)]
    assert set(fused.timings) == {"feature_lookup", "ordering"}
    assert unknown["candidate_ids"].size == 0 and unknown["candidate_ids"].dtype == np.int64
    assert unknown["heavy_scores"].size == 0 and unknown["heavy_scores"].dtype == np.float32
    assert unknown["stage_counts"].tolist() == [9, 0, 0, 0, 1]
    assert set(unknown[SKIPPED_STAGES]) == set(CANDIDATE_STAGES)

    calls.clear()
    known, unknown = fused.run_batch([request[1], request[2]])
    assert [u for name, u in calls if name in CANDIDATE_STAGES] == [1] * len(CANDIDATE_STAGES)
    assert sorted(u for name, u in calls if name not in CANDIDATE_STAGES) == [1, 1, 2, 2]
    assert known["candidate_ids"].size == 3 and unknown["candidate_ids"].size == 0
    assert SKIPPED_STAGES not in known

    calls.clear()
    fused.run_batch([request[2]])  # a batch of unknown users only: no candidate stage runs at all
    assert calls == [("feature_lookup", 2), ("ordering", 2)]

    # The fused model's metrics: the skipped stages do not count the unknown user's request.
    metrics = FusedMetrics.__new__(FusedMetrics)
    metrics.name, metrics.stages = FUSED, {n: type("M", (), {"facts": lambda self, s, r: s})() for n in stages.FUNNEL}
    seconds = {n: 0.001 for n in stages.FUNNEL}
    assert [s for s, _ in metrics.facts(seconds, unknown)] == ["feature_lookup", "ordering"]
    assert [s for s, _ in metrics.facts(seconds, known)] == list(stages.FUNNEL)
