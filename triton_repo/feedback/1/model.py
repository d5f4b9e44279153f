"""Triton entry point of the feedback endpoint; the logic is online.router.FeedbackService."""

from online.router import FeedbackModel


class TritonPythonModel(FeedbackModel):
    pass
