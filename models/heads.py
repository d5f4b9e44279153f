"""What a ranker's heads mean: its raw output mapped to targets, the heads of an ensemble's members
averaged (``heavy_ranker.members``, weighted by ``member_weights``), and the heads combined into one
score.

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


def ensemble_heads(members: list[dict[str, np.ndarray]], weights: list[float] | None = None) -> dict[str, np.ndarray]:
    """Each head averaged over an ensemble's members (``heavy_ranker.members``): the plain mean, or
    with ``weights`` (one per member, ``heavy_ranker.member_weights``) the weighted mean. Serving and
    the tuning step both call this, so a tuned trial scores exactly what the export serves."""
    if not members:
        raise ValueError("an ensemble needs at least one member")
    targets = list(members[0])
    if not weights:
        return {t: np.mean([m[t] for m in members], axis=0) for t in targets}
    if len(weights) != len(members):
        raise ValueError(f"{len(weights)} member weights for {len(members)} members")
    total = float(sum(weights))
    return {
        t: (sum(w * np.asarray(m[t], dtype=np.float64) for w, m in zip(weights, members)) / total).astype(np.float32)
        for t in targets
    }


def with_member_weights(spec: dict, weights: list[float]) -> dict:
    """The manifest's ``heavy_ranker`` entry serving ``weights`` (``heavy_ranker.member_weights``;
    empty = the plain mean, no key)."""
    spec = {k: v for k, v in spec.items() if k != "member_weights"}
    if weights:
        members = spec.get("members", ["heavy_ranker"])
        if len(weights) != len(members):
            raise ValueError(f"heavy_ranker.member_weights has {len(weights)} weights for the members {members}")
        spec["member_weights"] = [float(w) for w in weights]
    return spec


def served_members(spec: dict) -> list[tuple[str, float | None]]:
    """``(artifact, weight)`` of each member the heavy ranker stage serves: every member with the
    plain mean (weight ``None``), only those weighted above 0 otherwise."""
    members = spec.get("members", ["heavy_ranker"])
    weights = spec.get("member_weights")
    if not weights:
        return [(name, None) for name in members]
    return [(name, float(w)) for name, w in zip(members, weights) if w > 0]
