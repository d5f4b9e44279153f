"""Columns of pandas or cudf frames as host numpy arrays.

Training reads NVTabular output with whichever frame library Merlin dispatched (cudf on a GPU,
pandas on CPU); the small per-item arrays that sampling and the item affinity build live on the
host, so they come through here.
"""

from __future__ import annotations

import numpy as np


def to_host(values) -> np.ndarray:
    """A host numpy copy of a pandas or cudf series or index (or anything ``np.asarray`` takes)."""
    if hasattr(values, "values_host"):  # cudf: an explicit device -> host copy
        return values.values_host
    if hasattr(values, "to_numpy"):
        return values.to_numpy()
    return np.asarray(values)
