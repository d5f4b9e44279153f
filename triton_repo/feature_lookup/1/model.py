"""Triton entry point of the 'feature_lookup' stage; the logic is serving.stages.FeatureLookup."""

from serving.triton_model import StageModel


class TritonPythonModel(StageModel):
    stage_name = "feature_lookup"
