"""Triton entry point of the 'retrieval' stage; the logic is serving.stages.Retrieval."""

from serving.triton_model import StageModel


class TritonPythonModel(StageModel):
    stage_name = "retrieval"
