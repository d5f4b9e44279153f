"""A concurrent gRPC load generator for the funnel (tritonclient's async API, bounded in flight).

The tests and benchmarks drive the server with this: ``run_load`` keeps ``concurrency`` requests in
flight over one channel and records, per request, its latency, outputs or error, so a test can check
every answer. ``MALFORMED`` lists the kinds of bad request the robustness test mixes in. For
throughput alone, Triton's C++ ``perf_analyzer`` costs the shared cores less
(``benchmarks/perf_analyzer.py``).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

OUTPUTS = ["item_ids", "scores", "model_version", "served_by", "stage_counts"]

# kind of malformed request -> what makes it malformed (each must get an error, none may crash a stage)
MALFORMED = {
    "k_zero": "k = 0",
    "k_too_large": "k above serving.max_k",
    "k_negative": "k = -3",
    "user_fp32": "user_id sent as FP32",
    "user_two_values": "user_id with shape [2]",
    "user_empty": "user_id with shape [0]",
    "missing_k": "no k input",
    "k_bytes": "k sent as a string",
    "exclude_fp32": "exclude_item_ids (optional context) sent as FP32",
    "exclude_2d": "exclude_item_ids with shape [2, 1]",
    "exclude_too_many": "exclude_item_ids longer than serving.max_excluded_items",
}


@dataclass
class Request:
    user_id: int
    k: int
    malformed: str | None = None


@dataclass
class Result:
    request: Request
    latency_s: float
    outputs: dict | None = None
    error: str | None = None


@dataclass
class LoadReport:
    results: list[Result] = field(default_factory=list)
    wall_s: float = 0.0

    def latencies_ms(self, ok_only: bool = True) -> np.ndarray:
        return np.array([r.latency_s * 1000 for r in self.results if (r.error is None or not ok_only)])

    def summary(self) -> dict:
        lat = self.latencies_ms()
        ok = int(sum(r.error is None for r in self.results))
        out = {
            "requests": len(self.results),
            "ok": ok,
            "errors": len(self.results) - ok,
            "wall_s": round(self.wall_s, 3),
            # answered requests only: a refused request returns fast, and counting it would raise
            # the throughput of a failing server (every request refused met a requests/s target)
            "requests_per_s": round(ok / self.wall_s, 1) if self.wall_s else None,
        }
        if lat.size:
            out.update({f"p{q}_ms": round(float(np.percentile(lat, q)), 3) for q in (50, 95, 99)})
            out["mean_ms"] = round(float(lat.mean()), 3)
        return out


def build_inputs(grpcclient, request: Request, max_k: int, max_excluded: int = 10_000) -> list:
    """The input tensors for ``request``; malformed kinds break exactly one thing."""
    kind = request.malformed
    user = np.array([request.user_id], dtype=np.int64)
    k = np.array([request.k], dtype=np.int32)
    if kind == "k_zero":
        k = np.array([0], dtype=np.int32)
    elif kind == "k_too_large":
        k = np.array([max_k + 1], dtype=np.int32)
    elif kind == "k_negative":
        k = np.array([-3], dtype=np.int32)
    elif kind == "user_fp32":
        user = user.astype(np.float32)
    elif kind == "user_two_values":
        user = np.array([request.user_id, request.user_id], dtype=np.int64)
    elif kind == "user_empty":
        user = np.zeros(0, dtype=np.int64)
    dtype_name = {np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32"}
    inputs = []
    u = grpcclient.InferInput("user_id", list(user.shape), dtype_name[user.dtype])
    u.set_data_from_numpy(user)
    inputs.append(u)
    if kind == "k_bytes":
        kb = grpcclient.InferInput("k", [1], "BYTES")
        kb.set_data_from_numpy(np.array([b"ten"], dtype=np.object_))
        inputs.append(kb)
    elif kind != "missing_k":
        ki = grpcclient.InferInput("k", [1], "INT32")
        ki.set_data_from_numpy(k)
        inputs.append(ki)
    if kind in ("exclude_fp32", "exclude_2d", "exclude_too_many"):
        excluded = {
            "exclude_fp32": np.array([1.0, 2.0], dtype=np.float32),
            "exclude_2d": np.array([[1], [2]], dtype=np.int64),
            "exclude_too_many": np.arange(max_excluded + 1, dtype=np.int64),
        }[kind]
        ex = grpcclient.InferInput("exclude_item_ids", list(excluded.shape), dtype_name[excluded.dtype])
        ex.set_data_from_numpy(excluded)
        inputs.append(ex)
    return inputs


def decode(result) -> dict:
    return {
        "item_ids": result.as_numpy("item_ids"),
        "scores": result.as_numpy("scores"),
        "model_version": result.as_numpy("model_version")[0].decode(),
        "served_by": result.as_numpy("served_by")[0].decode(),
        "stage_counts": result.as_numpy("stage_counts"),
    }


def run_load(
    url: str,
    requests: list[Request],
    concurrency: int = 8,
    max_k: int = 100,
    max_excluded: int = 10_000,
    model_name: str = "funnel",
    timeout_s: float = 30.0,
    keep_outputs: bool = True,
) -> LoadReport:
    """Send ``requests`` with at most ``concurrency`` in flight; return every result, in order."""
    if concurrency < 1:  # a semaphore of 0 would wait forever for the first slot
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    outputs = [grpcclient.InferRequestedOutput(n) for n in OUTPUTS]
    slots = threading.Semaphore(concurrency)
    done = threading.Event()
    results: list[Result | None] = [None] * len(requests)
    remaining = [len(requests)]
    lock = threading.Lock()

    def finish(i: int, start: float, result, error) -> None:
        latency = time.perf_counter() - start
        try:
            if error is not None:
                results[i] = Result(requests[i], latency, error=str(error))
            else:
                results[i] = Result(requests[i], latency, decode(result) if keep_outputs else None)
        except Exception as err:  # an undecodable response counts as an error, never as a hang
            results[i] = Result(requests[i], latency, error=f"bad response: {type(err).__name__}: {err}")
        finally:
            slots.release()
            with lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    done.set()

    start_all = time.perf_counter()
    try:
        for i, request in enumerate(requests):
            slots.acquire()
            start = time.perf_counter()
            try:
                inputs = build_inputs(grpcclient, request, max_k, max_excluded)
                client.async_infer(
                    model_name,
                    inputs,
                    callback=lambda result, error, i=i, s=start: finish(i, s, result, error),
                    outputs=outputs,
                    client_timeout=timeout_s,
                )
            except Exception as err:  # a request the client library refuses to send is an error too
                finish(i, start, None, err)
        if requests:
            done.wait(timeout=timeout_s * max(1, len(requests) // max(concurrency, 1)) + timeout_s)
    finally:
        client.close()
    wall_s = time.perf_counter() - start_all
    # A request whose callback never came within the wait is an error of the load, not left out:
    # dropped, the report counted fewer requests and no error for it.
    missing = f"no response within the load's {wall_s:.1f}s wait"
    return LoadReport([r or Result(requests[i], wall_s, error=missing) for i, r in enumerate(results)], wall_s)


def counted(model_stats: list[dict], field: str = "inference_count") -> int:
    """What a reading of Triton's statistics (its ``model_stats``) counts in ``field`` over versions:
    inferences (requests) by default, or ``execution_count`` (batches run)."""
    return sum(int(m.get(field, 0)) for m in model_stats)


def inference_count(control, model: str) -> int:
    """The inferences Triton's statistics count for ``model`` now. ``control``: a client that may
    read statistics (``deployment.security.ControlClient``)."""
    return counted(control.get_inference_statistics(model, as_json=True).get("model_stats", []))


def settled_statistics(control, model: str, quiet_s: float = 0.3, timeout_s: float = 5.0) -> list[dict]:
    """Triton's ``model_stats`` for ``model`` once its inference count has stopped moving for
    ``quiet_s`` (at most ``timeout_s``): the reading before a burst. Triton counts a request after
    sending its response, so a reading taken right after the last earlier request can miss it, and
    the burst's count is then one too many (the full suite once read 74 for a burst of 73)."""
    stats = control.get_inference_statistics(model, as_json=True).get("model_stats", [])
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        again = control.get_inference_statistics(model, as_json=True).get("model_stats", [])
        if counted(again) == counted(stats):
            return again
        stats = again
    return stats


def wait_until_counted(control, model: str, count: int, timeout_s: float = 10.0) -> int:
    """Wait until Triton's statistics count ``count`` inferences of ``model`` and return what they
    count (fewer after ``timeout_s``). Triton reports a batch's statistics after sending its
    responses, so a reading taken as a load's last response arrives can miss the last batch: the
    full test suite once read 59 of a burst's 73 requests."""
    deadline = time.monotonic() + timeout_s
    while (counted := inference_count(control, model)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return counted
