"""Triton entry point of the 'heavy_ranker' stage; the logic is serving.stages.HeavyRanker."""

from serving.triton_model import StageModel


class TritonPythonModel(StageModel):
    stage_name = "heavy_ranker"
