#!/usr/bin/env python
"""Load and latency benchmark of the served funnel vs a brute-force ranker baseline (prints JSON).

For each --sizes catalog size: synthetic data, pipeline, training, export, the real tritonserver;
then --requests concurrent gRPC requests (p50/p95/p99, requests/s) and --baseline-users users ranked
by scoring the full catalog with the heavy ranker, with NDCG@10 of both against the synthetic ground truth.
See serving/benchmark.py for exactly what is measured.

    .venv/bin/python scripts/benchmark_serving.py --sizes 10000 100000 1000000 --out build/benchmark.json
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from configs.runtime import quiet_known_warnings

quiet_known_warnings()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="catalog sizes")
    p.add_argument("--users", type=int, default=4000, help="synthetic users per world")
    p.add_argument("--events-per-item", type=float, default=5.0,
                   help="events generated per catalog item (at 5, ~95%% of the items get a training event and are served)")
    p.add_argument("--min-events", type=int, default=100_000, help="at least this many events per world")
    p.add_argument("--latency-requests", type=int, default=500, help="sequential requests for p50/p95/p99")
    p.add_argument("--requests", type=int, default=2000, help="concurrent requests for requests/s")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--baseline-users", type=int, default=10, help="users ranked by the brute-force baseline")
    p.add_argument("--workdir", help="where worlds are built (default: a temporary folder)")
    p.add_argument("--keep", action="store_true",
                   help="keep each world's data and models; a later run with the same --workdir reuses them")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()

    from serving.benchmark import measure_size

    root = Path(args.workdir or tempfile.mkdtemp(prefix="funnel-bench-"))
    rows, start = [], time.perf_counter()
    for size in args.sizes:
        row = measure_size(size, args, root / f"items_{size}")
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    result = {"machine_cpus": __import__("os").cpu_count(), "requests_per_size": args.requests,
              "concurrency": args.concurrency, "wall_s": round(time.perf_counter() - start, 1), "sizes": rows}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
