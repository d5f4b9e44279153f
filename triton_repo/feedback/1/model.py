"""Triton entry point of the feedback endpoint; the logic is serving.ab_router.FeedbackService."""
from serving.triton_model import FeedbackModel


class TritonPythonModel(FeedbackModel):
    pass
