"""Triton entry point of the A/B router; the logic is serving.ab_router.ABRouter."""
from serving.triton_model import RouterModel


class TritonPythonModel(RouterModel):
    pass
