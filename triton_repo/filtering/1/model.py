"""Triton entry point of the 'filtering' stage; the logic is serving.stages.Filtering."""

from serving.triton_model import StageModel


class TritonPythonModel(StageModel):
    stage_name = "filtering"
