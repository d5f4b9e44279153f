"""Triton entry point of the fused funnel (every stage in one model); the logic is serving.fused.FusedFunnel."""

from serving.triton_model import FusedFunnelModel


class TritonPythonModel(FusedFunnelModel):
    pass
