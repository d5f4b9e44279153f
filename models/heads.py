"""What a ranker's heads mean: its raw output mapped to targets, and the heads combined into one score.

Pure numpy, without TensorFlow or Merlin, so the serving stages can use it without importing the
training stack (a Python-backend stub that imports Merlin takes ~1 s longer to start).
"""

from __future__ import annotations

import numpy as np


def head_outputs(out, targets: list[str]) -> dict[str, np.ndarray]:
    """Map a model's output (one tensor, or a dict keyed like ``click/binary_output``) to targets."""
    if not isinstance(out, dict):
        if len(targets) != 1:
            raise ValueError(f"model has one output but {len(targets)} targets {targets}")
        return {targets[0]: np.asarray(out, dtype=np.float32).reshape(-1)}
    result = {}
    for t in targets:
        keys = [k for k in out if k == t or k.split("/")[0] == t]
        if not keys:
            raise KeyError(f"model has no head for target {t!r}; heads: {sorted(out)}")
        result[t] = np.asarray(out[keys[0]], dtype=np.float32).reshape(-1)
    return result


def combine(head_scores: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """The final score: the weighted sum of the heads' probabilities (in [0, 1] for weights summing to 1)."""
    missing = [t for t in weights if t not in head_scores]
    if missing:
        raise KeyError(f"no head score for target(s) {missing}")
    total = sum(weights[t] * np.asarray(head_scores[t], dtype=np.float64) for t in weights)
    return np.asarray(total, dtype=np.float32)
