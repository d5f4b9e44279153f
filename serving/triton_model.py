"""The one adapter between Triton's Python backend and the stage classes of ``serving/stages.py``.

Each ``triton_repo/<stage>/1/model.py`` subclasses ``StageModel`` and names its stage; this class
loads the stage from the model version folder and turns every request into ``stage.run(inputs)``.
A malformed request gets a Triton error naming the problem; no exception escapes to crash the stub.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class StageModel:
    stage_name: str = ""

    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        from serving.stages import STAGES

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        artifacts = Path(args["model_repository"]) / args["model_version"]
        self.stage = STAGES[self.stage_name](artifacts)
        self.input_names = [i["name"] for i in config["input"]]
        self.outputs = [
            (o["name"], pb_utils.triton_string_to_numpy(o["data_type"])) for o in config["output"]
        ]

    def execute(self, requests):
        from serving.stages import RequestError

        responses = []
        for request in requests:
            try:
                inputs = {}
                for name in self.input_names:
                    tensor = self.pb.get_input_tensor_by_name(request, name)
                    if tensor is not None:
                        inputs[name] = tensor.as_numpy()
                result = self.stage.run(inputs)
                tensors = [self.pb.Tensor(n, np.asarray(result[n]).astype(dt)) for n, dt in self.outputs]
                responses.append(self.pb.InferenceResponse(output_tensors=tensors))
            except RequestError as err:
                responses.append(self._error(f"{self.stage_name}: {err}"))
            except Exception as err:  # a bug must fail the request, not the server
                responses.append(self._error(f"{self.stage_name}: internal error: {type(err).__name__}: {err}"))
        return responses

    def _error(self, message: str):
        return self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(message))

    def finalize(self) -> None:
        close = getattr(getattr(self.stage, "store", None), "close", None)
        if close:
            close()
