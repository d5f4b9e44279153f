"""Every training run is logged to a local MLflow store: parameters, per-epoch metrics, artifacts.

The store is a folder (``file:`` URI), by default ``<registry>/../mlruns`` next to the model registry,
so a run and the registry version it produced sit side by side; ``training.mlflow_tracking_uri``
points it elsewhere. Browse it with ``mlflow ui --backend-store-uri <that folder>`` (the full
``mlflow`` package; this project installs only ``mlflow-skinny``, which writes the store).

    params     the whole config, flattened (``heavy_ranker.deep_layers`` = ``[128, 64]``)
    metrics    ``<stage>.<keras metric>`` per epoch (step = epoch), and the final validation metrics
    artifacts  the version's ``manifest.json``, the embedding-table size report and ``params.json``
               (the params whole: a value over MLflow's 250 characters is logged cut)
    tags       ``registry_version``, ``data_fingerprint``

The store must answer when the run starts (before any training). After that, tracking is an
observer: a store that fails mid-run (a tracking server restarted, a full disk) is logged as one
warning and the rest of the run's tracking is dropped, while training goes on and the registry
version keeps every metric in its manifest. A failing write used to end the training with it.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import tensorflow as tf

from configs import TrainingConfig

log = logging.getLogger(__name__)


def tracking_uri(config: TrainingConfig, registry_dir: str | Path) -> str:
    if config.mlflow_tracking_uri:
        return config.mlflow_tracking_uri
    # A URI, quoted: "file:" + the path made "#", "?" and "%xx" in a folder's name URI syntax (a
    # registry under "run#1" logged into a new folder "run").
    return (Path(registry_dir).resolve().parent / "mlruns").as_uri()


def store_location(config: TrainingConfig, registry_dir: str | Path) -> str:
    """Where ``tracked_run`` logs a run of ``registry_dir``, as a person reads it: a local store
    (``file:``) as its folder, relative to the working directory when under it, any other store as
    its URI. (``MLFLOW_TRACKING_URI`` plays no part: ``tracked_run`` sets the URI it uses.)"""
    uri = tracking_uri(config, registry_dir)
    parsed = urlparse(uri)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
        return uri
    folder = Path(url2pathname(parsed.path))
    try:
        return str(folder.relative_to(Path.cwd()))
    except ValueError:
        return str(folder)


def flatten(values: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


class EpochLogger(tf.keras.callbacks.Callback):
    """Keras callback: logs every epoch's metrics (train and validation) as ``<stage>.<name>``."""

    def __init__(self, run: TrackedRun, stage: str):
        super().__init__()
        self.run, self.stage = run, stage

    def on_epoch_end(self, epoch, logs=None):
        self.run.log_metrics({f"{self.stage}.{k}": v for k, v in (logs or {}).items()}, step=epoch)


class TrackedRun:
    """A thin handle on the active MLflow run (keeps ``mlflow`` calls in this module). Every write
    goes through ``_write``: after the first failure (``lost``) the run stops writing, with one warning."""

    def __init__(self, mlflow):
        self._mlflow = mlflow
        self.lost: str | None = None  # why tracking stopped, once it did

    def _write(self, fn, *args, **kwargs) -> None:
        if self.lost is not None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as err:  # the store is an observer: training goes on, the manifest keeps all
            self.lost = f"{type(err).__name__}: {err}"
            log.warning(
                "MLflow tracking failed; training goes on without it (the manifest keeps every metric): %s", self.lost
            )

    def callback(self, stage: str) -> EpochLogger:
        return EpochLogger(self, stage)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        clean = {}
        for key, value in metrics.items():
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(value):
                clean[key.replace("/", ".")] = value
        if clean:
            self._write(self._mlflow.log_metrics, clean, step=step)

    def log_params(self, params: dict) -> None:
        self._write(self._mlflow.log_params, {k: _fit_param(str(v)) for k, v in params.items()})

    def set_tags(self, tags: dict) -> None:
        self._write(self._mlflow.set_tags, {k: str(v) for k, v in tags.items()})

    def log_json(self, name: str, payload) -> None:
        self._write(self._log_json, name, payload)  # its temporary copy too: a full disk is a failed write

    def _log_json(self, name: str, payload) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(payload, indent=2, default=str))
            self._mlflow.log_artifact(str(path))

    def log_artifact(self, path: str | Path) -> None:
        self._write(self._mlflow.log_artifact, str(path))


def _fit_param(value: str) -> str:
    """``value`` within MLflow's limit on a param value (250 characters in the locked 1.26, which
    refuses a longer one and so failed the whole run): cut, saying so; the run's ``params.json``
    holds it whole."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    if len(value) <= MAX_PARAM_VAL_LENGTH:
        return value
    note = f"... ({len(value)} chars; whole in params.json)"
    return value[: MAX_PARAM_VAL_LENGTH - len(note)] + note


@contextmanager
def tracked_run(config: TrainingConfig, registry_dir: str | Path, params: dict, run_name: str):
    """Start an MLflow run in the configured store, log ``params``, yield a ``TrackedRun``.

    A failing training marks the run FAILED. The start must reach the store; a later write that fails
    stops the tracking with a warning, not the training (the module docstring).
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(config, registry_dir))
    mlflow.set_experiment(config.mlflow_experiment)
    mlflow.start_run(run_name=run_name)
    run = TrackedRun(mlflow)
    status = "FAILED"
    try:
        run.log_json("params.json", params)  # whole, where a param had to be cut
        items = [(k, _fit_param(v)) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            run.log_params(dict(items[i : i + 100]))
        yield run
        status = "FINISHED"
    finally:
        try:
            mlflow.end_run(status)
        except Exception as err:  # the run's work is done (or its own error is the news)
            log.warning("MLflow could not close the run (%s): %s", status, err)
