"""The feedback-loop experiment end to end at a tiny size: two generations, the second retrained on
the first one's own logs, a holdout kept on generation 0's model."""

import pytest

pytestmark = pytest.mark.slow


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
