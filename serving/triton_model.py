"""The one adapter between Triton's Python backend and the stage classes of ``serving/stages.py``.

Each ``triton_repo/<stage>/1/model.py`` subclasses ``StageModel`` and names its stage; this class
loads the stage from the model version folder and turns every request into ``stage.run(inputs)``.

Cross-cutting serving concerns live here, not in the stages:

* a malformed request (``serving.request.RequestError``) gets an ``INVALID_ARGUMENT`` error naming
  the problem, any other exception an ``INTERNAL`` "internal error" response: clients retry only
  the server's faults, and no exception escapes to crash the stub;
* every request is timed and counted in the custom metrics of ``serving/metrics.py`` (latency,
  candidates passed on, fallback responses, errors by kind), recorded on a background thread so
  the response does not wait for the metric updates, at most every ``metrics_interval_s`` (the
  config.pbtxt parameter the export writes) so a busy stage sends one update per series, not per
  request;
* every stub process publishes its own resident memory and CPU time (``ProcessSampler``, per
  model, version and instance), sampled on a thread of its own;
* with Triton's dynamic batcher on (``max_batch_size > 0``, ``serving.batching``), ``execute`` gets
  several requests, each with a leading batch dimension of 1 that the ensemble added: it strips
  it, serves them all with one ``stage.run_batch`` (one model call), and adds it back to every
  output. If the batch raises, the requests are served one by one, so a malformed request fails
  alone and the others get the answer they would have got alone.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np


def metrics_interval(model_config: dict) -> float:
    """How often this model's stub sends its queued metric updates: the ``metrics_interval_s``
    parameter the export writes into ``config.pbtxt`` (``serving.metrics_interval_s``), or that
    setting's default for a repository exported before it existed."""
    from configs import ServingConfig
    from serving.interface import METRICS_INTERVAL_PARAMETER

    value = model_config.get("parameters", {}).get(METRICS_INTERVAL_PARAMETER, {}).get("string_value")
    return float(value) if value not in (None, "") else ServingConfig().metrics_interval_s


class StageModel:
    stage_name: str = ""

    def initialize(self, args: dict) -> None:
        import faulthandler
        import signal

        import triton_python_backend_utils as pb_utils

        # SIGUSR1 prints every thread's stack to the server log: how the server process
        # (deployment/server.py) shows where a stage that never became ready is stuck.
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        self.pb = pb_utils
        config = json.loads(args["model_config"])
        self.metrics_interval_s = metrics_interval(config)
        artifacts = Path(args["model_repository"]) / args["model_version"]
        self.stage = self.build_stage(artifacts, args)
        self.input_names = [i["name"] for i in config["input"]]
        self.batching = int(config.get("max_batch_size", 0)) > 0
        self.outputs = [(o["name"], pb_utils.triton_string_to_numpy(o["data_type"])) for o in config["output"]]
        self.metrics = None
        try:
            self.metrics = self.build_metrics(args)
        except Exception as err:  # metrics are an aid: a server without them still serves
            pb_utils.Logger.log_warn(f"{self.stage_name}: custom metrics disabled: {type(err).__name__}: {err}")
        self.process_sampler = None
        try:
            from serving.metrics import ProcessSampler

            labels = {k: args.get(f"model_{k}", "") for k in ("name", "version", "instance_name")}
            self.process_sampler = ProcessSampler(
                pb_utils,
                {"model": labels["name"], "version": labels["version"], "model_instance": labels["instance_name"]},
                on_error=lambda err: pb_utils.Logger.log_warn(f"{self.stage_name}: process metrics failed: {err}"),
            )
        except Exception as err:
            pb_utils.Logger.log_warn(f"{self.stage_name}: process metrics disabled: {type(err).__name__}: {err}")

    def build_stage(self, artifacts: Path, args: dict):
        from serving.stages import STAGES

        return STAGES[self.stage_name](artifacts)

    def build_metrics(self, args: dict):
        from serving.metrics import StageMetrics

        return self.off_request_path(
            StageMetrics(self.pb, self.stage_name, args["model_version"], [n for n, _ in self.outputs])
        )

    def off_request_path(self, metrics):
        """``metrics`` recorded on a background thread; a failed update is logged, never raised."""
        from serving.metrics import BackgroundRecorder

        return BackgroundRecorder(
            metrics,
            lambda err: self.pb.Logger.log_warn(f"{self.stage_name}: metric update failed: {err}"),
            interval_s=self.metrics_interval_s,
        )

    def execute(self, requests):
        if self.batching:
            return self.execute_batch(requests)
        from serving.request import RequestError

        responses = []
        for request in requests:
            start, result, error_kind = time.perf_counter(), None, None
            try:
                inputs = {}
                for name in self.input_names:
                    tensor = self.pb.get_input_tensor_by_name(request, name)
                    if tensor is not None:
                        inputs[name] = tensor.as_numpy()
                result = self.stage.run(inputs)
                tensors = [self.pb.Tensor(n, np.asarray(result[n]).astype(dt, copy=False)) for n, dt in self.outputs]
                responses.append(self.pb.InferenceResponse(output_tensors=tensors))
            except RequestError as err:
                error_kind = "bad_request"
                responses.append(self._error(f"{self.stage_name}: {err}", self.pb.TritonError.INVALID_ARG))
            except Exception as err:  # a bug must fail the request, not the server
                error_kind = "internal"
                responses.append(
                    self._error(
                        f"{self.stage_name}: internal error: {type(err).__name__}: {err}", self.pb.TritonError.INTERNAL
                    )
                )
            self._record(time.perf_counter() - start, result, error_kind)
        return responses

    def execute_batch(self, requests):
        """Every request of a dynamic batch with one ``stage.run_batch``; see the module docstring."""
        from serving.request import RequestError

        start = time.perf_counter()
        results: list = [None] * len(requests)  # per request: outputs, or the exception it gets
        batch, where = [], []
        for i, request in enumerate(requests):
            try:
                batch.append(self._unbatched_inputs(request))
                where.append(i)
            except Exception as err:  # a RequestError or a bug: this request's answer, not the batch's
                results[i] = err
        if batch:
            try:
                outputs = self.stage.run_batch(batch)
                if len(outputs) != len(batch):  # zip would leave the last requests without an answer
                    raise RuntimeError(f"run_batch returned {len(outputs)} results for {len(batch)} requests")
            except Exception as err:  # one malformed request must not fail the others: serve them alone
                if not isinstance(err, RequestError):  # the server's fault: say so, or every batch falls back unseen
                    self.pb.Logger.log_warn(
                        f"{self.stage_name}: run_batch failed, serving {len(batch)} requests one by one: "
                        f"{type(err).__name__}: {err}"
                    )
                outputs = []
                for inputs in batch:
                    try:
                        outputs.append(self.stage.run(inputs))
                    except Exception as err:
                        outputs.append(err)
            for i, result in zip(where, outputs):
                results[i] = result
        seconds = time.perf_counter() - start  # every request of the batch waited for all of it
        responses = []
        for result in results:
            error_kind = None
            if isinstance(result, RequestError):
                error_kind = "bad_request"
                responses.append(self._error(f"{self.stage_name}: {result}", self.pb.TritonError.INVALID_ARG))
            elif isinstance(result, Exception):
                error_kind = "internal"
                responses.append(
                    self._error(
                        f"{self.stage_name}: internal error: {type(result).__name__}: {result}",
                        self.pb.TritonError.INTERNAL,
                    )
                )
            else:
                try:
                    tensors = [
                        self.pb.Tensor(n, np.asarray(result[n]).astype(dt, copy=False)[np.newaxis])
                        for n, dt in self.outputs
                    ]
                    responses.append(self.pb.InferenceResponse(output_tensors=tensors))
                except Exception as err:
                    error_kind, result = "internal", None
                    responses.append(
                        self._error(
                            f"{self.stage_name}: internal error: {type(err).__name__}: {err}",
                            self.pb.TritonError.INTERNAL,
                        )
                    )
            self._record(seconds, None if error_kind else result, error_kind)
        return responses

    def _unbatched_inputs(self, request) -> dict:
        """A batched request's inputs without the leading batch dimension (of 1: the ensemble sends
        one request per call; a client calling the stage directly must too)."""
        from serving.request import RequestError

        inputs = {}
        for name in self.input_names:
            tensor = self.pb.get_input_tensor_by_name(request, name)
            if tensor is not None:
                value = tensor.as_numpy()
                if value.ndim == 0 or value.shape[0] != 1:
                    raise RequestError(f"input '{name}' must hold one request (batch size 1), got {list(value.shape)}")
                inputs[name] = value[0]
        return inputs

    def _record(self, seconds: float, result, error_kind) -> None:
        if self.metrics is None:
            return
        try:
            self.metrics.observe(seconds, result, error_kind)
        except Exception as err:  # never fail a request over a metric
            self.pb.Logger.log_warn(f"{self.stage_name}: metric update failed: {err}")

    def _error(self, message: str, code):
        """An error response; the message cut to ``serving.request.MAX_MESSAGE_CHARS``, which gRPC
        clients accept (a longer one reached them as RESOURCE_EXHAUSTED, whatever ``code`` was)."""
        from serving.request import capped_message

        return self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(capped_message(message), code))

    def finalize(self) -> None:
        if getattr(self, "process_sampler", None):
            self.process_sampler.close()
        close_metrics = getattr(self.metrics, "close", None)  # a BackgroundRecorder: record what is queued
        if close_metrics:
            self.metrics.flush()
            close_metrics()
        close = getattr(self.stage, "close", None) or getattr(getattr(self.stage, "store", None), "close", None)
        if close:
            close()


class FusedFunnelModel(StageModel):
    """The fused funnel (``serving/fused.py``): every stage in this one model, each stage's metrics
    recorded as its own model would record them (``serving.metrics.FusedMetrics``)."""

    stage_name = "fused_funnel"

    def build_stage(self, artifacts: Path, args: dict):
        from serving.fused import FusedFunnel

        return FusedFunnel(artifacts)

    def build_metrics(self, args: dict):
        from serving.metrics import FusedMetrics

        outputs = {stage.name: [t.name for t in stage.outputs] for stage in self.stage.stages}
        return self.off_request_path(FusedMetrics(self.pb, self.stage_name, args["model_version"], outputs))

    def execute_batch(self, requests):
        self._spent_before = dict(self.stage.spent)
        try:
            return super().execute_batch(requests)
        finally:
            self._spent_before = None

    def _record(self, seconds: float, result, error_kind) -> None:
        # Served: each stage's own time in the last run, or in the whole batch (a batch's time charged
        # to each of its requests, as the stages' own models do: where it fell back to one request at
        # a time, every stage's time in the failed batch and in each request alone); refused: the
        # fused model's time.
        if error_kind:
            timings = seconds
        elif getattr(self, "_spent_before", None) is not None:
            timings = {name: s - self._spent_before.get(name, 0.0) for name, s in self.stage.spent.items()}
        else:
            timings = dict(self.stage.timings)
        super()._record(timings, result, error_kind)
