from __future__ import annotations

# The packages whose versions decide the figures, by the name the JSON gives them: each with the
# distributions that install it (the first one installed is read). ``nvidia-pytriton``: the wheel that
# ships the tritonserver binary the benchmarks start (deployment/server.py), so its version names that
# binary's; reading the server's own version would take starting it.
PACKAGES = {
    "numpy": ("numpy",),
    "pandas": ("pandas",),
    "dask": ("dask",),
    "tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-gpu"),
    "tensorflow-recommenders": ("tensorflow-recommenders",),
    "merlin-core": ("merlin-core",),
    "merlin-models": ("merlin-models",),
    "nvtabular": ("nvtabular",),
    "cudf": ("cudf", "cudf-cu12", "cudf-cu11"),
    "faiss": ("faiss-cpu", "faiss-gpu", "faiss"),
    "nvidia-pytriton": ("nvidia-pytriton",),
    "tritonclient": ("tritonclient",),
    "psycopg": ("psycopg",),
}


def package_versions() -> dict[str, str | None]:
    """``{name: version}`` of ``PACKAGES`` from the installed packages' metadata (no import); None where
    none is installed; ``"<version> (<distribution>)"`` where another distribution than the name
    installs it (``tensorflow-cpu``, ``faiss-cpu``)."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name, distributions in PACKAGES.items():
        found[name] = None
        for dist in distributions:
            try:
                v = version(dist)
            except PackageNotFoundError:
                continue
            found[name] = v if dist == name else f"{v} ({dist})"
            break
    return found


def cpu_model() -> str | None:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what ``platform.processor()`` says, else None."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or None


def gpu_models() -> list[str]:
    """The GPUs' names as NVML gives them; empty where there is no driver or no GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        names = [pynvml.nvmlDeviceGetName(h) for h in handles]
    except Exception:  # no driver, no GPU, no pynvml: NVML raises
        return []
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def machine() -> dict:
    """The machine and the versions a benchmark's figures were taken with, for its JSON's ``machine``:
    CPU count and model, GPUs, Python, the OS, and ``package_versions()``. Cheap: reads metadata, starts
    nothing."""
    import os
    import platform

    gpus = gpu_models()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "gpus": len(gpus),
        "gpu_models": gpus,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": package_versions(),
    }


def print_json(result: dict, out: str | None = None) -> None:
    """Print a benchmark's figures as JSON and, given ``out``, write the same text there."""
    import json
    from pathlib import Path

    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
