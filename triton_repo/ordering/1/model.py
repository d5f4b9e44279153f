"""Triton entry point of the 'ordering' stage; the logic is serving.stages.Ordering."""

from serving.triton_model import StageModel


class TritonPythonModel(StageModel):
    stage_name = "ordering"
