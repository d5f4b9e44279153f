"""Triton entry point of the 'query_tower' stage; the logic is serving.stages.QueryTower."""

from serving.triton_model import StageModel


class TritonPythonModel(StageModel):
    stage_name = "query_tower"
