"""Triton entry point of the A/B router; the logic is online.router.ABRouter."""

from online.router import RouterModel


class TritonPythonModel(RouterModel):
    pass
