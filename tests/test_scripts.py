"""The thin scripts a user runs by hand, run as a user would (a subprocess, real arguments), where
no other test or notebook runs them: their glue (arguments, printing) is code too - ``make demo``
once crashed in a print line that no test ran (``tests/test_demo.py``)."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


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
