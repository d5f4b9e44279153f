"""A/B arms inside Triton: the router in front of version-pinned funnels, and the feedback endpoint.

Every export writes, besides the ``funnel`` ensemble (the served version), one ensemble per model
version, ``funnel_v<N>``, pinned to that version's stages (``serving/export.py``). Two models an
experiment compares therefore run side by side in one server, each request entirely on one export.

``ab_router`` (``triton_repo/ab_router``, a BLS model, because choosing the ensemble per request is
branching an ensemble cannot express) reads its ``experiment.json`` (an ``online.assignment.Rollout``),
hashes the user id into an arm, calls ``funnel_v<version of that arm>`` and answers with the funnel's
outputs plus ``arm`` and ``request_id``. Before answering it writes the slate to the feedback log
(``online/feedback_log.py``, durable on return), so every impression a client saw is on disk.

``feedback`` (``triton_repo/feedback``) takes a client's reactions to one response (``request_id``,
``item_ids``, ``events``, ``values``), checks them against the logged impressions of that request and
appends them to the same log; the request's arm and version come from the log, not from the client.

Both count per-arm online metrics (``serving/metrics.py``: ``OnlineMetrics``, recorded off the request
path like the stages' metrics) that Prometheus scrapes next to the serving metrics. A new experiment,
or rolling the treatment out, is a new version of ``ab_router`` (``serving/experiments.py``): Triton
swaps it in while requests keep flowing.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

from online.assignment import Rollout
from online.feedback_log import EVENTS, FeedbackLog
from serving.stages import RequestError

ROUTER = "ab_router"
FEEDBACK = "feedback"
EXPERIMENT_FILE = "experiment.json"
FUNNEL_OUTPUTS = ["item_ids", "scores", "model_version", "served_by", "stage_counts"]
LOG_ENV = "FUNNEL_FEEDBACK_LOG"


def ensemble_name(version: int | str) -> str:
    """The ensemble that runs every stage at exactly ``version``."""
    return f"funnel_v{int(version)}"


def feedback_log_path(repository: str | Path) -> Path:
    """Where the router and the feedback endpoint log: ``$FUNNEL_FEEDBACK_LOG``, else a file beside
    the model repository (never inside it: an export replaces the repository folder)."""
    if os.environ.get(LOG_ENV):
        return Path(os.environ[LOG_ENV])
    repository = Path(repository).resolve()
    return repository.parent / f"{repository.name}-feedback.sqlite"


def _one(inputs: dict, name: str, kind: str) -> np.ndarray:
    if name not in inputs:
        raise RequestError(f"missing input '{name}'")
    value = np.asarray(inputs[name])
    if value.size != 1:
        raise RequestError(f"'{name}' must hold exactly one value, got shape {list(value.shape)}")
    if kind == "int" and not np.issubdtype(value.dtype, np.integer):
        raise RequestError(f"'{name}' must be an integer, got {value.dtype}")
    return value.reshape(-1)


def _text(value) -> str:
    return value.decode() if isinstance(value, (bytes, np.bytes_)) else str(value)


class ABRouter:
    """Route one request to its arm's funnel and log what was served.

    ``infer(model_name, inputs) -> outputs`` runs a funnel (Triton BLS in the server, the stage
    classes in-process in tests); it raises ``RequestError`` with the funnel's message on a bad request.
    """

    def __init__(self, artifacts: str | Path, log_path: str | Path, infer: Callable[[str, dict], dict]):
        artifacts = Path(artifacts)
        self.rollout = Rollout.from_dict(json.loads((artifacts / EXPERIMENT_FILE).read_text()))
        self.log = FeedbackLog(log_path)
        self.infer = infer

    @property
    def experiment(self) -> str:
        return self.rollout.experiment.name

    def run(self, inputs: dict) -> dict:
        user = _one(inputs, "user_id", "int")
        k = _one(inputs, "k", "int")
        arm, version = self.rollout.version_for(int(user[0]))
        request = {"user_id": user.astype(np.int64), "k": k.astype(np.int32)}
        if inputs.get("exclude_item_ids") is not None:  # optional context, passed on as given
            request["exclude_item_ids"] = np.asarray(inputs["exclude_item_ids"]).reshape(-1)
        out = self.infer(ensemble_name(version), request)
        request_id = uuid.uuid4().hex
        self.log.log_impressions(request_id, int(user[0]), np.asarray(out["item_ids"]).reshape(-1),
                                 _text(np.asarray(out["model_version"]).reshape(-1)[0]), arm,
                                 _text(np.asarray(out["served_by"]).reshape(-1)[0]))
        return {**{n: out[n] for n in FUNNEL_OUTPUTS},
                "arm": np.array([arm.encode()], dtype=object),
                "request_id": np.array([request_id.encode()], dtype=object)}

    def close(self) -> None:
        self.log.close()


class FeedbackService:
    """Validate a client's reactions to one response and append them to the feedback log."""

    def __init__(self, log_path: str | Path):
        self.log = FeedbackLog(log_path)

    def run(self, inputs: dict) -> dict:
        request_id = _text(_one(inputs, "request_id", "bytes")[0])
        for name in ("item_ids", "events", "values"):
            if name not in inputs:
                raise RequestError(f"missing input '{name}'")
        items = np.asarray(inputs["item_ids"]).reshape(-1)
        events = [_text(e) for e in np.asarray(inputs["events"]).reshape(-1)]
        values = np.asarray(inputs["values"], dtype=np.float64).reshape(-1)
        if not np.issubdtype(items.dtype, np.integer):
            raise RequestError(f"'item_ids' must be integers, got {items.dtype}")
        if not len(items) == len(events) == len(values):
            raise RequestError(f"item_ids, events and values must have one entry per event, got "
                               f"{len(items)}, {len(events)} and {len(values)}")
        unknown = sorted(set(events) - set(EVENTS))
        if unknown:
            raise RequestError(f"unknown event(s) {unknown}; expected one of {list(EVENTS)}")
        if not np.isfinite(values).all() or (values < 0).any():
            raise RequestError("values must be finite and >= 0")
        served = self.log.served(request_id)
        if served is None:
            raise RequestError(f"unknown request_id {request_id!r}: no response with that id was logged")
        shown = set(served["item_ids"])
        not_shown = sorted({int(i) for i, e in zip(items, events) if e != "churn" and int(i) not in shown})
        if not_shown:
            raise RequestError(f"item(s) {not_shown[:10]} were not in response {request_id}")
        self.log.log_feedback_many(zip([request_id] * len(items), [served["user_id"]] * len(items),
                                       items.tolist(), events, values.tolist()))
        return {"accepted": np.array([len(items)], dtype=np.int32),
                "arm": np.array([served["arm"].encode()], dtype=object),
                "_events": list(zip(events, values.tolist())), "_version": served["model_version"]}

    def close(self) -> None:
        self.log.close()
