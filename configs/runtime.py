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
    r".*Using the 'subgraph' approach.*",  # merlin.io writing one output file per split, as asked
    # implicit checks the BLAS pool before ALS fits; evaluation/peers.py fits under threadpool_limits(1)
    r".*OpenBLAS is configured to use.*",
]


def quiet_known_warnings() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for pattern in HARMLESS:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("absl").setLevel(logging.ERROR)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    try:  # absl resets its logger's level from its own verbosity flag ("Found untraced functions ...")
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:
        pass
