"""The A/B router and the feedback endpoint, in-process over the exported funnel's stage classes.

The live-server version of the same flow (BLS, gRPC, Prometheus) is in tests/test_serving_rollout.py.
"""

import json

import numpy as np
import pandas as pd
import pytest

from online.router import ABRouter, FeedbackService
from serving.assignment import HOLDOUT, ab_rollout
from serving.interface import EXPERIMENT_FILE, ROUTER, ensemble_name
from serving.request import RequestError


@pytest.fixture(scope="module")
def stages(triton_repo):
    from evaluation.offline import load_funnel

    return load_funnel(triton_repo, 1)


@pytest.fixture(scope="module")
def funnel(stages):
    from evaluation.offline import run_funnel

    calls = []

    def infer(model_name, inputs):
        calls.append(model_name)
        if model_name != ensemble_name(1):
            raise RequestError(f"model {model_name} is not loaded")
        out = run_funnel(stages, int(inputs["user_id"][0]), int(inputs["k"][0]))
        return {n: out[n] for n in ("item_ids", "scores", "model_version", "served_by", "stage_counts")}

    return infer, calls


def test_export_writes_router_feedback_and_a_version_pinned_ensemble(triton_repo):
    config = (triton_repo / ensemble_name(1) / "config.pbtxt").read_text()
    assert 'name: "funnel_v1"' in config and "model_version: -1" not in config
    assert config.count("model_version: 1") == 7
    rollout = json.loads((triton_repo / ROUTER / "1" / EXPERIMENT_FILE).read_text())
    assert rollout["versions"] == {"control": 1} and rollout["experiment"]["holdout"] == 0.0
    assert (triton_repo / "feedback" / "1" / "model.py").exists()


def test_router_serves_each_user_on_the_arms_version_and_logs_the_slate(funnel, tmp_path, small_data):
    infer, calls = funnel
    artifacts = tmp_path / "router"
    artifacts.mkdir()
    # Treatment "version 1" too, so both arms can be served by the one exported version here.
    rollout = ab_rollout("exp", "salt-1", 1, 1, holdout=0.05)
    (artifacts / EXPERIMENT_FILE).write_text(json.dumps(rollout.to_dict()))
    router = ABRouter(artifacts, tmp_path / "log.sqlite", infer)
    users = small_data.users["user_id"].head(60).tolist()
    answers = {u: router.run({"user_id": np.array([u]), "k": np.array([5], dtype=np.int32)}) for u in users}
    arms = {u: a["arm"][0].decode() for u, a in answers.items()}
    assert arms == {u: rollout.experiment.assign(u) for u in users}
    assert {"control", "treatment"} <= set(arms.values())
    ids = [a["request_id"][0].decode() for a in answers.values()]
    assert len(set(ids)) == len(ids)
    log = router.log.impressions()
    assert len(log) == sum(len(a["item_ids"]) for a in answers.values())
    assert set(log["experiment"]) == {"exp"}  # the rollout's experiment: two in one log are told apart
    first = answers[users[0]]
    served = router.log.served(first["request_id"][0].decode())
    assert served["item_ids"] == first["item_ids"].tolist() and served["arm"] == arms[users[0]]
    assert set(calls) == {ensemble_name(1)}

    with pytest.raises(RequestError, match="'user_id' must hold exactly one value"):
        router.run({"user_id": np.array([1, 2]), "k": np.array([5], dtype=np.int32)})
    with pytest.raises(RequestError, match="missing input 'k'"):
        router.run({"user_id": np.array([1])})

    # Feedback: checked against what that response showed, arm taken from the log.
    feedback = FeedbackService(tmp_path / "log.sqlite")
    rid = first["request_id"][0].decode()
    shown = first["item_ids"].tolist()
    out = feedback.run(
        {
            "request_id": np.array([rid.encode()], dtype=object),
            "item_ids": np.array([shown[0], shown[0], -1]),
            "events": np.array([b"click", b"watch_seconds", b"churn"], dtype=object),
            "values": np.array([1.0, 42.0, 1.0], dtype=np.float32),
        }
    )
    assert out["accepted"][0] == 3 and out["arm"][0].decode() == arms[users[0]]
    fb = feedback.log.feedback()
    assert sorted(fb["event"]) == ["churn", "click", "watch_seconds"] and fb["user_id"].eq(users[0]).all()

    def send(**changes):
        request = {
            "request_id": np.array([rid.encode()], dtype=object),
            "item_ids": np.array([shown[0]]),
            "events": np.array([b"click"], dtype=object),
            "values": np.array([1.0], dtype=np.float32),
        }
        return feedback.run({**request, **changes})

    with pytest.raises(RequestError, match="unknown request_id"):
        send(request_id=np.array([b"nope"], dtype=object))
    not_shown = int(max(shown) + 10**6)
    with pytest.raises(RequestError, match=rf"\[{not_shown}\] were not in response"):
        send(item_ids=np.array([not_shown]))
    with pytest.raises(RequestError, match="unknown event"):
        send(events=np.array([b"purchase"], dtype=object))
    with pytest.raises(RequestError, match="one entry per event"):
        send(values=np.array([1.0, 2.0], dtype=np.float32))
    most = len(set(shown)) * 4 + 1  # one per signal per shown item, one churn
    with pytest.raises(RequestError, match=f"feedback holds {most + 1} events, but response .* showed"):
        send(
            item_ids=np.array([shown[0]] * (most + 1)),
            events=np.array([b"click"] * (most + 1), dtype=object),
            values=np.ones(most + 1, dtype=np.float32),
        )
    # What would be counted wrongly is refused, each naming the entry.
    item = np.array([shown[0]])
    counted_wrong = {
        "'request_id' must be UTF-8": {"request_id": np.array([b"\xff\xfe"], dtype=object)},
        "'events' must be UTF-8": {"events": np.array([b"cl\xffick"], dtype=object)},
        r"values\[0\] is 2.0 for a 'click': each click event has the value 1": {
            "values": np.array([2.0], dtype=np.float32)
        },
        r"values\[0\] is 0.0 for a 'like'": {"events": np.array([b"like"], dtype=object), "values": np.zeros(1)},
        r"values\[0\] is 1e\+30 watch seconds: expected 0 to 86400": {
            "events": np.array([b"watch_seconds"], dtype=object),
            "values": np.array([1e30]),
        },
        r"values\[0\] is nan watch seconds": {
            "events": np.array([b"watch_seconds"], dtype=object),
            "values": np.array([np.nan]),
        },
        r"item_ids\[0\] is \d+ for a churn": {"events": np.array([b"churn"], dtype=object)},
        "more than one churn": {
            "item_ids": np.array([-1, -1]),
            "events": np.array([b"churn", b"churn"], dtype=object),
            "values": np.ones(2),
        },
        r"\(\d+, 'watch_seconds'\) twice": {
            "item_ids": np.repeat(item, 2),
            "events": np.array([b"watch_seconds", b"watch_seconds"], dtype=object),
            "values": np.array([5.0, 3e4]),
        },
    }
    for message, changes in counted_wrong.items():
        with pytest.raises(RequestError, match=message):
            send(**changes)
    assert len(feedback.log.feedback()) == 3  # nothing refused was logged
    # A retry of an event already stored is acknowledged but neither stored nor counted again.
    replay = send()
    assert replay["accepted"][0] == 0 and replay["_events"] == []
    assert len(feedback.log.feedback()) == 3
    # A "retry" that changes a value is not a retry: refused, naming the request, item and event;
    # nothing of it is stored (until 2026-12-07 it was acknowledged with accepted 0, its 99 s dropped).
    with pytest.raises(RequestError, match=rf"request_id {rid}: \({shown[0]}, 'watch_seconds'\) .* 42, .* 99"):
        send(
            item_ids=np.array([shown[0], shown[1]]),
            events=np.array([b"watch_seconds", b"click"], dtype=object),
            values=np.array([99.0, 1.0], dtype=np.float32),
        )
    assert len(feedback.log.feedback()) == 3


def test_a_retry_repairs_the_live_store_after_a_failed_live_write_and_adds_nothing_after_a_success(
    tmp_path, monkeypatch
):
    """The log commits before the live store is written: when that write fails the client gets an
    error and retries, and the retry (nothing new for the log) still brings the live store up to date."""
    from workflows.live_store import LiveStore

    feedback = FeedbackService(tmp_path / "log.sqlite", tmp_path / "live.sqlite")
    feedback.log.log_impressions("r1", 7, np.array([10, 11, 12]), "1", "control", "model")
    request = {
        "request_id": np.array([b"r1"], dtype=object),
        "item_ids": np.array([10, 11, -1]),
        "events": np.array([b"click", b"watch_seconds", b"churn"], dtype=object),
        "values": np.array([1.0, 30.0, 1.0], dtype=np.float32),
    }
    written = feedback.live.append_events

    def down(*args, **kwargs):
        raise OSError("live store unreachable")

    monkeypatch.setattr(feedback.live, "append_events", down)
    with pytest.raises(OSError, match="unreachable"):
        feedback.run(request)
    assert len(feedback.log.feedback()) == 3
    store = LiveStore(tmp_path / "live.sqlite")
    assert len(store.user_events(7)) == 0
    monkeypatch.setattr(feedback.live, "append_events", written)
    repair = feedback.run(request)
    assert repair["accepted"][0] == 0  # the log had them all
    live = store.user_events(7)
    assert sorted(zip(live.item_ids.tolist(), live.events.tolist())) == [(10, "click"), (11, "watch_seconds")]
    # The failed call was never counted (an error counts no events), so the repairing retry counts
    # every reaction of it, churn too: the per-arm counters had missed them (before 2026-12-07, []).
    assert sorted(repair["_events"]) == [("churn", 1.0), ("click", 1.0), ("watch_seconds", 30.0)]
    again = feedback.run(request)
    assert again["accepted"][0] == 0 and again["_events"] == []  # counted once
    assert len(store.user_events(7)) == 2  # each reaction once, at the time the log first stored it
    # A retry after a success adds and counts only what is new to the log.
    more = dict(request, item_ids=np.array([10, 12]), events=np.array([b"click", b"like"], dtype=object))
    more["values"] = np.ones(2, dtype=np.float32)
    assert feedback.run(more)["_events"] == [("like", 1.0)]
    store.close()
    feedback.close()


def test_feedback_on_an_empty_response_finds_the_request_the_router_issued(stages, model_version, tmp_path):
    """A request excluding every catalog item gets an empty list and a request id; the log held no
    impression for it, so a churn sent about that response was refused as an "unknown request_id"."""

    def infer(model_name, inputs):  # the funnel as the ensemble runs it, the request's exclusions too
        x = dict(inputs)
        for stage in stages:
            x.update(stage.run(x))
        return x

    artifacts = tmp_path / "router"
    artifacts.mkdir()
    (artifacts / EXPERIMENT_FILE).write_text(json.dumps(ab_rollout("exp", "s", 1, 1).to_dict()))
    router = ABRouter(artifacts, tmp_path / "log.sqlite", infer)
    user = int(pd.read_parquet(model_version.path / "user_features.parquet")["user_id_raw"].iloc[0])
    every_item = pd.read_parquet(model_version.path / "item_features.parquet")["item_id_raw"].to_numpy(np.int64)
    out = router.run({"user_id": np.array([user]), "k": np.array([5], dtype=np.int32), "exclude_item_ids": every_item})
    assert len(out["item_ids"]) == 0 and out["served_by"][0] == b"fallback"
    rid = out["request_id"][0]
    feedback = FeedbackService(tmp_path / "log.sqlite")

    def send(item, event):
        request = {"request_id": np.array([rid], dtype=object), "item_ids": np.array([item])}
        return feedback.run({**request, "events": np.array([event], dtype=object), "values": np.ones(1)})

    churned = send(-1, b"churn")
    assert churned["accepted"][0] == 1 and churned["arm"][0] == out["arm"][0]
    assert feedback.log.feedback()[["user_id", "item_id", "event"]].values.tolist() == [[user, -1, "churn"]]
    with pytest.raises(RequestError, match=rf"\[{every_item[0]}\] were not in response"):
        send(every_item[0], b"click")  # the response showed nothing to click
    assert router.log.counts() == {"impressions": 0, "feedback": 1, "empty_responses": 1}  # none invented
    router.close()
    feedback.close()


def test_router_refuses_malformed_requests_before_calling_the_funnel(funnel, tmp_path):
    from online.router import new_request_id
    from serving.request import RequestLimits

    infer, calls = funnel
    artifacts = tmp_path / "router"
    artifacts.mkdir()
    (artifacts / EXPERIMENT_FILE).write_text(json.dumps(ab_rollout("exp", "s", 1, 1).to_dict()))
    router = ABRouter(
        artifacts, tmp_path / "log.sqlite", infer, lambda version: RequestLimits(max_k=50, max_excluded_items=5)
    )
    before = len(calls)
    bad = {
        "k": ({"user_id": np.array([1]), "k": np.array([51], dtype=np.int32)}, "k must be between 1 and 50"),
        "exclude": (
            {"user_id": np.array([1]), "k": np.array([5], dtype=np.int32), "exclude_item_ids": np.arange(6)},
            "exclude_item_ids holds 6 ids; at most 5",
        ),
        "user": ({"user_id": np.array([1.5]), "k": np.array([5], dtype=np.int32)}, "'user_id' must be an integer"),
    }
    for request, message in bad.values():
        with pytest.raises(RequestError, match=message):
            router.run(request)
    assert len(calls) == before and router.log.counts()["impressions"] == 0
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)  # 128 bits, hex


def test_per_arm_analysis_detects_a_better_arm_and_a_broken_split():
    from configs import ExperimentConfig
    from online.ab_report import analyze

    rng = np.random.default_rng(0)
    rollout = ab_rollout("e", "s", 1, 2, holdout=0.02)
    rows, fb = [], []
    for user in range(4000):
        arm = rollout.experiment.assign(user)
        ctr = 0.30 if arm == "treatment" else 0.25
        rid = f"r{user}"
        for pos in range(10):
            rows.append((rid, 0.0, user, pos + 100 * (user % 7), pos, "1", arm, "model"))
            if rng.random() < ctr:
                fb.append((rid, 0.0, user, pos + 100 * (user % 7), "click", 1.0))
    imp = pd.DataFrame(
        rows, columns=["request_id", "ts", "user_id", "item_id", "position", "model_version", "arm", "served_by"]
    )
    feedback = pd.DataFrame(fb, columns=["request_id", "ts", "user_id", "item_id", "event", "value"])
    config = ExperimentConfig(min_detectable_ctr_lift=0.02)
    result = analyze(imp, feedback, rollout, config, catalog_size=700)
    assert result.decision.startswith("SHIP"), result.decision
    assert not result.srm.mismatch and result.holdout_vs_control is not None
    ctr = result.tests.set_index("metric").loc["ctr"]
    assert 0.03 < ctr["difference"] < 0.07 and ctr["bootstrap_low"] > 0
    # Drop two thirds of the treatment's users from the log: the SRM check must refuse to decide.
    lost = imp[(imp["arm"] == "treatment") & (imp["user_id"] % 3 != 0)]["request_id"]
    broken = analyze(
        imp[~imp["request_id"].isin(lost)],
        feedback[~feedback["request_id"].isin(lost)],
        rollout,
        config,
        catalog_size=700,
    )
    assert broken.srm.mismatch and broken.decision.startswith("INVALID")
    assert HOLDOUT in set(broken.summary["arm"])


def test_the_reports_bootstrap_intervals_are_at_the_configured_alpha():
    """The bootstrap columns were 95% whatever online.experiment.alpha said, printed beside the tests'
    1 - alpha intervals: at alpha 0.2 the report showed an 80% CI next to a 95% bootstrap."""
    from configs import ExperimentConfig
    from online.ab_report import analyze

    rng = np.random.default_rng(1)
    rollout = ab_rollout("e", "s", 1, 2, holdout=0.0)
    rows, fb = [], []
    for user in range(600):
        arm = rollout.experiment.assign(user)
        rid = f"r{user}"
        for pos in range(10):
            rows.append((rid, 0.0, user, pos, pos, "1", arm, "model"))
            if rng.random() < 0.3:
                fb.append((rid, 0.0, user, pos, "click", 1.0))
        fb.append((rid, 0.0, user, 0, "watch_seconds", float(rng.exponential(120))))
    imp = pd.DataFrame(
        rows, columns=["request_id", "ts", "user_id", "item_id", "position", "model_version", "arm", "served_by"]
    )
    feedback = pd.DataFrame(fb, columns=["request_id", "ts", "user_id", "item_id", "event", "value"])
    widths = {}
    for alpha in (0.05, 0.2):
        tests = analyze(imp, feedback, rollout, ExperimentConfig(alpha=alpha), catalog_size=10).tests
        tests = tests.set_index("metric").loc[["ctr", "watch_minutes_per_user"]]
        widths[alpha] = (tests["bootstrap_high"] - tests["bootstrap_low"]) / (tests["ci_high"] - tests["ci_low"])
    # each bootstrap interval about as wide as the test's interval at the same level (normal-ish data)
    for alpha, ratio in widths.items():
        assert ratio.between(0.8, 1.25).all(), (alpha, ratio.to_dict())


def test_a_log_without_clicks_or_with_too_few_users_is_not_called_fully_powered():
    """No clicks yet (or feedback not arriving) gave the control no spread, so a planned sample size of
    0 users, and the report said "no detectable difference at the planned power; keep the control";
    too few users for any p-value read the same."""
    from configs import ExperimentConfig
    from online.ab_report import analyze
    from online.ab_testing import TOO_FEW, TestResult, decide, sample_ratio_mismatch

    rollout = ab_rollout("e", "s", 1, 2, holdout=0.02)
    rows = [(f"r{u}", 0.0, u, p, p, "1", rollout.experiment.assign(u), "model") for u in range(60) for p in range(10)]
    imp = pd.DataFrame(
        rows, columns=["request_id", "ts", "user_id", "item_id", "position", "model_version", "arm", "served_by"]
    )
    feedback = pd.DataFrame(columns=["request_id", "ts", "user_id", "item_id", "event", "value"])
    result = analyze(imp, feedback, rollout, ExperimentConfig(min_detectable_ctr_lift=0.02), catalog_size=10)
    assert result.required_users_per_arm > result.observed_users_per_arm, result.required_users_per_arm
    assert result.decision.startswith("KEEP RUNNING"), result.decision
    nan = float("nan")
    too_few = TestResult("ctr", 0.2, 0.3, 0.1, nan, nan, nan, nan, TOO_FEW, 1, 1)
    fine = sample_ratio_mismatch({"control": 1, "treatment": 1}, {"control": 0.5, "treatment": 0.5})
    assert decide(too_few, fine, required_per_arm=1, observed_per_arm=1).startswith("KEEP RUNNING")


def test_a_log_with_one_control_user_keeps_running():
    """Early in a test the control arm may have one user: the planned sample size took the control's
    per-user spread, which needs two users, and the whole analysis raised instead of KEEP RUNNING."""
    from configs import ExperimentConfig
    from online.ab_report import analyze

    rollout = ab_rollout("e", "s", 1, 2, holdout=0.02)
    arms = {u: rollout.experiment.assign(u) for u in range(200)}
    control = [u for u, a in arms.items() if a == "control"][:1]
    users = control + [u for u, a in arms.items() if a == "treatment"][:5]
    rows = [(f"r{u}", 0.0, u, p, p, "1", arms[u], "model") for u in users for p in range(10)]
    imp = pd.DataFrame(
        rows, columns=["request_id", "ts", "user_id", "item_id", "position", "model_version", "arm", "served_by"]
    )
    feedback = pd.DataFrame(
        [(f"r{u}", 0.0, u, 1, "click", 1.0) for u in users],
        columns=["request_id", "ts", "user_id", "item_id", "event", "value"],
    )
    result = analyze(imp, feedback, rollout, ExperimentConfig(min_detectable_ctr_lift=0.02), catalog_size=10)
    assert result.observed_users_per_arm == 1 and result.required_users_per_arm > 1
    assert result.decision.startswith("KEEP RUNNING"), result.decision


def test_a_control_arm_that_served_only_empty_responses_keeps_running():
    """Users served only empty responses count in their arm (``per_user``), but an arm with no
    impression at all made the impression z-test and the planned sample size raise, so the whole
    analysis raised instead of KEEP RUNNING."""
    from configs import ExperimentConfig
    from online.ab_report import analyze

    rollout = ab_rollout("e", "s", 1, 2, holdout=0.02)
    arms = {u: rollout.experiment.assign(u) for u in range(200)}
    control = [u for u, a in arms.items() if a == "control"][:3]
    treatment = [u for u, a in arms.items() if a == "treatment"][:5]
    rows = [(f"r{u}", 0.0, u, p, p, "1", arms[u], "model") for u in treatment for p in range(10)]
    imp = pd.DataFrame(
        rows, columns=["request_id", "ts", "user_id", "item_id", "position", "model_version", "arm", "served_by"]
    )
    empty = pd.DataFrame(
        [(f"r{u}", 0.0, u, "control", "1") for u in control],
        columns=["request_id", "ts", "user_id", "arm", "model_version"],
    )
    feedback = pd.DataFrame(
        [(f"r{u}", 0.0, u, 1, "click", 1.0) for u in treatment],
        columns=["request_id", "ts", "user_id", "item_id", "event", "value"],
    )
    config = ExperimentConfig(min_detectable_ctr_lift=0.02)
    result = analyze(imp, feedback, rollout, config, catalog_size=10, empty_responses=empty)
    assert result.observed_users_per_arm == 3 and result.required_users_per_arm > 3
    assert result.decision.startswith("KEEP RUNNING"), result.decision
    assert np.isnan(result.tests["p_value"][1]) and result.tests["treatment"][1] == 0.1
    # Why: the empty arm, not "too few users to tell" (the treatment's 5 users are enough for a test).
    assert result.tests["method"][1] == "no test: the control arm served no impression"


def test_the_user_bootstrap_of_ctr_has_no_interval_for_a_group_without_impressions():
    """A group with no impression (no users, or only empty responses) was resampled as CTR 0, so the
    interval of the difference was the other group's CTR interval (0.04 to 0.16 here), not undefined."""
    from online.ab_report import ctr_bootstrap

    none = pd.DataFrame({"clicks": [0, 0, 0], "impressions": [0, 0, 0]})
    some = pd.DataFrame({"clicks": [1, 2, 0, 1, 1], "impressions": [10] * 5})
    for control, treatment in ((none, some), (none.iloc[:0], some), (some, none)):
        assert np.isnan(ctr_bootstrap(control, treatment)).all()
    low, high = ctr_bootstrap(some, some)
    assert low < 0 < high


def test_a_nan_arm_share_is_refused():
    """NaN passed the shares check (every comparison with NaN is False): ab_rollout with a NaN
    treatment_share gave {control: nan, treatment: nan}, and every non-holdout user went to the
    treatment, the last arm, with NaN expected shares for the sample-ratio check."""
    from serving.assignment import Experiment

    nan = float("nan")
    with pytest.raises(ValueError, match="positive and sum to 1"):
        ab_rollout("e", "s", 1, 2, treatment_share=nan)
    with pytest.raises(ValueError, match="positive and sum to 1"):
        Experiment("e", "s", {"control": 0.5, "treatment": nan})


def test_an_arm_named_like_the_holdout_is_refused():
    """An arm called "holdout" shared its name with the holdout: its users were served the control's
    version instead of the arm's, and counted as holdout users by the analysis."""
    from serving.assignment import Experiment

    with pytest.raises(ValueError, match=f"{HOLDOUT!r} is the holdout's name"):
        Experiment("e", "s", {"control": 0.5, HOLDOUT: 0.5})


def test_a_rollout_names_a_version_for_exactly_its_experiments_arms():
    """Only Rollout.from_dict checked that every arm has a version: a Rollout built directly (what
    start_experiment takes) without one was accepted, and its users failed with a KeyError at request
    time; a version for an arm the experiment lacks was loaded, kept from retirement and counted."""
    from serving.assignment import Experiment, Rollout

    with pytest.raises(ValueError, match=r"arms \['treatment'\] have no model version"):
        Rollout(Experiment("e", "s"), {"control": 1}, 1)
    with pytest.raises(ValueError, match=r"versions name arms \['other'\] the experiment lacks"):
        Rollout(Experiment("e", "s"), {"control": 1, "treatment": 2, "other": 3}, 1)
    with pytest.raises(ValueError, match="have no model version"):
        Rollout.from_dict({**ab_rollout("e", "s", 1, 2).to_dict(), "versions": {"control": 1}})


def test_feedback_errors_quote_a_long_request_id_or_event_briefly(tmp_path):
    """The messages quoted the client's whole request id or every unknown event name: served over
    gRPC, one past 16 KiB (a 20 KB request id, 1,000 made-up event names) reached the client as
    RESOURCE_EXHAUSTED "received metadata size exceeds hard limit", not INVALID_ARGUMENT, naming nothing."""
    feedback = FeedbackService(tmp_path / "log.sqlite")
    feedback.log.log_impressions("r1", 7, np.array([10, 11]), "1", "control", "model")
    request = {
        "request_id": np.array([b"r1"], dtype=object),
        "item_ids": np.array([10]),
        "events": np.array([b"click"], dtype=object),
        "values": np.ones(1, dtype=np.float32),
    }
    with pytest.raises(RequestError, match=r"unknown request_id 'aaa.*\.\.\. \(20000 chars\): no response") as err:
        feedback.run({**request, "request_id": np.array([b"a" * 20_000], dtype=object)})
    assert len(str(err.value)) < 200
    made_up = np.array([b"e%04d" % i + b"x" * 50 for i in range(1000)], dtype=object)
    many = {"item_ids": np.full(1000, 10), "events": made_up, "values": np.ones(1000, dtype=np.float32)}
    with pytest.raises(RequestError, match=r"unknown event\(s\) \['e0000x.*'\] and 995 more; expected one of") as err:
        feedback.run({**request, **many})
    assert len(str(err.value)) < 600
    with pytest.raises(RequestError, match=r"unknown event\(s\) \['zzz.*\.\.\. \(100000 chars\)\]") as err:
        feedback.run({**request, "events": np.array([b"z" * 100_000], dtype=object)})
    assert len(str(err.value)) < 200
    assert feedback.log.counts()["feedback"] == 0
    feedback.close()


def test_a_retry_racing_the_call_it_repeats_counts_each_reaction_once(tmp_path):
    """A client that gave up on a call still writing the live store retries on another replica: the
    retry finds every reaction in the log, repairs the live rows the call had not written yet and counts
    them, and the call then counted what it had stored as well, so the per-arm counters read each
    reaction twice (click 2, watch seconds 60, churn 2 for one click, 30 s and one churn)."""
    call = FeedbackService(tmp_path / "log.sqlite", tmp_path / "live.sqlite")
    replica = FeedbackService(tmp_path / "log.sqlite", tmp_path / "live.sqlite")
    call.log.log_impressions("r1", 7, np.array([10, 11]), "1", "control", "model")
    request = {
        "request_id": np.array([b"r1"], dtype=object),
        "item_ids": np.array([10, 10, -1]),
        "events": np.array([b"click", b"watch_seconds", b"churn"], dtype=object),
        "values": np.array([1.0, 30.0, 1.0], dtype=np.float32),
    }
    write, retried = call.live.append_events, {}

    def slow(rows, source):  # the retry arrives after the call's log commit, before its live write
        retried.update(replica.run(request))
        return write(rows, source)

    call.live.append_events = slow
    first = call.run(request)
    assert first["accepted"][0] == 3 and retried["accepted"][0] == 0
    counted = sorted(first["_events"] + retried["_events"])
    assert counted == [("churn", 1.0), ("click", 1.0), ("watch_seconds", 30.0)]
    assert len(call.live.user_events(7)) == 2 and len(call.log.feedback()) == 3

    # A retry repeating part of a call that failed at its live write repairs and counts the whole call.
    call.log.log_impressions("r2", 7, np.array([12]), "1", "control", "model")
    call.live.append_events = lambda rows, source: (_ for _ in ()).throw(OSError("live store unreachable"))
    second = {**request, "request_id": np.array([b"r2"], dtype=object), "item_ids": np.array([12, 12, -1])}
    with pytest.raises(OSError, match="unreachable"):
        call.run(second)
    churn_only = {**second, "item_ids": np.array([-1]), "events": np.array([b"churn"], dtype=object)}
    repair = replica.run({**churn_only, "values": np.ones(1, dtype=np.float32)})
    assert sorted(repair["_events"]) == [("churn", 1.0), ("click", 1.0), ("watch_seconds", 30.0)]
    assert sorted(replica.live.user_events(7).item_ids.tolist()) == [10, 10, 12, 12]
    assert replica.run(second)["_events"] == []
    call.close()
    replica.close()
