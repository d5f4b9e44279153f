"""Small checks of the benchmarks' own arithmetic and baselines (benchmarks/), no server."""

from __future__ import annotations


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
