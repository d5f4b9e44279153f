#!/usr/bin/env python
"""Where a funnel request's time goes, for an exported repository (prints a table per mode).

in-process  the stage classes of serving/stages.py one after the other: ms per stage (with
            --batch N: N requests at a time through each stage's run_batch, ms per request)
server      the real tritonserver: client latency at 1 and N in flight, each stage's own
            histogram (funnel_stage_latency_ms) and Triton's compute/queue time per model, and
            CPU ms per request of the server, every stage's stub process and this client

.venv/bin/python -m benchmarks.profile_serving build/bench/items_1000000/triton_repo --mode in-process
.venv/bin/python -m benchmarks.profile_serving build/bench/items_1000000/triton_repo --mode in-process --batch 16
.venv/bin/python -m benchmarks.profile_serving build/bench/items_1000000/triton_repo --mode server
"""

import argparse
import json
import os
import sqlite3
import time
from pathlib import Path

import numpy as np

from configs.cli import positive_int
from configs.runtime import quiet_known_warnings
from serving.interface import stage_folder

quiet_known_warnings()

WARMUP = 20  # in-process: requests not timed
WARMUP_BATCHES = 2  # in-process --batch N: batches not timed


def known_users(repo: Path, version: int) -> np.ndarray:
    store = stage_folder(repo, "feature_lookup", version) / "online_store.sqlite"
    con = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        return np.array([r[0] for r in con.execute("SELECT user_id_raw FROM user_features")])
    finally:
        con.close()


def in_process(repo: Path, version: int, users: np.ndarray, warmup: int = WARMUP) -> None:
    from serving import stages

    funnel = {name: stages.STAGES[name](stage_folder(repo, name, version)) for name in stages.FUNNEL}
    times = {name: [] for name in stages.FUNNEL}
    for i, user in enumerate(users):
        x = {"user_id": np.array([user], dtype=np.int64), "k": np.array([10], dtype=np.int32)}
        for name in stages.FUNNEL:
            start = time.perf_counter()
            x.update(funnel[name].run(x))
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1000)
    for stage in funnel.values():  # their stores' connections
        stage.close()
    times["total"] = list(np.sum([times[n] for n in stages.FUNNEL], axis=0))
    for name, t in times.items():
        print(f"{name:15s} p50 {np.median(t):7.3f}  mean {np.mean(t):7.3f}  p99 {np.percentile(t, 99):7.3f} ms")


def in_process_batched(repo: Path, version: int, users: np.ndarray, batch: int, warmup: int = WARMUP_BATCHES) -> None:
    """As ``in_process``, ``batch`` requests at a time through each stage's ``run_batch``."""
    from serving import stages

    funnel = {name: stages.STAGES[name](stage_folder(repo, name, version)) for name in stages.FUNNEL}
    times = {name: [] for name in stages.FUNNEL}
    for i in range(0, len(users) - batch + 1, batch):
        xs = [
            {"user_id": np.array([u], dtype=np.int64), "k": np.array([10], dtype=np.int32)}
            for u in users[i : i + batch]
        ]
        for name in stages.FUNNEL:
            start = time.perf_counter()
            for x, out in zip(xs, funnel[name].run_batch(xs)):
                x.update(out)
            if i >= warmup * batch:
                times[name].append((time.perf_counter() - start) * 1000 / batch)
    for stage in funnel.values():  # their stores' connections
        stage.close()
    times["total"] = list(np.sum([times[n] for n in stages.FUNNEL], axis=0))
    print(f"batches of {batch}: ms per request")
    for name, t in times.items():
        print(f"{name:15s} p50 {np.median(t):7.3f}  mean {np.mean(t):7.3f}  p99 {np.percentile(t, 99):7.3f} ms")


def _cpu(server) -> dict:
    snap = server.cpu_seconds_by_process()
    t = os.times()
    snap["client"] = t.user + t.system
    return snap


def _per_model(before: dict, after: dict) -> dict:
    def get(m, name, key):
        return {labels.get(key): v for labels, v in m.get(name, [])}

    out = {}
    count_a, count_b = (
        get(after, "funnel_stage_latency_ms_count", "stage"),
        get(before, "funnel_stage_latency_ms_count", "stage"),
    )
    sum_a, sum_b = (
        get(after, "funnel_stage_latency_ms_sum", "stage"),
        get(before, "funnel_stage_latency_ms_sum", "stage"),
    )
    for stage in sum_a:
        n = max(count_a[stage] - count_b.get(stage, 0), 1)
        out.setdefault(stage, {})["in_stage_ms"] = round((sum_a[stage] - sum_b.get(stage, 0)) / n, 3)
    ok_a, ok_b = (
        get(after, "nv_inference_request_success", "model"),
        get(before, "nv_inference_request_success", "model"),
    )
    for metric, label in [
        ("nv_inference_compute_infer_duration_us", "triton_compute_ms"),
        ("nv_inference_queue_duration_us", "triton_queue_ms"),
    ]:
        a, b = get(after, metric, "model"), get(before, metric, "model")
        for model in a:
            n = max(ok_a.get(model, 0) - ok_b.get(model, 0), 1)
            out.setdefault(model, {})[label] = round((a[model] - b.get(model, 0)) / n / 1000, 3)
    return out


def on_server(repo: Path, users: np.ndarray, concurrency: int) -> None:
    from benchmarks.loadgen import Request, run_load
    from deployment.server import TritonServer
    from serving.client import FunnelClient
    from serving.metrics import scrape

    with TritonServer(repo) as server:
        with FunnelClient(server.grpc_url) as client:
            for user in users[:20]:
                client.recommend(int(user), 10)  # warm every stage
        for label, n_flight in [("1 in flight", 1), (f"{concurrency} in flight", concurrency)]:
            requests = [Request(int(u), 10) for u in users]
            before, cpu_before = scrape(server.metrics_url), _cpu(server)
            report = run_load(server.grpc_url, requests, concurrency=n_flight, keep_outputs=False)
            after, cpu_after = scrape(server.metrics_url), _cpu(server)
            cpu = {k: round((cpu_after[k] - cpu_before.get(k, 0)) * 1000 / len(requests), 3) for k in cpu_after}
            print(f"== {label}: {report.summary()}")
            print("CPU ms per request:", json.dumps({**cpu, "total": round(sum(cpu.values()), 3)}))
            for model, row in sorted(_per_model(before, after).items()):
                print(f"  {model:15s} {row}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("repository", type=Path)
    p.add_argument("--mode", choices=["in-process", "server"], default="in-process")
    p.add_argument("--requests", type=positive_int, default=500)
    p.add_argument("--concurrency", type=positive_int, default=8)
    p.add_argument("--batch", type=int, default=1, help="in-process: requests per run_batch call")
    args = p.parse_args()
    # at least one timed request (a batch): with none, the percentiles failed after every stage ran
    untimed = WARMUP_BATCHES * args.batch if args.batch > 1 else WARMUP
    if args.mode == "in-process" and args.requests < untimed + max(args.batch, 1):
        p.error(f"--requests: the first {untimed} are warm-up, not timed; give at least {untimed + max(args.batch, 1)}")
    version = json.loads((args.repository / "export.json").read_text())["version"]
    users = np.random.default_rng(0).choice(known_users(args.repository, version), size=args.requests)
    if args.mode == "in-process" and args.batch > 1:
        in_process_batched(args.repository, version, users, args.batch)
    elif args.mode == "in-process":
        in_process(args.repository, version, users)
    else:
        on_server(args.repository.resolve(), users, args.concurrency)


if __name__ == "__main__":
    main()
