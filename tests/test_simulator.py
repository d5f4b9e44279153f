"""The user simulator reacts by the ground truth: better slates earn more clicks and more returns."""

import threading
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from configs import SyntheticDataConfig
from online.feedback_log import FeedbackLog
from online.simulator import SimulationConfig, UserSimulator, per_arm_summary
from workflows.sources.synthetic import generate

CFG = SyntheticDataConfig(num_users=300, num_items=200, events_per_user=20, seed=5)


@pytest.fixture(scope="module")
def world():
    return generate(CFG)


def test_a_truth_ranked_slate_beats_a_random_one(world, tmp_path):
    rng = np.random.default_rng(0)
    item_ids = world.items["item_id"].to_numpy()

    def recommend(user, k, arm):
        if arm == "oracle":
            scores = world.true_affinity(np.full(len(item_ids), user), item_ids, at_end=True)
            items = item_ids[np.argsort(-scores)[:k]]
        else:
            items = rng.choice(item_ids, k, replace=False)
        return SimpleNamespace(item_ids=items, model_version="1", served_by="model")

    sim = UserSimulator(world, CFG, SimulationConfig(days=4, seed=1))
    log = FeedbackLog(tmp_path / "log.sqlite")
    users = world.users["user_id"].to_numpy()
    outcomes = sim.run(users, recommend, assign=lambda u: "oracle" if u % 2 else "random", log=log)
    summary = per_arm_summary(outcomes)
    assert summary.loc["oracle", "ctr"] > 1.5 * summary.loc["random", "ctr"], summary
    assert summary.loc["oracle", "retention"] > summary.loc["random", "retention"], summary
    # Churned users stop asking: later days have fewer requests than day 0.
    per_day = outcomes.groupby("day").size()
    assert per_day.iloc[-1] < per_day.iloc[0]
    # Everything shown and every reaction is in the feedback log.
    counts = log.counts()
    assert counts["impressions"] == outcomes["impressions"].sum()
    fb = log.feedback()
    assert (fb["event"] == "click").sum() == outcomes["clicks"].sum()


def test_unknown_item_ids_get_no_interest(world):
    sim = UserSimulator(world, CFG, SimulationConfig(seed=2))
    click, watch, like, share = sim.react(1, np.array([10**9] * 50))
    assert click.mean() < 0.05 and watch.sum() < 50 * 60


def test_reactions_are_safe_to_compute_from_many_threads_at_once(world):
    """``run`` serves users from a thread pool. A shared pandas lookup made the first concurrent
    ``react`` calls fail in about 7% of fresh simulators (pandas' ``Index.is_unique`` race); every
    fresh simulator here is hit by 8 threads released together and must answer as one thread does."""
    items = np.concatenate([world.items["item_id"].to_numpy()[:20], [10**9]])
    users = range(1, 9)
    sequential = UserSimulator(world, CFG, SimulationConfig(seed=2))
    expected = {u: sequential.react(u, items) for u in users}
    for _ in range(100):
        sim = UserSimulator(world, CFG, SimulationConfig(seed=2))
        barrier, results, errors = threading.Barrier(len(users)), {}, []

        def react(user, sim=sim, barrier=barrier, results=results, errors=errors):
            barrier.wait()
            try:
                results[user] = sim.react(user, items)
            except Exception as error:  # collected: an exception in a thread would not fail the test
                errors.append(error)

        threads = [threading.Thread(target=react, args=(u,)) for u in users]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for u in users:
            for got, want in zip(results[u], expected[u]):
                np.testing.assert_array_equal(got, want)


def test_retention_counts_the_users_who_did_not_come_back_on_a_single_day():
    """One simulated day (or a run that stopped because everyone churned): the users active on the
    last day are all users, so counting them said 100% retention whoever came back."""
    one_day = pd.DataFrame(
        {
            "day": 0,
            "user_id": [1, 2, 3, 4, 5],
            "arm": ["live", "live", "live", "live", "holdout"],
            "impressions": 10,
            "clicks": [1, 0, 0, 0, 2],
            "watch_seconds": 0,
            "likes": 0,
            "shares": 0,
            "returned": [True, False, False, False, True],
        }
    )
    summary = per_arm_summary(one_day)
    assert summary.loc["live", "retention"] == 0.25 and summary.loc["holdout", "retention"] == 1.0
    two_days = pd.concat([one_day.assign(returned=True), one_day.assign(day=1)])
    assert per_arm_summary(two_days).loc["live", "retention"] == 0.25


@pytest.mark.parametrize(
    "bad",
    [
        {"position_decay": 1.5},  # every position examined: no position bias at all
        {"position_decay": -0.5},  # a negative chance at every odd position: never examined
        {"return_base": float("nan")},  # a NaN chance to return: every user churned
        {"days": 0},  # no day simulated: an outcome frame without columns
        {"seed": -1},  # numpy refused it only inside the first worker thread
    ],
)
def test_simulation_settings_that_are_not_probabilities_are_refused(bad):
    """``position_decay ** position`` is the chance to examine a position and the return chance a
    sigmoid of finite numbers; a config outside that was accepted and simulated silently."""
    from configs import load_config

    with pytest.raises(ValueError, match="online.simulation"):
        SimulationConfig(**bad)
    with pytest.raises(ValueError, match="online.simulation"):
        load_config(overrides={"online": {"simulation": bad}})
    for decay in (0.0, 1.0):  # the ends are probabilities too
        assert SimulationConfig(position_decay=decay).position_decay == decay


def test_a_user_the_world_does_not_have_is_refused_before_anything_is_served(world):
    """The taste lookup indexes ``user_id - 1``: user 0 was simulated silently with the last user's
    taste, and an id past the last user failed in a worker thread after the others were served."""
    sim = UserSimulator(world, CFG, SimulationConfig(days=1, k=3, seed=2))
    items = world.items["item_id"].to_numpy()[:3]
    served = []

    def recommend(user, k, arm):
        served.append(user)
        return SimpleNamespace(item_ids=items, model_version="1", served_by="model")

    for unknown in (0, -1, CFG.num_users + 1):
        with pytest.raises(ValueError, match="not the simulated world's users"):
            sim.react(unknown, items)
        with pytest.raises(ValueError, match="not the simulated world's users"):
            sim.run([1, 2, unknown], recommend, assign=lambda u: "a")
    assert served == []
    for user in (1, CFG.num_users):  # the first and the last user are the world's
        assert len(sim.react(user, items)[0]) == 3
