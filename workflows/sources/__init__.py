"""Data sources, each mapped to the raw schema of ``workflows/schema.py``."""

from __future__ import annotations

from pathlib import Path


def write_raw_tables(source, out_dir) -> dict[str, str]:
    """Write a source's ``events``, ``users`` and ``items`` frames as parquet; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in ("events", "users", "items"):
        path = out / f"{name}.parquet"
        getattr(source, name).to_parquet(path, index=False)
        paths[name] = str(path)
    return paths
