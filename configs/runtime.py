"""Process-wide settings for the entry points: silence the warnings known to be harmless.

Merlin warns on every Dataset created without a GPU ("CPU mode ... experimental") and about torch
dtype mappings when torch is absent; TensorFlow logs untraced-function notes on every SavedModel.
They bury the output users need to read, and say nothing actionable on a CPU machine.
"""
from __future__ import annotations

import logging
import os
import warnings

HARMLESS = [
    r".*NVTabular Dataset (in|to) CPU mode.*",
    r".*PyTorch dtype mappings did not load.*",
    r".*pkg_resources is deprecated.*",  # mlflow-skinny 1.26 imports it (models/tracking.py)
]


def quiet_known_warnings() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for pattern in HARMLESS:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("absl").setLevel(logging.ERROR)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
