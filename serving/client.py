"""gRPC clients (tritonclient): ``FunnelClient`` asks the funnel ensemble (or, with
``model_name="ab_router"``, the A/B router, whose responses also carry the arm and a request id);
``send_feedback`` reports what the user did with a router response.

Errors come as one of two exceptions (both ``tritonclient``'s ``InferenceServerException``):
``BadRequest`` (``INVALID_ARGUMENT``: the request is wrong, fix it, do not retry) and ``ServerFault``
(``INTERNAL``, ``UNAVAILABLE``, a timeout, ...: the server's fault, a retry may succeed). Every call
waits at most ``timeout_s`` (30 s by default); one the server does not answer in time is a
``ServerFault`` naming the server's address, the model and the timeout. A call on a client after its
``close()`` is ``ClientClosed`` (a ``RuntimeError``), not gRPC's bare "Cannot invoke RPC on closed channel!"."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
from tritonclient.utils import InferenceServerException

from configs.cli import checked_timeout, grpc_address
from serving.interface import FEEDBACK, FUNNEL, FUNNEL_OUTPUTS, ROUTER, STAGE_COUNTS, names


class BadRequest(InferenceServerException):
    """The server refused the request as malformed (``INVALID_ARGUMENT``); the message names why."""


class ServerFault(InferenceServerException):
    """The server failed to answer a request it accepted (``INTERNAL``, ``UNAVAILABLE``, ...)."""


class ClientClosed(RuntimeError):
    """A call on a ``FunnelClient`` after its ``close()`` (or the end of its ``with`` block): the caller's
    mistake, nothing was sent. gRPC raised a bare ``ValueError("Cannot invoke RPC on closed channel!")``,
    naming neither the client, its server nor that it had been closed."""


@contextmanager
def typed_errors(url: str | None = None, model: str = "", timeout_s: float | None = None):
    """Re-raise tritonclient's errors as ``BadRequest`` or ``ServerFault`` by their status code; a call
    to ``url`` past its ``timeout_s`` deadline as a ``ServerFault`` that says so (gRPC's own message,
    "Deadline Exceeded", named neither the server nor how long the client had waited)."""
    try:
        yield
    except InferenceServerException as err:
        if url is not None and timeout_s is not None and "DEADLINE_EXCEEDED" in str(err.status()):
            raise ServerFault(
                f"the server at {url} did not answer {model} within {timeout_s:g} s", err.status(), err.debug_details()
            ) from err
        kind = BadRequest if "INVALID_ARGUMENT" in str(err.status()) else ServerFault
        raise kind(err.message(), err.status(), err.debug_details()) from err


def integers(name: str, values, dtype) -> np.ndarray:
    """``values`` (one integer, or any iterable of them: a list, tuple, set, generator, numpy array) as
    a flat ``dtype`` array, or ``BadRequest`` naming ``name``, before anything is sent: numpy's own cast
    wraps and truncates without a word (``k=2**32 + 5`` went out as ``k=5``, user 1.9 as user 1, an
    excluded id 7.5 as 7), and the server cannot tell."""
    if isinstance(values, Iterable) and not isinstance(values, (np.ndarray, list, str, bytes, Mapping)):
        values = list(values)  # numpy makes a set or a generator one object, refused as "not integers"
    array = np.asarray(values)
    if array.size == 0:  # an empty list is float64 to numpy, and holds no value to check
        return np.zeros(0, dtype=dtype)
    if array.dtype == object or not np.issubdtype(array.dtype, np.number):  # bool is no np.number
        # Python ints too large for any numpy integer, or not numbers at all: name the first that is not
        given = array if isinstance(values, np.ndarray) else np.asarray(values, dtype=object)  # [1, "a"]: not "1"
        for v in given.reshape(-1):
            v = v.item() if isinstance(v, np.generic) else v
            if not isinstance(v, int) or isinstance(v, bool):
                raise BadRequest(
                    f"{name} must hold integers, got {v!r} ({type(v).__name__})", "StatusCode.INVALID_ARGUMENT"
                )
    elif np.issubdtype(array.dtype, np.floating):  # whole numbers (7.0, an id column with a gap) are ids
        if not (np.isfinite(array).all() and (array == np.round(array)).all()):
            raise BadRequest(f"{name} must hold integers, got {array.reshape(-1)[:5]}", "StatusCode.INVALID_ARGUMENT")
    elif not np.issubdtype(array.dtype, np.integer):
        raise BadRequest(f"{name} must hold integers, got {array.dtype}", "StatusCode.INVALID_ARGUMENT")
    info = np.iinfo(dtype)
    outside = [v for v in (array.min(), array.max()) if not info.min <= int(v) <= info.max]
    if outside:
        raise BadRequest(
            f"{name} holds {int(outside[0])}, outside the range of {np.dtype(dtype).name} ({info.min} .. {info.max})",
            "StatusCode.INVALID_ARGUMENT",
        )
    return array.astype(dtype).reshape(-1)


def in_order(name: str, values):
    """``values`` for a list that pairs with others by position (``send_feedback``'s ``item_ids[i]``
    with ``events[i]``): a set has no order to pair by, so it is ``BadRequest`` (a set of events was
    paired with the item ids in whatever order it iterated), and a generator is read into a list."""
    if isinstance(values, (set, frozenset, Mapping)):
        raise BadRequest(
            f"{name} pairs with the other lists by position: give a list, not a {type(values).__name__}",
            "StatusCode.INVALID_ARGUMENT",
        )
    return list(values) if isinstance(values, Iterator) else values


def texts(name: str, values) -> np.ndarray:
    """``values`` (one string, or a list of them) as a flat BYTES array, or ``BadRequest`` naming ``name``:
    a number or None raised AttributeError (``'int' object has no attribute 'encode'``), naming nothing."""
    array = np.asarray(values, dtype=object).reshape(-1)
    bad = [v for v in array if not isinstance(v, str)]
    if bad:
        raise BadRequest(f"{name} must hold strings, got {bad[0]!r}", "StatusCode.INVALID_ARGUMENT")
    return np.array([v.encode() for v in array], dtype=object)


def numbers(name: str, values, dtype) -> np.ndarray:
    """``values`` as a flat float ``dtype`` array, or ``BadRequest`` naming ``name`` (not numpy's ValueError)."""
    try:
        return np.asarray(values, dtype=dtype).reshape(-1)
    except (TypeError, ValueError) as err:
        raise BadRequest(f"{name} must hold numbers: {err}", "StatusCode.INVALID_ARGUMENT") from None


def one_integer(name: str, value, dtype) -> np.ndarray:
    """``integers`` of exactly one value: a list of several (or none) is ``BadRequest`` naming ``name``,
    not tritonclient's shape error, which is neither ``BadRequest`` nor ``ServerFault``."""
    array = integers(name, [value], dtype)
    if array.size != 1:
        raise BadRequest(f"{name} must be one integer, got {array.size} values", "StatusCode.INVALID_ARGUMENT")
    return array


@dataclass
class Recommendations:
    user_id: int
    item_ids: list[int]
    scores: list[float]
    model_version: str
    served_by: str
    stage_counts: dict[str, int]  # serving.interface.STAGE_COUNTS: model stages 0 for a user the models never saw
    arm: str = ""  # the experiment arm (ab_router only)
    request_id: str = ""  # the id feedback must quote (ab_router only)

    def to_dict(self) -> dict:
        return asdict(self)


class FunnelClient:
    """Ask the served funnel for a user's top-k items over gRPC."""

    def __init__(
        self,
        url: str = "127.0.0.1:8001",
        model_name: str = FUNNEL,
        timeout_s: float = 30.0,
        root_certificates: str | None = None,
    ):
        """``url``: ``host:port``, or a gRPC target such as ``dns:///host:port`` or ``unix:/path`` (one
        without a port is ``ValueError``). ``timeout_s``: the longest any call waits for its answer
        (``None``: no limit; otherwise a finite number > 0 and at most ``configs.cli.MAX_SECONDS``, else
        ``ValueError``).
        ``root_certificates``: a PEM file that signed the server's certificate, for a server whose
        gRPC speaks TLS (``TritonServer(tls_cert=..., tls_key=...)``, ``docs/security.md``)."""
        import tritonclient.grpc as grpcclient

        timeout_s = checked_timeout(timeout_s, none=True)  # inf overflowed gRPC's deadline: every call failed at once
        self._grpc = grpcclient
        tls = {"ssl": True, "root_certificates": str(root_certificates)} if root_certificates else {}
        self.client = grpcclient.InferenceServerClient(grpc_address(url), **tls)
        self.url = url
        self.model_name = model_name
        self.timeout_s = timeout_s
        self._closed = False

    def _check_open(self, call: str) -> None:
        if self._closed:
            raise ClientClosed(f"{call}() on a FunnelClient for {self.url} that was closed: make a new client")

    def recommend(self, user_id: int, k: int = 10, exclude_item_ids=None) -> Recommendations:
        """The user's top ``k``; ``exclude_item_ids`` (optional context) are raw ids never to return."""
        self._check_open("recommend")
        g = self._grpc
        user = g.InferInput("user_id", [1], "INT64")
        user_array = one_integer("user_id", user_id, np.int64)
        user.set_data_from_numpy(user_array)
        top_k = g.InferInput("k", [1], "INT32")
        top_k.set_data_from_numpy(one_integer("k", k, np.int32))
        inputs = [user, top_k]
        if exclude_item_ids is not None:
            excluded = integers("exclude_item_ids", exclude_item_ids, np.int64)
            tensor = g.InferInput("exclude_item_ids", [len(excluded)], "INT64")
            tensor.set_data_from_numpy(excluded)
            inputs.append(tensor)
        wanted = names(FUNNEL_OUTPUTS) + (["arm", "request_id"] if self.model_name == ROUTER else [])
        with typed_errors(self.url, self.model_name, self.timeout_s):
            result = self.client.infer(
                self.model_name,
                inputs,
                outputs=[g.InferRequestedOutput(n) for n in wanted],
                client_timeout=self.timeout_s,
            )
        counts = result.as_numpy("stage_counts").tolist()
        return Recommendations(
            user_id=int(user_array[0]),  # the id sent: int([5]) raised after the server had answered
            item_ids=result.as_numpy("item_ids").tolist(),
            scores=[float(s) for s in result.as_numpy("scores")],
            model_version=result.as_numpy("model_version")[0].decode(),
            served_by=result.as_numpy("served_by")[0].decode(),
            stage_counts=dict(zip(STAGE_COUNTS, (int(c) for c in counts))),
            arm=result.as_numpy("arm")[0].decode() if self.model_name == ROUTER else "",
            request_id=result.as_numpy("request_id")[0].decode() if self.model_name == ROUTER else "",
        )

    def send_feedback(self, request_id: str, item_ids, events, values) -> int:
        """Report reactions to one ``ab_router`` response: ``events[i]`` (click, watch_seconds, like,
        share or churn) on ``item_ids[i]`` with ``values[i]``; returns how many the server stored
        (an event it already had for this response and item, e.g. from a retry, is not stored again)."""
        self._check_open("send_feedback")
        g = self._grpc
        tensors = {
            "request_id": ("BYTES", texts("request_id", [request_id])),
            "item_ids": ("INT64", integers("item_ids", in_order("item_ids", item_ids), np.int64)),
            "events": ("BYTES", texts("events", list(in_order("events", events)))),
            "values": ("FP32", numbers("values", in_order("values", values), np.float32)),
        }
        # one entry per reaction: lists of other lengths raised numpy's "cannot reshape", naming nothing
        lengths = {name: len(tensors[name][1]) for name in ("item_ids", "events", "values")}
        if len(set(lengths.values())) > 1:
            raise BadRequest(
                f"item_ids, events and values must be as long, got {lengths}", "StatusCode.INVALID_ARGUMENT"
            )
        inputs = []
        for name, (dtype, value) in tensors.items():
            tensor = g.InferInput(name, list(value.shape), dtype)
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        with typed_errors(self.url, FEEDBACK, self.timeout_s):
            result = self.client.infer(
                FEEDBACK, inputs, outputs=[g.InferRequestedOutput("accepted")], client_timeout=self.timeout_s
            )
        return int(result.as_numpy("accepted")[0])

    def close(self) -> None:
        """Close the channel; closing again does nothing, a later call is ``ClientClosed``."""
        self._closed = True
        self.client.close()

    def __enter__(self) -> FunnelClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
