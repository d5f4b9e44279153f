"""A/B arms inside Triton: the router in front of version-pinned funnels, and the feedback endpoint.

Every export writes, besides the ``funnel`` ensemble (the served version), one ensemble per model
version, ``funnel_v<N>``, pinned to that version's stages (``deployment/export.py``). Two models an
experiment compares therefore run side by side in one server, each request entirely on one export.

``ab_router`` (``triton_repo/ab_router``, a BLS model, because choosing the ensemble per request is
branching an ensemble cannot express) reads its ``experiment.json`` (an ``serving.assignment.Rollout``),
hashes the user id into an arm, calls ``funnel_v<version of that arm>`` and answers with the funnel's
outputs plus ``arm`` and ``request_id``. Before answering it writes the slate, with its experiment's
name, to the feedback log (``online/feedback_log.py``, durable on return), so every impression a client
saw is on disk.

``feedback`` (``triton_repo/feedback``) takes a client's reactions to one response (``request_id``,
``item_ids``, ``events``, ``values``), checks them against the logged impressions of that request and
appends them to the same log; the request's arm and version come from the log, not from the client.
Each reaction to an item also goes to the live store (``workflows/live_store.py``), durably before
the acknowledgement, so the user's next request already sees it (``docs/live-features.md``); a retry
writes it again at the time the log first stored it, which repairs a failed write and duplicates none.

Both count per-arm online metrics (``serving/metrics.py``: ``OnlineMetrics``, recorded off the request
path like the stages' metrics) that Prometheus scrapes next to the serving metrics. A new experiment,
or rolling the treatment out, is a new version of ``ab_router`` (``online/experiments.py``): Triton
swaps it in while requests keep flowing.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np

from online.feedback_log import EVENTS, SIGNALS, FeedbackConflict, FeedbackLog
from serving.assignment import Rollout
from serving.interface import (
    EXPERIMENT_FILE,
    FEEDBACK,
    FUNNEL_INPUTS,
    FUNNEL_OUTPUTS,
    MANIFEST,
    ROUTER,
    Tensor,
    ensemble_name,
    names,
    stage_folder,
)
from serving.request import RequestError, RequestLimits, brief, scalar
from serving.stages import load_manifest
from serving.triton_model import StageModel
from workflows.live_store import LIVE_EVENTS, LiveStore, is_postgres, store_location

LOG_ENV = "FUNNEL_FEEDBACK_LOG"


def feedback_log_path(repository: str | Path) -> Path | str:
    """Where the router and the feedback endpoint log: ``$FUNNEL_FEEDBACK_LOG`` (a path, or a
    ``postgresql://`` DSN that several replicas share), else a file beside the model repository
    (never inside it: an export replaces the repository folder)."""
    if os.environ.get(LOG_ENV):
        value = os.environ[LOG_ENV]
        return value if is_postgres(value) else Path(value)
    repository = Path(repository).resolve()
    return repository.parent / f"{repository.name}-feedback.sqlite"


class FunnelFault(RuntimeError):
    """The arm's funnel failed on a request the router had checked: the server's fault (INTERNAL)."""


def limits_from_repository(repository: str | Path) -> Callable[[int], RequestLimits]:
    """``version -> RequestLimits`` read from that version's exported manifest in ``repository``."""
    repository = Path(repository)

    @cache
    def limits(version: int) -> RequestLimits:
        folder = stage_folder(repository, "ordering", int(version))
        if not (folder / MANIFEST).exists():
            raise FunnelFault(f"model version {version} has no exported manifest in {repository}")
        return RequestLimits.from_serving(load_manifest(folder)["config"]["serving"])

    return limits


def new_request_id() -> str:
    """128 random bits: feedback quotes it, so it must not be guessable."""
    return secrets.token_hex(16)


def _text(value) -> str:
    return value.decode() if isinstance(value, (bytes, np.bytes_)) else str(value)


def _client_text(value, name: str) -> str:
    """A client's BYTES input as text: bytes that are not UTF-8 are the client's error, not ours, and
    so is a NUL character, which PostgreSQL text cannot hold (psycopg raised ``DataError``, an
    ``INTERNAL`` error, at the lookup of such a request id in a PostgreSQL feedback log)."""
    try:
        text = _text(value)
    except UnicodeDecodeError as err:
        raise RequestError(f"'{name}' must be UTF-8 text: {err.reason} at byte {err.start}") from None
    if "\x00" in text:
        raise RequestError(f"'{name}' must not hold NUL characters")
    return text


# One reaction is one event: a value other than 1 would count as several clicks (or none) in the
# experiment's sums. Watch time is seconds, bounded so a client's unit error cannot swamp an arm's
# total or overflow the integer seconds of the retraining data (online/feedback_log.py, to_events).
COUNTED_EVENTS = ("click", "like", "share", "churn")
MAX_WATCH_SECONDS = 86_400.0
CHURN_ITEM = -1


class ABRouter:
    """Route one request to its arm's funnel and log what was served.

    ``infer(model_name, inputs) -> outputs`` runs a funnel (Triton BLS in the server, the stage
    classes in-process in tests). The request is checked against ``limits(version)`` of its arm's
    version first (``serving/request.py``; default: the configuration's defaults), so a malformed one
    is refused here with ``RequestError`` and never reaches the funnel.
    """

    inputs = FUNNEL_INPUTS
    outputs = FUNNEL_OUTPUTS + (Tensor("arm", "STRING", (1,)), Tensor("request_id", "STRING", (1,)))

    def __init__(
        self,
        artifacts: str | Path,
        log_path: str | Path,
        infer: Callable[[str, dict], dict],
        limits: Callable[[int], RequestLimits] | None = None,
    ):
        artifacts = Path(artifacts)
        self.rollout = Rollout.from_dict(json.loads((artifacts / EXPERIMENT_FILE).read_text()))
        self.log = FeedbackLog(log_path)
        self.infer = infer
        self.limits = limits or (lambda version: RequestLimits())

    @property
    def experiment(self) -> str:
        return self.rollout.experiment.name

    def run(self, inputs: dict) -> dict:
        user = scalar(inputs, "user_id", int)
        arm, version = self.rollout.version_for(user)
        _, k, excluded = self.limits(version).check(inputs)
        request = {"user_id": np.array([user], dtype=np.int64), "k": np.array([k], dtype=np.int32)}
        if inputs.get("exclude_item_ids") is not None:  # optional context, passed on as given
            request["exclude_item_ids"] = excluded
        out = self.infer(ensemble_name(version), request)
        request_id = new_request_id()
        self.log.log_impressions(
            request_id,
            user,
            np.asarray(out["item_ids"]).reshape(-1),
            _text(np.asarray(out["model_version"]).reshape(-1)[0]),
            arm,
            _text(np.asarray(out["served_by"]).reshape(-1)[0]),
            experiment=self.experiment,
        )
        return {
            **{n: out[n] for n in names(FUNNEL_OUTPUTS)},
            "arm": np.array([arm.encode()], dtype=object),
            "request_id": np.array([request_id.encode()], dtype=object),
        }

    def close(self) -> None:
        self.log.close()


def check_values(items: np.ndarray, events: list[str], values: np.ndarray) -> None:
    """Refuse, with ``RequestError`` naming the entry, what would be counted wrongly: a counted event
    whose value is not 1, watch time outside [0, 86,400] s, a churn on an item, two churns, or the same
    (item, event) twice in one request (the log keeps one, so the other value would be lost)."""
    seen = set()
    for n, (item, event, value) in enumerate(zip(items.tolist(), events, values.tolist())):
        if event in COUNTED_EVENTS and value != 1.0:
            raise RequestError(f"values[{n}] is {value} for a {event!r}: each {event} event has the value 1")
        if event == "watch_seconds" and not 0.0 <= value <= MAX_WATCH_SECONDS:  # NaN fails too
            raise RequestError(f"values[{n}] is {value} watch seconds: expected 0 to {MAX_WATCH_SECONDS:.0f}")
        if event == "churn" and item != CHURN_ITEM:
            raise RequestError(f"item_ids[{n}] is {item} for a churn: a churn is about the response, item id -1")
        if (item, event) in seen:
            what = "more than one churn" if event == "churn" else f"({item}, {event!r}) twice"
            raise RequestError(f"feedback holds {what}: one entry per signal per item, one churn")
        seen.add((item, event))


def live_rows(rows: list[tuple], ts: float) -> list[tuple]:
    """The live store's rows for the feedback ``rows`` ``(request, user, item, event, value)`` one call
    stored: the reactions it keeps, at ``ts``, the time the log stored them."""
    return [(u, i, ts, e, v) for _, u, i, e, v in rows if e in LIVE_EVENTS]


class FeedbackService:
    """Validate a client's reactions to one response and append them to the feedback log.

    Each (request, item, event) is stored once: a client's retry or a replay of the same event is
    acknowledged but neither stored nor counted again (``accepted`` says how many were new), so
    retries cannot inflate an experiment's CTR. A repeat whose value differs from the stored one
    (a watch time of 99 s for an event stored with 40 s) is refused, naming the request, item and
    event, and stores nothing: it is not a retry. A request may carry at most one entry per signal
    per item the response showed, plus one churn (item id -1). Every value of ``click``, ``like``,
    ``share`` and ``churn`` is 1; ``watch_seconds`` lies in [0, 86,400]."""

    inputs = (
        Tensor("request_id", "STRING", (1,)),
        Tensor("item_ids", "INT64"),
        Tensor("events", "STRING"),
        Tensor("values", "FP32"),
    )
    outputs = (Tensor("accepted", "INT32", (1,)), Tensor("arm", "STRING", (1,)))

    def __init__(self, log_path: str | Path, live_store: str | Path | None = None):
        self.log = FeedbackLog(log_path)
        # Reactions to items also go to the live store (workflows/live_store.py), which the next
        # request of the user reads: what they just watched is not recommended again.
        self.live = LiveStore(live_store) if live_store else None

    def run(self, inputs: dict) -> dict:
        request_id = _client_text(scalar(inputs, "request_id", lambda v: v), "request_id")
        for name in ("item_ids", "events", "values"):
            if name not in inputs:
                raise RequestError(f"missing input '{name}'")
        items = np.asarray(inputs["item_ids"]).reshape(-1)
        events = [_client_text(e, "events") for e in np.asarray(inputs["events"]).reshape(-1)]
        values = np.asarray(inputs["values"], dtype=np.float64).reshape(-1)
        if not np.issubdtype(items.dtype, np.integer):
            raise RequestError(f"'item_ids' must be integers, got {items.dtype}")
        if not len(items) == len(events) == len(values):
            raise RequestError(
                f"item_ids, events and values must have one entry per event, got "
                f"{len(items)}, {len(events)} and {len(values)}"
            )
        unknown = sorted(set(events) - set(EVENTS))
        if unknown:  # quoted briefly: a client's long or many event names made a message gRPC refuses
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise RequestError(
                f"unknown event(s) [{', '.join(brief(e) for e in unknown[:5])}]{more}; expected one of {list(EVENTS)}"
            )
        served = self.log.served(request_id)
        if served is None:
            raise RequestError(f"unknown request_id {brief(request_id)}: no response with that id was logged")
        shown = set(served["item_ids"])
        most = len(shown) * len(SIGNALS) + 1
        if len(items) > most:
            raise RequestError(
                f"feedback holds {len(items)} events, but response {request_id} showed "
                f"{len(shown)} items: at most {most} (one per signal per item, one churn)"
            )
        not_shown = sorted({int(i) for i, e in zip(items, events) if e != "churn" and int(i) not in shown})
        if not_shown:
            raise RequestError(f"item(s) {not_shown[:10]} were not in response {request_id}")
        check_values(items, events, values)
        rows = list(
            zip([request_id] * len(items), [served["user_id"]] * len(items), items.tolist(), events, values.tolist())
        )
        now = time.time()
        try:
            stored = self.log.log_feedback_many(rows, ts=now)
        except FeedbackConflict as err:  # a "retry" that changed a value: the client's bug, nothing stored
            raise RequestError(str(err)) from None
        counted = list(stored) if self.live is None else self.write_live(request_id, rows, stored, now)
        return {
            "accepted": np.array([len(stored)], dtype=np.int32),
            "arm": np.array([served["arm"].encode()], dtype=object),
            # What the per-arm counters add: each event once, in the call that completes it.
            "_events": [(event, value) for _, _, _, event, value in counted],
            "_version": served["model_version"],
        }

    def write_live(self, request_id: str, rows: list[tuple], stored: list[tuple], now: float) -> list[tuple]:
        """Write the live rows of every call that stored one of ``rows`` in the log (this one's, ``stored``
        at ``now``, and earlier ones' that a retry repeats); return the reactions to count now.

        A call's reactions are completed by the transaction that writes its live rows, each at the time
        the log stored the call (all or none): that one counts the whole call, churn included. So an
        earlier call that failed at its live write (and counted nothing) is counted by the retry that
        repairs it, and a retry racing a call still writing its live rows (the client gave up on a slow
        answer) leaves the count to whichever of the two writes first: before 2026-12-07 both counted
        (the retry repaired, the call counted what it had stored), so the per-arm counters read every
        reaction of that call twice. The retry repairs the earlier call's reactions as the log holds
        them, not only those it repeats. A call without live rows (a churn alone) counts itself."""
        if len(stored) == len(rows):  # all new (the usual case): the log need not be read back
            calls = {now: stored}
        else:
            logged = self.log.reactions(request_id)
            times = sorted({logged[item, event][5] for _, _, item, event, _ in rows})
            calls = {ts: [row[:5] for row in logged.values() if row[5] == ts] for ts in times}
        counted = []
        for ts, call in calls.items():
            live = live_rows(call, ts)
            if self.live.append_events(live, "feedback") if live else ts == now:
                counted += call
        return counted

    def close(self) -> None:
        self.log.close()
        if self.live is not None:
            self.live.close()


# The Triton adapters (``triton_repo/ab_router/1/model.py``, ``triton_repo/feedback/1/model.py``).


class RouterModel(StageModel):
    """``ab_router``: the arm's version-pinned funnel is called through BLS (``online/router.py``)."""

    stage_name = ROUTER

    def build_stage(self, artifacts: Path, args: dict):
        repository = Path(args["model_repository"]).parent
        return ABRouter(artifacts, feedback_log_path(repository), self._infer, limits_from_repository(repository))

    def build_metrics(self, args: dict):
        from serving.metrics import OnlineMetrics

        rollout = self.stage.rollout
        return self.off_request_path(
            OnlineMetrics(self.pb, "router", rollout.versions_by_arm(), design_shares=rollout.experiment.arms)
        )

    def _infer(self, model_name: str, inputs: dict) -> dict:
        """One BLS call. The router checked the request first, so an error of the funnel is a fault
        of the server (``INTERNAL``); BLS would not tell us its status code anyway."""
        request = self.pb.InferenceRequest(
            model_name=model_name,
            inputs=[self.pb.Tensor(name, value) for name, value in inputs.items()],
            requested_output_names=names(FUNNEL_OUTPUTS),
        )
        response = request.exec()
        if response.has_error():
            raise FunnelFault(f"{model_name}: {response.error().message()}")
        return {name: self.pb.get_output_tensor_by_name(response, name).as_numpy() for name in names(FUNNEL_OUTPUTS)}


class FeedbackModel(StageModel):
    """``feedback``: reactions to a served response, checked against its logged impressions."""

    stage_name = FEEDBACK

    def build_stage(self, artifacts: Path, args: dict):
        repository = Path(args["model_repository"]).parent
        return FeedbackService(feedback_log_path(repository), store_location(repository))

    def build_metrics(self, args: dict):
        from serving.metrics import OnlineMetrics

        return self.off_request_path(OnlineMetrics(self.pb, "feedback"))
