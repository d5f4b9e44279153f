#!/usr/bin/env python
"""Benchmark the dataset workflow against a plain pandas implementation of the same steps.

For each size, synthetic events are generated once; then the NVTabular/dask workflow
(``run_dataset_pipeline``, correctness checks off unless --checks) and the pandas baseline run, each
in its own process so its peak RSS is its own. Prints one JSON document:

    {"machine": {...}, "sizes": [{"events": N, "workflow": {...}, "pandas": {...}, "workflow_vs_pandas": ratio}], ...}

``rows_per_s`` = input events / wall seconds of the whole run (reading raw parquet to writing the
model-ready parquet). Both runs share the machine at the same time of day, so the ratio is the figure
to compare across machines. ``machine`` is ``benchmarks.machine()``: CPUs, GPUs and package versions.

    python -m benchmarks.benchmark_workflow --sizes 1000000
    python -m benchmarks.benchmark_workflow --sizes 1000000 10000000 --out build/benchmark_workflow.json
"""

from configs.runtime import quiet_known_warnings

quiet_known_warnings()

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import machine, print_json
from configs.cli import output_file, positive_int

SCRIPT = Path(__file__).resolve()


def pandas_baseline(raw: Path, out: Path, config) -> dict:
    """The pipeline's steps in plain pandas/numpy, single process (default config semantics)."""
    import numpy as np
    import pandas as pd

    from workflows.content_filter import keyword_classifier
    from workflows.local_parquet import read_parquet

    wf = config.workflow
    events = read_parquet(raw / "events.parquet")
    users = read_parquet(raw / "users.parquet")
    items = read_parquet(raw / "items.parquet")
    # dedup identical rows; canonical items by content signature; unsafe-content filter
    events = events.drop_duplicates()
    sig = items["title"].str.lower().str.replace(r"[^a-z0-9]+", " ", regex=True).str.strip()
    for c in wf.dedup.signature_columns:
        if c != "title":
            sig = sig + "|" + items[c].astype(str)
    canonical = items.groupby(sig)["item_id"].transform("min")
    events["item_id"] = events["item_id"].map(dict(zip(items["item_id"], canonical)))
    items = items[items["item_id"] == canonical]
    unsafe = items.loc[keyword_classifier(items, wf.content_filter).values, "item_id"]
    events = events[~events["item_id"].isin(unsafe)]
    items = items[~items["item_id"].isin(unsafe)]
    if wf.recency_window.days > 0:
        events = events[events["timestamp"] >= events["timestamp"].max() - wf.recency_window.days * 86400]
    # point-in-time counts (strictly earlier events)
    for key, prefix in (("user_id", "user"), ("item_id", "item")):
        events = events.sort_values([key, "timestamp"], kind="stable")
        g = events.groupby(key)
        events[f"{prefix}_events_before"] = g.cumcount()
        events[f"{prefix}_clicks_before"] = g["click"].cumsum() - events["click"]
        ties = events.groupby([key, "timestamp"])
        for c in (f"{prefix}_events_before", f"{prefix}_clicks_before"):
            events[c] = ties[c].transform("min")
    # temporal split, active users, pair dedup
    # as workflows/splits.py's temporal_split: the last valid_fraction + test_fraction of time held
    # out, valid before test (lower quantiles, as its exact_quantiles)
    held_out = [1.0 - (wf.split.valid_fraction + wf.split.test_fraction), 1.0 - wf.split.test_fraction]
    cutoff, test_cutoff = (int(q) for q in np.quantile(events["timestamp"].values, held_out, method="lower"))
    train = events[events["timestamp"] < cutoff]
    if wf.split.test_fraction > 0:
        valid = events[(events["timestamp"] >= cutoff) & (events["timestamp"] < test_cutoff)]
        test = events[events["timestamp"] >= test_cutoff]
    else:
        valid, test = events[events["timestamp"] >= cutoff], None
    au = wf.active_users
    recent = train[train["timestamp"] >= cutoff - au.days * 86400]
    if au.event != "impression":
        recent = recent[recent[au.event] > 0]
    per_user = recent.groupby("user_id").size()
    train = train[train["user_id"].isin(per_user[per_user >= au.min_events].index)]
    pit = [c for c in events.columns if c.endswith("_before")]
    spec = {
        "timestamp": "min",
        "click": "max",
        "watch_seconds": "max",
        "like": "max",
        "share": "max",
        **{c: "min" for c in pit},
    }
    held = {"train": train, "valid": valid, **({"test": test} if test is not None else {})}
    parts = {n: p.groupby(["user_id", "item_id"]).agg(spec).reset_index() for n, p in held.items()}
    parts = {
        n: p.merge(users, on="user_id", how="left").merge(items.drop(columns=["title"]), on="item_id", how="left")
        for n, p in parts.items()
    }
    # labels
    edges = wf.labels.duration_buckets
    tr = parts["train"]
    frac_tr = tr["watch_seconds"] / tr["duration_seconds"].clip(lower=1)
    bucket_tr = np.searchsorted(edges, tr["duration_seconds"].values, side="right")
    clicked = tr["click"].values > 0
    thresholds = [
        np.quantile(frac_tr.values[clicked & (bucket_tr == b)], wf.labels.duration_watch_quantile)
        if (clicked & (bucket_tr == b)).any()
        else 1.0
        for b in range(len(edges) + 1)
    ]
    # categorical vocabularies and continuous statistics from the training part
    cats = ["user_id", "age_band", "gender", "location", "item_id", "category"]
    vocab = {c: {v: i + 3 for i, v in enumerate(tr[c].value_counts().index)} for c in cats}
    for p in parts.values():
        p["click_rate_u"] = (p["user_clicks_before"] + 1.0) / (p["user_events_before"] + 2.0)
        p["click_rate_i"] = (p["item_clicks_before"] + 1.0) / (p["item_events_before"] + 2.0)
        p["log_duration"] = np.log1p(p["duration_seconds"])
    stats = {
        c: (tr_col.mean(), tr_col.std())
        for c, tr_col in ((c, parts["train"][c]) for c in ("click_rate_u", "click_rate_i", "log_duration"))
    }
    for name, p in parts.items():
        frac = p["watch_seconds"] / p["duration_seconds"].clip(lower=1)
        bucket = np.searchsorted(edges, p["duration_seconds"].values, side="right")
        out_frame = pd.DataFrame({c: p[c].map(vocab[c]).fillna(2).astype("int64") for c in cats})
        for c, (m, s) in stats.items():
            out_frame[c] = (p[c] - m) / s
        out_frame["click"] = p["click"]
        watched = frac >= wf.watch_threshold  # as workflows/labels.py: a fraction, not threshold x duration
        out_frame["watched"] = watched.astype("int64")
        out_frame["duration_watch"] = ((p["click"] > 0) & (frac.values >= np.array(thresholds)[bucket])).astype("int64")
        out_frame["like"], out_frame["share"] = p["like"], p["share"]
        out_frame["hour_of_day"] = (p["timestamp"] // 3600) % 24
        out_frame["day_of_week"] = ((p["timestamp"] // 86400) + 3) % 7
        (out / name).mkdir(parents=True, exist_ok=True)
        out_frame.to_parquet(out / name / "part.parquet", index=False)
    return {f"{name}_rows": int(len(part)) for name, part in parts.items()}


def run_one(kind: str, raw: Path, out: Path, checks: bool) -> dict:
    from configs import load_config
    from workflows.pipeline import run_dataset_pipeline  # imports outside the timed region, for both

    config = load_config(overrides={"workflow": {"checks": {"enabled": checks}}})
    start = time.perf_counter()
    if kind == "workflow":
        result = run_dataset_pipeline(
            raw / "events.parquet", raw / "users.parquet", raw / "items.parquet", out, config.workflow
        )
        counts = {k: result.summary[k] for k in ("train_rows", "valid_rows", "test_rows") if k in result.summary}
    else:
        counts = pandas_baseline(raw, out, config)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(peak_mb, 1), **counts}


def generate(events: int, folder: Path) -> dict:
    from configs import load_config
    from workflows.sources.synthetic import generate as synth

    per_user = 60
    cfg = load_config(
        overrides={
            "synthetic": {
                "num_users": max(100, events // per_user),
                "num_items": max(600, events // 500),
                "events_per_user": per_user,
            }
        }
    )
    data = synth(cfg.synthetic)
    data.write_parquet(folder)
    return {"events": int(len(data.events)), "users": int(len(data.users)), "items": int(len(data.items))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes",
        type=positive_int,  # 0 or below generated a world of the minimum size, not what was asked
        nargs="+",
        default=[1_000_000, 10_000_000],
        help="approximate numbers of synthetic events (default: 1000000 10000000)",
    )
    parser.add_argument("--work", default="build/benchmark", help="scratch folder (default: build/benchmark)")
    parser.add_argument("--checks", action="store_true", help="also run the correctness checks in the workflow")
    parser.add_argument("--out", type=output_file, help="also write the JSON here")
    parser.add_argument("--_run", choices=["workflow", "pandas"], help=argparse.SUPPRESS)
    parser.add_argument("--_raw", help=argparse.SUPPRESS)
    parser.add_argument("--_out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._run:  # child process: one implementation, one size
        print(json.dumps(run_one(args._run, Path(args._raw), Path(args._out), args.checks)))
        return

    results = []
    for size in args.sizes:
        # absolute: the children run in the repository's root (for its imports), so a relative
        # --work given from another folder named a folder there, which the parent never wrote
        folder = Path(args.work).resolve() / str(size)
        start = time.perf_counter()
        data = generate(size, folder / "raw")
        entry = {**data, "generate_seconds": round(time.perf_counter() - start, 1)}
        for kind in ("workflow", "pandas"):
            cmd = [
                sys.executable,
                str(SCRIPT),
                "--_run",
                kind,
                "--_raw",
                str(folder / "raw"),
                "--_out",
                str(folder / kind),
            ] + (["--checks"] if args.checks else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=SCRIPT.parents[1])
            if proc.returncode != 0:
                raise RuntimeError(f"{kind} run at {size} events failed:\n{proc.stderr[-3000:]}")
            stats = json.loads(proc.stdout.strip().splitlines()[-1])
            stats["rows_per_s"] = round(data["events"] / stats["seconds"])
            entry[kind] = stats
        entry["workflow_vs_pandas"] = round(entry["workflow"]["rows_per_s"] / entry["pandas"]["rows_per_s"], 3)
        entry["same_train_rows"] = entry["workflow"]["train_rows"] == entry["pandas"]["train_rows"]
        results.append(entry)
    result = {
        "benchmark": "dataset workflow (NVTabular + dask) vs plain pandas, same steps",
        "checks_in_workflow": args.checks,
        "machine": machine(),
        "sizes": results,
    }
    print_json(result, args.out)


if __name__ == "__main__":
    main()
