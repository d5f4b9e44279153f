"""The Triton adapter (``serving/triton_model.py``) driven in process with a stand-in for ``pb_utils``:
a dynamic batch holding malformed and failing requests, a batched path that fails by itself, and the
request checks of ``serving/request.py`` they rely on."""

from types import SimpleNamespace

import numpy as np
import pytest

from serving.interface import Tensor
from serving.request import RequestError
from serving.triton_model import StageModel


class _TritonError:
    INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

    def __init__(self, message, code):
        self.message, self.code = message, code


class _Tensor:
    def __init__(self, name, value):
        self.name, self.value = name, value

    def as_numpy(self):
        return self.value


class _Response:
    def __init__(self, output_tensors, error=None):
        self.output_tensors, self.error = output_tensors, error


def _pb(logs: list):
    return SimpleNamespace(
        TritonError=_TritonError,
        Tensor=_Tensor,
        InferenceResponse=_Response,
        get_input_tensor_by_name=lambda request, name: request.get(name),
        Logger=SimpleNamespace(log_warn=logs.append),
    )


class _Doubler:
    """Doubles ``x``: negative is malformed, 99 trips a bug; ``run_batch`` may fail by itself."""

    name = "doubler"
    inputs, outputs = (Tensor("x", "INT64"),), (Tensor("y", "INT64"),)

    def __init__(self, batch_fails: bool):
        self.batch_fails = batch_fails

    def run(self, inputs):
        if inputs["x"][0] < 0:
            raise RequestError("x must be >= 0")
        if inputs["x"][0] == 99:
            raise ZeroDivisionError("boom")
        return {"y": inputs["x"] * 2}

    def run_batch(self, batch):
        if self.batch_fails:
            raise TypeError("a bug in the batched path")
        return [self.run(inputs) for inputs in batch]


def _adapter(batch_fails: bool, logs: list) -> StageModel:
    model = StageModel()
    model.stage_name, model.pb, model.stage = "doubler", _pb(logs), _Doubler(batch_fails)
    model.input_names, model.outputs, model.batching, model.metrics = ["x"], [("y", np.int64)], True, None
    return model


def _request(x: int) -> dict:
    return {"x": _Tensor("x", np.array([[x]], dtype=np.int64))}  # the batch dimension of 1 the ensemble adds


def _answers(responses) -> list:
    return [(r.error.code, r.error.message) if r.error else r.output_tensors[0].value.tolist() for r in responses]


def test_a_batch_with_a_malformed_and_a_failing_request_answers_each_as_alone():
    for batch_fails in (False, True):
        logs = []
        answers = _answers(_adapter(batch_fails, logs).execute([_request(x) for x in (1, -1, 99, 3)]))
        assert answers == [
            [[2]],
            ("INVALID_ARG", "doubler: x must be >= 0"),
            ("INTERNAL", "doubler: internal error: ZeroDivisionError: boom"),
            [[6]],
        ]


def test_a_batched_path_that_fails_by_itself_is_logged_not_hidden():
    """Every request then succeeds alone, so no response and no error metric shows the fault: only
    the log does (a batch failed by a malformed request is the client's fault and is not logged)."""
    logs = []
    assert _answers(_adapter(True, logs).execute([_request(1), _request(3)])) == [[[2]], [[6]]]
    assert logs == ["doubler: run_batch failed, serving 2 requests one by one: TypeError: a bug in the batched path"]
    logs.clear()
    _adapter(False, logs).execute([_request(1), _request(-1)])
    assert logs == []


class _Unreadable(_Tensor):
    def as_numpy(self):
        raise RuntimeError("tensor cannot be read")


def test_a_request_whose_input_cannot_be_read_fails_alone_in_a_batch():
    """Reading a batched request's inputs raised past ``execute`` for anything but a ``RequestError``,
    failing every request of the batch (the unbatched path already answered it as INTERNAL)."""
    logs = []
    unreadable = {"x": _Unreadable("x", None)}
    answers = _answers(_adapter(False, logs).execute([_request(1), unreadable, _request(3)]))
    assert answers == [[[2]], ("INTERNAL", "doubler: internal error: RuntimeError: tensor cannot be read"), [[6]]]


def test_a_batched_path_that_answers_too_few_requests_is_served_one_by_one():
    """A ``run_batch`` returning fewer results than requests left the last requests with no result:
    each got an internal error ("'NoneType' object is not subscriptable") though it would have been
    answered alone. The batch is now served one by one, and the log says why."""
    logs = []
    model = _adapter(False, logs)
    model.stage.run_batch = lambda batch: [model.stage.run(inputs) for inputs in batch[:-1]]
    assert _answers(model.execute([_request(1), _request(2), _request(3)])) == [[[2]], [[4]], [[6]]]
    assert logs == [
        "doubler: run_batch failed, serving 3 requests one by one: "
        "RuntimeError: run_batch returned 2 results for 3 requests"
    ]


def test_a_user_id_past_int64_is_a_request_error_not_an_overflow_in_the_online_store():
    # An in-process caller's uint64 user id (Triton refuses the datatype): scalar returned it, and the
    # feature lookup's SQLite query raised OverflowError, an INTERNAL error.
    from serving.request import RequestLimits, scalar

    huge = {"user_id": np.array([2**64 - 1], dtype=np.uint64), "k": np.array([2**63], dtype=np.uint64)}
    with pytest.raises(RequestError, match="input 'user_id' = 18446744073709551615 does not fit INT64"):
        scalar(huge, "user_id", int)
    with pytest.raises(RequestError, match="input 'k' = 9223372036854775808 does not fit INT64"):
        RequestLimits().k(huge)
    assert scalar({"user_id": np.array([2**63 - 1], dtype=np.uint64)}, "user_id", int) == 2**63 - 1
    assert scalar({"user_id": np.array([-(2**63)])}, "user_id", int) == -(2**63)


def test_an_error_message_is_cut_to_what_a_grpc_client_accepts():
    """A message past 16 KiB reached gRPC clients as RESOURCE_EXHAUSTED ("received metadata size exceeds
    hard limit"), whatever its code: a bad request quoting a long input looked like a server fault."""

    class _Echo(_Doubler):
        def run(self, inputs):
            raise RequestError(f"x = {'9' * 20_000} is too long") if inputs["x"][0] < 0 else ValueError("y" * 20_000)

    for batching in (False, True):
        model = _adapter(False, [])
        model.stage, model.batching = _Echo(False), batching
        request = _request(-1) if batching else {"x": _Tensor("x", np.array([-1]))}
        other = _request(1) if batching else {"x": _Tensor("x", np.array([1]))}
        (bad, fault) = _answers(model.execute([request, other]))
        assert bad[0] == "INVALID_ARG" and bad[1].startswith("doubler: x = 999")
        assert fault[0] == "INTERNAL" and fault[1].startswith("doubler: internal error: ValueError: yyy")
        for _, message in (bad, fault):
            assert len(message) < 8192 and message.endswith(" chars in all)"), message[-40:]  # gRPC's soft limit
