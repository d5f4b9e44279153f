"""Where the workflow's dask graphs run: in-process (default), on a dask.distributed cluster given its
scheduler address, or on a local GPU cluster (``dask_cuda.LocalCUDACluster``, one worker per GPU).

Every step of the pipeline is a dask collection operation or an NVTabular op, so the same code runs
in all three places; ``connect`` only decides which scheduler executes it.

    scheduler=None                 dask's in-process scheduler
    scheduler="tcp://host:8786"    an existing dask.distributed cluster
    scheduler="local-cuda"         start a LocalCUDACluster (requires GPUs and dask_cuda)
    scheduler="auto"               LocalCUDACluster when a GPU is visible, in-process otherwise
"""

from __future__ import annotations

import contextlib


def gpu_count() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:  # no driver, no GPU: NVML raises
        return 0


def check_scheduler(scheduler: str) -> str:
    """Raise the ``ValueError`` ``connect`` would for a scheduler string that is none of ``'auto'``,
    ``'local-cuda'`` or an address like ``tcp://host:8786``, before any work (scripts/prepare_data.py)."""
    if scheduler not in ("auto", "local-cuda") and (not isinstance(scheduler, str) or "://" not in scheduler):
        raise ValueError(
            f"scheduler must be None, 'auto', 'local-cuda' or an address like tcp://host:8786, got {scheduler!r}"
        )
    return scheduler


@contextlib.contextmanager
def connect(scheduler=None):
    """Context manager yielding a ``distributed.Client`` (or ``None`` for the in-process scheduler).

    ``scheduler`` may also be a ready ``distributed.Client``; it is used as is and not closed.
    """
    if scheduler is None or (scheduler == "auto" and gpu_count() == 0):
        yield None
        return
    from distributed import Client

    if isinstance(scheduler, Client):
        with scheduler.as_current():
            yield scheduler
        return
    if scheduler in ("local-cuda", "auto"):
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError as err:  # pragma: no cover - only on a GPU machine without dask_cuda
            raise RuntimeError("scheduler 'local-cuda' needs the dask_cuda package") from err
        if gpu_count() == 0:
            raise RuntimeError("scheduler 'local-cuda' needs at least one GPU; none is visible")
        with LocalCUDACluster() as cluster, Client(cluster) as client:
            yield client
        return
    check_scheduler(scheduler)
    with Client(scheduler) as client:
        yield client
