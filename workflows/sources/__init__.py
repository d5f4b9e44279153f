"""Data sources, each mapped to the raw schema of ``workflows/schema.py`` and described by its
dataset spec (``configs/datasets/raw-schema.yaml``), which ``write_raw_tables`` writes beside the
tables as ``dataset.yaml``: the pipeline reads a source's files through that spec like any other."""

from __future__ import annotations

from pathlib import Path

SPEC_FILE = "dataset.yaml"


def write_raw_tables(source, out_dir, name: str = "raw-schema") -> dict[str, str]:
    """Write a source's ``events``, ``users`` and ``items`` frames as parquet and their spec as
    ``dataset.yaml`` (paths relative to it); return the paths (keys events, users, items, spec)."""
    from workflows.spec import raw_schema_spec

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for table in ("events", "users", "items"):
        path = out / f"{table}.parquet"
        getattr(source, table).to_parquet(path, index=False)
        paths[table] = str(path)
    spec = raw_schema_spec("events.parquet", "users.parquet", "items.parquet", name=name)
    paths["spec"] = str(spec.write(out / SPEC_FILE))
    return paths
