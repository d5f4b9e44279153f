"""What a well-formed funnel request is, checked in one place.

A request that breaks these rules is the client's fault: the stage raises ``RequestError`` and the
Triton adapter (``serving/triton_model.py``) answers ``INVALID_ARGUMENT`` with the message, so clients
and proxies do not retry it. Any other exception is the server's fault and answers ``INTERNAL``.

    user_id            exactly one integer
    k                  exactly one integer in [1, serving.max_k]
    exclude_item_ids   optional; integer raw item ids, at most serving.max_excluded_items of them

The A/B router checks a request against the limits of the version its arm serves before calling
that funnel (``RequestLimits.check``): Triton's BLS calls do not carry the inner error's status code
(measured on tritonserver 2.51: an ``INVALID_ARG`` inside the called ensemble arrives as
``INTERNAL``), so a malformed request must never reach the funnel from the router.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INT64 = np.iinfo(np.int64)

# The longest error message a client is sent. gRPC carries it in a trailer that clients refuse past
# 16 KiB (and at random from 8 KiB): a message echoing a client's 20 KB request id reached the client
# as RESOURCE_EXHAUSTED "received metadata size exceeds hard limit", not INVALID_ARGUMENT, naming
# nothing, and the serving client took it for a server fault.
MAX_MESSAGE_CHARS = 1000


def brief(value, limit: int = 64) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters with its full length said:
    a message may quote what the client sent, never all of it."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(str(value))} chars)"


def capped_message(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``message`` cut to ``limit`` characters (a backstop for messages quoting a client's input)."""
    return message if len(message) <= limit else f"{message[: limit - 30]}... ({len(message)} chars in all)"


class RequestError(ValueError):
    """The request is malformed; the message names the problem and is returned to the client."""


def scalar(inputs: dict, name: str, dtype) -> int:
    """The single value of input ``name``, with a clear error for empty or multi-valued tensors."""
    if name not in inputs or inputs[name] is None:
        raise RequestError(f"missing input '{name}'")
    value = np.asarray(inputs[name])
    if value.size != 1:
        raise RequestError(f"input '{name}' must hold exactly one value, got shape {list(value.shape)}")
    if dtype is int and not np.issubdtype(value.dtype, np.integer):
        raise RequestError(f"input '{name}' must be an integer, got {value.dtype}")
    if dtype is int and not INT64.min <= int(value.reshape(-1)[0]) <= INT64.max:
        # a uint64 past INT64's range (an in-process caller; Triton refuses the datatype): the
        # online store's SQLite raised OverflowError on it
        raise RequestError(f"input '{name}' = {int(value.reshape(-1)[0])} does not fit INT64")
    return dtype(value.reshape(-1)[0])


def excluded_raw_ids(inputs: dict, limit: int) -> np.ndarray:
    """The request's optional ``exclude_item_ids`` (raw item ids never to return); empty if absent.

    More than ``limit`` ids are refused: an unbounded list costs every stage that reads it (2,000,000
    ids were once accepted, 16 MB and 530 ms a request)."""
    value = inputs.get("exclude_item_ids")
    if value is None:
        return np.zeros(0, dtype=np.int64)
    value = np.asarray(value)
    if not np.issubdtype(value.dtype, np.integer):
        raise RequestError(f"exclude_item_ids must be integer item ids, got {value.dtype}")
    if value.size > limit:
        raise RequestError(
            f"exclude_item_ids holds {value.size} ids; at most {limit} are allowed (serving.max_excluded_items)"
        )
    return value.astype(np.int64).reshape(-1)


@dataclass(frozen=True)
class RequestLimits:
    """The bounds a served version puts on requests (its ``serving`` config)."""

    max_k: int = 100
    max_excluded_items: int = 10_000

    @classmethod
    def from_serving(cls, serving: dict) -> RequestLimits:
        """From a manifest's ``config.serving``; exports older than a limit get its default."""
        defaults = cls()
        return cls(
            max_k=int(serving.get("max_k", defaults.max_k)),
            max_excluded_items=int(serving.get("max_excluded_items", defaults.max_excluded_items)),
        )

    def k(self, inputs: dict) -> int:
        k = scalar(inputs, "k", int)
        if not 1 <= k <= self.max_k:
            raise RequestError(f"k must be between 1 and {self.max_k}, got {k}")
        return k

    def excluded(self, inputs: dict) -> np.ndarray:
        return excluded_raw_ids(inputs, self.max_excluded_items)

    def check(self, inputs: dict) -> tuple[int, int, np.ndarray]:
        """``(user_id, k, excluded ids)`` of a whole funnel request, or ``RequestError``."""
        return scalar(inputs, "user_id", int), self.k(inputs), self.excluded(inputs)
