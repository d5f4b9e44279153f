"""The funnel under a stream of live writes, and how fast a write reaches the next request.

On one tritonserver, in one run (``workflows/live_store.py``, ``docs/live-features.md``):

* **read_only**: ``requests`` funnel requests for known users, ``concurrency`` in flight
  (``benchmarks/loadgen.py``): p50/p99 latency and requests/s;
* **with_writes**: the same, while another process writes ``events_per_s`` live events: half through
  the feedback endpoint (gRPC, the router's requests' shown items), half through ingestion
  (``ingest_events``, straight into the store), for the users being requested, so every read sees
  its history grow. Each round is read-only, with writes, read-only again (``--no-bracket``: without
  the second), so a drift of the machine's speed hurts both sides alike, and the two read-only halves
  say how far apart two measurements of the same thing fall (``p99_ratio_read_only_after_vs_before``:
  the noise the write ratio must be read against). Each phase reports the server's CPU per funnel
  request, split by process (tritonserver, each stage's stub), the load generator's own CPU, the
  writer's CPU per event (ingested, fed back), and with ``--backend postgresql`` the database
  server's CPU per funnel request beside it;
* **same_cpu_no_writes** (``--no-same-cpu`` to skip): after each write phase, the same requests with
  no writes, while processes that do nothing but spin keep as many cores busy as the write stream
  did (the writer, the feedback stubs and PostgreSQL's extra: a lower bound).
  ``p99_ratio_same_cpu_no_writes`` beside ``p99_ratio_with_writes`` says whether writing costs the
  funnel more than the CPU it takes (lock waits, readers stalled by commits) or just that: on a
  machine the reads already saturate, any work of that size costs as much;
* **fresh_history**: ``trials`` times: a router response, feedback on its top item (acknowledged),
  then the next funnel request of that user: latency from the acknowledgement to that response, and
  whether the item was already gone (during the write stream).

The repository is an existing export (``--repository``, copied so its live store starts empty) or
a small synthetic world built here (``benchmarks/benchmark_serving.py`` ``build_world``).
``--backend postgresql`` runs the live store and the feedback log on a PostgreSQL server started
here. Prints JSON:

    .venv/bin/python -m benchmarks.benchmark_live --repository build/triton_repo --out build/live.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import machine, print_json
from configs.cli import output_file, positive_int
from serving.interface import FEEDBACK, stage_folder
from workflows.local_parquet import read_parquet


def write_stream(
    url: str, store: str, users: list[int], items: list[int], rate: float, ready, stop, out, nice: int = 0
) -> None:
    """Write ``rate`` events/s until ``stop``: half as feedback on shown items (gRPC, one event per
    call, like clients), half ingested (one event per transaction), each half from ``THREADS``
    threads pacing themselves, since one synchronous writer cannot reach 200 durable writes/s here."""
    import threading

    from serving.client import FunnelClient
    from serving.interface import ROUTER
    from workflows.live_store import LiveStore

    os.nice(nice)  # > 0: the writer yields the cores to the server, as clients on other machines would
    threads = 4
    sent = {"feedback": 0, "ingest": 0}
    thread_cpu = {"feedback": 0.0, "ingest": 0.0}  # CPU of the writing threads themselves, seconds
    lock = threading.Lock()
    started = threading.Barrier(2 * threads + 1)

    def feedback(seed: int) -> None:
        rng = np.random.default_rng(seed)
        pending: list[tuple[str, int, str]] = []  # (request_id, item, event) not sent yet
        with FunnelClient(url, model_name=ROUTER) as router:

            def refill() -> None:
                response = router.recommend(int(rng.choice(users)), 50)
                pending.extend(
                    (response.request_id, item, event)
                    for item in response.item_ids
                    for event in ("click", "like", "share", "watch_seconds")
                )

            refill()
            started.wait()
            pace(lambda: send(router, pending, refill), rate / 2 / threads, "feedback")

    def send(router, pending, refill) -> None:
        if not pending:
            refill()
        request_id, item, event = pending.pop(int(np.random.default_rng().integers(len(pending))))
        router.send_feedback(request_id, [item], [event], [1.0])

    def ingest(seed: int) -> None:
        rng = np.random.default_rng(seed)
        live = LiveStore(store)
        started.wait()
        pace(
            lambda: live.append_events(
                [(int(rng.choice(users)), int(rng.choice(items)), time.time(), "view", 1.0)], "ingest"
            ),
            rate / 2 / threads,
            "ingest",
        )
        live.close()

    def pace(write, per_s: float, kind: str) -> None:
        start, n = time.perf_counter(), 0
        while not stop.is_set():
            wait = start + n / per_s - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            cpu = time.thread_time()
            write()
            cpu = time.thread_time() - cpu
            n += 1
            with lock:
                sent[kind] += 1
                thread_cpu[kind] += cpu

    workers = [threading.Thread(target=feedback, args=(i,)) for i in range(threads)]
    workers += [threading.Thread(target=ingest, args=(100 + i,)) for i in range(threads)]
    for w in workers:
        w.start()
    started.wait()
    ready.set()
    # CPU from here on: the process's start (imports, connections, the first router calls) happens
    # before the measured phase and is not the writes' cost
    begin, cpu_begin = time.perf_counter(), time.process_time()
    for w in workers:
        w.join()
    events = sent["feedback"] + sent["ingest"]
    cpu_s, seconds = time.process_time() - cpu_begin, time.perf_counter() - begin
    out.put(
        {
            **sent,
            "events_per_s": round(events / seconds, 1),
            "writer_cpu_s": round(cpu_s, 3),
            "writer_seconds": round(seconds, 3),
            # the writer's own CPU (its gRPC client, SQLite/PostgreSQL client), on the server's cores
            "writer_cpu_ms_per_event": round(cpu_s * 1000 / max(events, 1), 3),
            # split: an ingested event's CPU is all on its thread (SQLite/PostgreSQL client calls);
            # the rest of the process's CPU (gRPC's own threads included) is the feedback calls'
            "writer_cpu_ms_per_ingested_event": round(thread_cpu["ingest"] * 1000 / max(sent["ingest"], 1), 3),
            "writer_cpu_ms_per_feedback_event": round(
                (cpu_s - thread_cpu["ingest"]) * 1000 / max(sent["feedback"], 1), 3
            ),
        }
    )


def burner_shares(cores: float) -> list[float]:
    """How ``burn_cpu`` spreads ``cores`` over processes: whole cores, then the rest (1.3 -> [1, 0.3])."""
    if cores < 0:
        raise ValueError(f"cores must be >= 0, got {cores}")
    shares = [1.0] * int(cores)
    if cores - int(cores) > 1e-9:
        shares.append(cores - int(cores))
    return shares


def burn_cpu(share: float, ready, stop, out, nice: int = 0, period_s: float = 0.005) -> None:
    """Keep ``share`` of one core busy until ``stop``, then put ``(CPU seconds, seconds)``: every ``period_s``
    it spins while its CPU time is behind ``share`` of the time elapsed, else sleeps. Counted in CPU
    time, not wall time, so being preempted on a busy machine does not lower its share. No I/O, no
    locks: nothing the server shares but the cores."""
    os.nice(nice)
    ready.set()
    begin, cpu_begin = time.perf_counter(), time.process_time()
    while not stop.is_set():
        owed = share * (time.perf_counter() - begin) - (time.process_time() - cpu_begin)
        if owed <= 0:
            time.sleep(period_s)
            continue
        until = time.process_time() + min(owed, period_s)
        while time.process_time() < until:
            pass
    out.put((time.process_time() - cpu_begin, time.perf_counter() - begin))


def write_stream_cores(report: dict, server_cpu_s: float, phase_s: float) -> float:
    """The cores the write stream kept busy: the writer process over its stream (``report`` from
    ``write_stream``) plus what it cost the server's side over the phase (``server_cpu_s`` in
    ``phase_s``: the feedback endpoint's stubs, and with PostgreSQL the database's CPU beyond its
    read-only pace). tritonserver's part of the feedback calls cannot be told from its part of the
    funnel's and is left out: a lower bound."""
    writer = float(report["writer_cpu_s"]) / max(float(report["writer_seconds"]), 1e-9)
    return writer + float(server_cpu_s) / max(float(phase_s), 1e-9)


def latencies(reports: list) -> np.ndarray:
    return np.concatenate([r.latencies_ms() for r in reports])


def p99(reports: list) -> float:
    return float(np.percentile(latencies(reports), 99))


def add_cpu(total: dict[str, float], before: dict[str, float], after: dict[str, float]) -> None:
    """Add each process's CPU seconds between two ``cpu_seconds_by_process`` readings to ``total``."""
    for process, seconds in after.items():
        total[process] = total.get(process, 0.0) + seconds - before.get(process, 0.0)


def fresh_history_trials(url: str, users: list[int], trials: int) -> dict:
    """Feedback on a shown item, then the user's next request: acknowledged -> visible latency."""
    from serving.client import FunnelClient
    from serving.interface import ROUTER

    latencies, visible = [], 0
    with FunnelClient(url, model_name=ROUTER) as router, FunnelClient(url) as funnel:
        for user in users[:trials]:
            shown = router.recommend(int(user), 10)
            item = shown.item_ids[0]
            router.send_feedback(shown.request_id, [item], ["click"], [1.0])
            acknowledged = time.perf_counter()
            after = funnel.recommend(int(user), 10)
            latencies.append((time.perf_counter() - acknowledged) * 1000)
            visible += item not in after.item_ids
    lat = np.array(latencies)
    return {
        "trials": len(lat),
        "visible_on_next_request": visible,
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", help="an exported repository (copied); default: build a small world")
    p.add_argument(
        "--workdir",
        help="where the world is built and the repository copied (default: a temporary folder, removed "
        "after a run that succeeds; one that failed keeps it, with the server's log)",
    )
    p.add_argument("--items", type=int, default=2000, help="catalog size of a built world")
    p.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    p.add_argument("--requests", type=positive_int, default=600, help="funnel requests per phase and round")
    p.add_argument("--rounds", type=positive_int, default=2, help="read-only / with-writes alternations")
    p.add_argument("--concurrency", type=positive_int, default=8, help="requests in flight")
    p.add_argument("--events-per-s", type=float, default=200.0, help="live writes per second while writing")
    p.add_argument("--trials", type=positive_int, default=100, help="fresh-history latency trials")
    p.add_argument(
        "--writer-nice",
        type=int,
        default=0,
        help="niceness of the writer process (0: it competes with the server for the cores; 19: it "
        "takes what the server leaves, closer to writers on other machines)",
    )
    p.add_argument(
        "--bracket",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a read-only phase after each write phase too (pooled with the one before)",
    )
    p.add_argument(
        "--same-cpu",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after each write phase, a phase with no writes and a process that only burns as many "
        "cores as the write stream used: what the writes cost beyond their CPU",
    )
    p.add_argument("--out", type=output_file, help="also write the JSON here")
    args = p.parse_args()
    if not 0 < args.events_per_s < float("inf"):  # 0: the writer's pacing divided by it and wrote nothing
        p.error(f"argument --events-per-s: must be > 0, got {args.events_per_s}")
    if args.repository and args.workdir:
        copy = (Path(args.workdir) / "triton_repo").resolve()
        if copy == Path(args.repository).resolve() or copy in Path(args.repository).resolve().parents:
            p.error(f"--repository {args.repository} is the benchmark's own copy in --workdir: it would be replaced")

    from benchmarks.loadgen import Request, run_load
    from deployment.server import TritonServer
    from online.router import LOG_ENV
    from workflows.live_store import STORE_ENV, store_location

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-live-"))
    workdir.mkdir(parents=True, exist_ok=True)
    repo = workdir / "triton_repo"
    if args.repository:
        shutil.rmtree(repo, ignore_errors=True)
        shutil.copytree(args.repository, repo)
        version = json.loads((repo / "export.json").read_text())["version"]
        manifest_dir = stage_folder(repo, "ordering", version)
    else:
        from benchmarks.benchmark_serving import build_world

        _, model, _, _ = build_world(args.items, 1000, 40, workdir / "world")
        shutil.rmtree(repo, ignore_errors=True)
        shutil.copytree(workdir / "world" / "triton_repo", repo)
        version, manifest_dir = model.version, model.path
    for stale in (store_location(repo), f"{repo}-feedback.sqlite"):
        for suffix in ("", "-wal", "-shm"):
            Path(stale + suffix).unlink(missing_ok=True)
    users = read_parquet(manifest_dir / "item_features.parquet")  # the catalog, for ingested items
    items = users["item_id_raw"].astype(int).tolist()
    history = stage_folder(repo, "feature_lookup", version) / "online_store.sqlite"
    import sqlite3

    with sqlite3.connect(f"file:{history}?mode=ro", uri=True) as con:
        known = [r[0] for r in con.execute("SELECT user_id_raw FROM user_features ORDER BY user_id_raw")]
    rng = np.random.default_rng(0)

    postgres = None
    saved = {n: os.environ.pop(n, None) for n in (STORE_ENV, LOG_ENV)}
    try:
        if args.backend == "postgresql":
            from deployment.postgres import PostgresServer

            postgres = PostgresServer().start()
            os.environ[STORE_ENV] = os.environ[LOG_ENV] = postgres.url
        store = store_location(repo)
        result = {
            "machine": machine(),
            "backend": args.backend,
            "concurrency": args.concurrency,
            "events_per_s_target": args.events_per_s,
            "writer_nice": args.writer_nice,
        }
        with TritonServer(repo, log_path=workdir / "server.log") as server:
            url = server.grpc_url
            run_load(url, [Request(int(u), 10) for u in rng.choice(known, 100)], concurrency=args.concurrency)  # warm
            context = multiprocessing.get_context("spawn")
            names = ["read_only", "with_writes"] + (["same_cpu_no_writes"] if args.same_cpu else [])
            phases: dict[str, list] = {name: [] for name in names}
            writes, burners = [], []
            # tritonserver and each model's stubs, seconds: where a slowdown under writes comes from
            server_cpu: dict[str, dict[str, float]] = {name: {} for name in names}
            # PostgreSQL's own processes, on the same cores (0 on SQLite: it runs inside the stubs)
            database_cpu = {name: 0.0 for name in names}
            # this process: the load generator (a Python gRPC client), also on the server's cores
            client_cpu = {name: 0.0 for name in names}

            def database_seconds() -> float:
                return postgres.cpu_seconds() if postgres is not None else 0.0

            def measure(phase: str, requests: list) -> tuple[object, dict[str, float], float]:
                """The phase's load report, the server processes' CPU seconds during it and the
                database server's (0 on SQLite)."""
                cpu_before, db_before = server.cpu_seconds_by_process(), database_seconds()
                client_before = time.process_time()
                report = run_load(url, requests, concurrency=args.concurrency, keep_outputs=False)
                client_cpu[phase] += time.process_time() - client_before
                used: dict[str, float] = {}
                add_cpu(used, cpu_before, server.cpu_seconds_by_process())
                add_cpu(server_cpu[phase], {}, used)
                db_used = database_seconds() - db_before
                database_cpu[phase] += db_used
                phases[phase].append(report)
                return report, used, db_used

            def measure_burning(cores: float, requests: list) -> None:
                """``measure`` while ``burn_cpu`` processes keep ``cores`` busy (at the writer's niceness)."""
                ready_all, stop, out = [], context.Event(), context.Queue()
                procs = []
                for share in burner_shares(cores):
                    ready = context.Event()
                    procs.append(
                        context.Process(target=burn_cpu, args=(share, ready, stop, out, args.writer_nice), daemon=True)
                    )
                    ready_all.append(ready)
                try:
                    for proc in procs:
                        proc.start()
                    for ready in ready_all:
                        ready.wait(60)
                    measure("same_cpu_no_writes", requests)
                finally:  # a failed phase too: a burner left spinning holds the cores (see the writer)
                    stop.set()
                used = [out.get(timeout=60) for _ in procs]
                for proc in procs:
                    proc.join(60)
                got = sum(cpu / max(seconds, 1e-9) for cpu, seconds in used)
                burners.append({"cores_asked": round(cores, 3), "cores_used": round(got, 3)})

            # read-only before and after each write phase: a drift of the machine's speed during the
            # round hits both sides alike, and the two read-only halves measure the noise itself
            halves: dict[str, list] = {"before": [], "after": []}
            for _ in range(args.rounds):
                requests = [Request(int(u), 10) for u in rng.choice(known, args.requests)]
                read, _, read_db = measure("read_only", requests)
                halves["before"].append(read)
                ready, stop, out = context.Event(), context.Event(), context.Queue()
                # daemonic: a writer that never reaches its stop (a thread died before the stream
                # began) is ended at this process's exit, not waited on for ever
                writer = context.Process(
                    target=write_stream,
                    args=(url, store, known, items, args.events_per_s, ready, stop, out, args.writer_nice),
                    daemon=True,
                )
                writer.start()
                try:
                    ready.wait(120)
                    written, used, written_db = measure("with_writes", requests)
                    if len(writes) == args.rounds - 1:  # the last round: fresh-history latency under writes too
                        result["fresh_history"] = fresh_history_trials(url, list(rng.permutation(known)), args.trials)
                finally:  # a failed phase too: else the writer kept writing, and the exit waited on it
                    stop.set()
                writes.append(out.get(timeout=60))
                writer.join(60)
                if args.same_cpu:  # the same cores busy, no writes: is the cost of writing only its CPU?
                    # PostgreSQL: what its processes used beyond their read-only pace is the writes'
                    extra_db = max(written_db / written.wall_s - read_db / read.wall_s, 0.0) * written.wall_s
                    cores = write_stream_cores(writes[-1], used.get(FEEDBACK, 0.0) + extra_db, written.wall_s)
                    measure_burning(cores, requests)
                if args.bracket:
                    halves["after"].append(measure("read_only", requests)[0])
        for name, reports in phases.items():
            lat = latencies(reports)
            wall = sum(r.wall_s for r in reports)
            served = sum(len(r.results) for r in reports)
            cpu = sum(server_cpu[name].values())
            result[name] = {
                "requests": int(served),
                "errors": int(sum(r.summary()["errors"] for r in reports)),
                "p50_ms": round(float(np.percentile(lat, 50)), 2),
                "p99_ms": round(float(np.percentile(lat, 99)), 2),
                "requests_per_s": round(sum(r.summary()["ok"] for r in reports) / wall, 1),  # answered only
                # CPU of tritonserver and its stubs per funnel request (writes included while writing)
                "server_cpu_ms_per_request": round(cpu * 1000 / served, 2),
                "server_cores_busy": round(cpu / wall, 2),
                "client_cpu_ms_per_request": round(client_cpu[name] * 1000 / served, 3),
                "server_cpu_ms_per_request_by_process": {
                    process: round(seconds * 1000 / served, 3)
                    for process, seconds in sorted(server_cpu[name].items(), key=lambda kv: -kv[1])
                },
            }
            if postgres is not None:  # the database server's processes, not counted in the server's CPU
                result[name]["database_cpu_ms_per_request"] = round(database_cpu[name] * 1000 / served, 3)
        result["with_writes"]["writes"] = writes
        result["p99_ratio_with_writes"] = round(result["with_writes"]["p99_ms"] / result["read_only"]["p99_ms"], 3)

        def round_ratios(phase: str) -> list[float]:
            return [
                round(p99(phases[phase][r : r + 1]) / p99([halves["before"][r], *halves["after"][r : r + 1]]), 3)
                for r in range(args.rounds)
            ]

        result["p99_ratio_per_round"] = round_ratios("with_writes")
        if args.same_cpu:
            result["same_cpu_no_writes"]["burners"] = burners
            result["p99_ratio_same_cpu_no_writes"] = round(
                result["same_cpu_no_writes"]["p99_ms"] / result["read_only"]["p99_ms"], 3
            )
            result["p99_ratio_same_cpu_per_round"] = round_ratios("same_cpu_no_writes")
        if args.bracket:  # no writes on either side: how far apart two read-only measurements fall
            result["p99_ratio_read_only_after_vs_before"] = round(p99(halves["after"]) / p99(halves["before"]), 3)
        result["target_p99_within_1.2x"] = result["p99_ratio_with_writes"] <= 1.2
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value
        if postgres is not None:
            postgres.stop()
    print_json(result, args.out)
    if not args.workdir:  # a folder of its own: a copy of the export (at 1M items, gigabytes) and the world
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
