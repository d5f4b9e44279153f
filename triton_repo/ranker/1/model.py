"""Triton entry point of the 'ranker' stage; the logic is serving.stages.Ranker."""
from serving.triton_model import StageModel


class TritonPythonModel(StageModel):
    stage_name = "ranker"
