"""Triton entry point of the 'light_ranker' stage; the logic is serving.stages.LightRanker."""

from serving.triton_model import StageModel


class TritonPythonModel(StageModel):
    stage_name = "light_ranker"
