"""The feedback-loop experiment end to end at a tiny size: two generations, the second retrained on
the first one's own logs, a holdout kept on generation 0's model."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest


@pytest.mark.slow
def test_two_generations_retrain_on_their_own_logs(tmp_path):
    from configs import SimulationConfig, load_config
    from online.feedback_loop import history_table, reload_history, run_feedback_loop, write_loop_report

    config = load_config(
        overrides={
            "synthetic": {"num_users": 200, "num_items": 120, "events_per_user": 25, "seed": 3},
            "candidate_generator": {"epochs": 1, "batch_size": 512},
            "light_ranker": {"epochs": 1, "batch_size": 512},
            "heavy_ranker": {"epochs": 1, "batch_size": 512},
            "serving": {"retrieval_k": 60, "light_ranker_k": 20, "max_k": 20},
        }
    )
    history = run_feedback_loop(config, tmp_path, generations=2, simulation=SimulationConfig(days=2, k=5), holdout=0.05)
    first, second = history
    assert (first.model_version, second.model_version) == (1, 2)
    assert second.training_events > first.training_events  # generation 1's impressions joined the log
    # The holdout is served by generation 0's model in both generations, the same users, the same draws.
    assert first.holdout["ctr"] == second.holdout["ctr"] and first.holdout["users"] >= 2
    for h in history:
        assert 0 < h.coverage <= 1 and 0 <= h.gini <= 1 and h.share_curve[1.0] >= h.share_curve[0.5]
        assert h.ctr_test["user_bootstrap_low"] <= h.ctr_test["difference"] <= h.ctr_test["user_bootstrap_high"]
        # Users are the unit of the gap's test (a handful of holdout users: the permutation test).
        assert h.ctr_test["n_control"] == h.holdout["users"] and h.ctr_test["n_treatment"] == h.live["users"]
        assert h.ctr_test["method"].startswith("studentized permutation") and 0 < h.ctr_test["p_value"] <= 1
    table = history_table(history)
    assert table["gap change since generation 1"].iloc[0] == 0.0
    assert table["p (users as the unit)"].tolist() == [h.ctr_test["p_value"] for h in history]
    paths = write_loop_report(history, tmp_path / "report", {"size": "test"})
    assert paths["html"].stat().st_size > 10_000  # tables and two embedded plots
    again = reload_history(tmp_path)
    assert [h.ctr_test["difference"] for h in again] == pytest.approx([h.ctr_test["difference"] for h in history])


class Exploring:
    """An ordering stage as ``load_funnel`` gives it, exploring (``serving.ordering.exploration_temperature``
    > 0): its draws come from fresh entropy unless ``with_policy`` gives a seeded copy."""

    name = "ordering"

    def __init__(self, version, policy=None, seed=None):
        self.version, self.policy, self.rng = version, policy, np.random.default_rng(seed)

    def with_policy(self, policy, seed=None):
        return Exploring(self.version, policy, seed)


def stand_in_loop(monkeypatch, out, holdout=0.05, trained_with=None, explore=False):
    """``run_feedback_loop`` at a toy size with training and the funnel stood in for (each generation
    a new registry version serving a fixed random slate per user, or with ``explore`` a slate drawn by
    the ordering stage's generator): the orchestration only, in a second."""
    import evaluation.offline
    import online.feedback_loop as fl
    from configs import SimulationConfig, load_config

    def train_and_load(raw_dir, gen_out, config, registry):
        if trained_with is not None:
            trained_with.append(config)
        registry.mkdir(parents=True, exist_ok=True)
        version = len(list(registry.iterdir())) + 1
        (registry / str(version)).mkdir()
        stages = [Exploring(str(version))] if explore else [str(version)]  # a list, as load_funnel's
        return SimpleNamespace(version=version), stages, len(pd.read_parquet(raw_dir / "events.parquet"))

    def run_funnel(stages, user, k):
        if explore:
            items = stages[0].rng.choice(40, k, replace=False)
            return {"item_ids": items, "model_version": np.array([stages[0].version.encode()]), "served_by": [b"m"]}
        items = np.random.default_rng(user).choice(40, k, replace=False)
        return {"item_ids": items, "model_version": np.array([stages[0].encode()]), "served_by": np.array([b"funnel"])}

    monkeypatch.setattr(fl, "_train_and_load", train_and_load)
    monkeypatch.setattr(evaluation.offline, "run_funnel", run_funnel)
    config = load_config(overrides={"synthetic": {"num_users": 60, "num_items": 40, "events_per_user": 5, "seed": 3}})
    return fl.run_feedback_loop(config, out, generations=2, simulation=SimulationConfig(days=2, k=5), holdout=holdout)


def test_a_second_run_into_the_same_folder_is_refused_not_mixed_into_the_first(monkeypatch, tmp_path):
    """Before 2026-12-06 a second run into an existing ``out`` appended its slates to the first run's
    ``gen<N>/feedback.sqlite`` (each generation's figures then counted both runs), trained on both
    runs' logs and numbered its models after the first run's in the shared registry."""
    from online.feedback_log import FeedbackLog

    first = stand_in_loop(monkeypatch, tmp_path)
    log = FeedbackLog(tmp_path / "gen1" / "feedback.sqlite")
    counts = log.counts()
    log.close()
    with pytest.raises(FileExistsError, match="holds an earlier run"):
        stand_in_loop(monkeypatch, tmp_path)
    log = FeedbackLog(tmp_path / "gen1" / "feedback.sqlite")
    assert log.counts() == counts  # the first run's log as it was
    log.close()
    assert [h.model_version for h in first] == [1, 2]


def test_report_only_of_a_run_without_a_holdout_shows_what_the_run_showed(monkeypatch, tmp_path):
    """With ``--holdout 0`` there is no live-holdout gap to test; ``--report-only`` recomputed one
    anyway (before 2026-12-06): an empty holdout's bootstrap gave the live CTR itself as the
    interval of the difference."""
    from online.feedback_loop import history_table, reload_history, write_loop_report

    history = stand_in_loop(monkeypatch, tmp_path / "run", holdout=0.0)
    assert all(h.holdout == {} and h.ctr_test == {} for h in history)
    write_loop_report(history, tmp_path / "run" / "report", {})
    again = history_table(reload_history(tmp_path / "run"))
    assert again["diff 95% CI, users resampled"].isna().all(), again["diff 95% CI, users resampled"]
    pd.testing.assert_frame_equal(again, history_table(history))


def test_most_of_each_generations_logs_train_the_next(monkeypatch, tmp_path):
    """A generation's own logs are the latest events, so the temporal split's held-out period is made
    of them. The loop holds out 10% for validation; the config's test period (10% by default since
    2026-12-04, which no step of the loop scores) held out another 10% of the logs (before 2026-12-06)."""
    configs = []
    stand_in_loop(monkeypatch, tmp_path, trained_with=configs)
    assert len(configs) == 2  # generation 0, then generation 1's logs
    for config in configs:
        assert config.workflow.split.kind == "temporal"
        assert (config.workflow.split.valid_fraction, config.workflow.split.test_fraction) == (0.1, 0.0)


def test_a_run_with_exploration_repeats_and_its_holdout_stays_as_it_was(monkeypatch, tmp_path):
    """The loaded ordering stage explores from fresh entropy (served requests get a fresh draw each):
    with ``serving.ordering.exploration_temperature`` > 0 two runs with the same seeds differed, and
    the holdout, generation 0's model all along, showed other slates in every generation (before
    2026-12-07). Each generation's stages now explore from ``online.simulation.seed``."""
    first = stand_in_loop(monkeypatch, tmp_path / "a", explore=True)
    again = stand_in_loop(monkeypatch, tmp_path / "b", explore=True)
    assert first[0].holdout["users"] >= 2
    assert first[0].holdout == first[1].holdout  # the same model, users and draws in both generations
    for a, b in zip(first, again):
        assert (a.share_curve, a.live, a.holdout) == (b.share_curve, b.live, b.holdout)


def test_each_generations_feedback_log_is_closed_once_read(monkeypatch, tmp_path):
    """Each generation opened its feedback log and never closed it: the connections stayed open until
    the process ended (or garbage collection), one per generation."""
    import online.feedback_loop as fl

    opened = []

    class Recorded(fl.FeedbackLog):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.closed = False
            opened.append(self)

        def close(self):
            self.closed = True
            super().close()

    monkeypatch.setattr(fl, "FeedbackLog", Recorded)
    stand_in_loop(monkeypatch, tmp_path)
    assert len(opened) == 2 and all(log.closed for log in opened), [log.closed for log in opened]
