"""``make demo``'s script end to end on a tiny world: every step runs and prints, the report is
written, the real server answers known users from the models and an unknown one from the fallback.

The README's first command must not break silently: it once crashed after training because the
line printing the tuning step's choice could not format member weights (a list), and no test ran it.
The config here searches member weights too, so that line prints a list.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TINY = """
synthetic: {num_users: 200, num_items: 150, events_per_user: 25}
candidate_generator: {epochs: 1}
light_ranker: {epochs: 1}
heavy_ranker: {epochs: 1, members: [{}, {}]}
serving: {retrieval_k: 60, light_ranker_k: 20, max_k: 20}
tuning: {retrieval_weight: [0.0, 0.3], affinity_weight: [0.0, 0.5], member_weights: [[1, 0], [0.5, 0.5]], max_users: 50}
"""


def test_the_demo_runs_every_step_and_serves(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    out = tmp_path / "demo.json"
    work = tmp_path / "work"
    run = subprocess.run(
        [sys.executable, "scripts/demo.py", "--config", str(config), "--workdir", str(work), "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for step in range(1, 10):
        assert f"[{step}/9]" in run.stdout
    tuned = next(line for line in run.stdout.splitlines() if "tuned on the validation part" in line)
    assert "member_weights [" in tuned and "retrieval_weight" in tuned
    assert "funnel (served)" in run.stdout and (work / "evaluation" / "report" / "report.html").exists()
    results = json.loads(out.read_text())["results"]
    assert [r["served_by"] for r in results] == ["model", "model", "model", "fallback"]
    assert all(len(r["item_ids"]) == 10 for r in results)
