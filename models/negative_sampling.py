"""Sampled negatives for the light ranker: positives plus items the user was never shown.

The light ranker sorts the retrieved candidates, most of which the user was never exposed to, so
it learns "clicked vs. random item of the catalog" rather than only "clicked vs. shown and skipped".
For each positive row (``label > 0``) this draws ``ratio`` items and pairs them with the same user:

* ``uniform``: every item of the training catalog equally likely;
* ``popularity``: items in proportion to their number of positives, so popular items - which the
  retrieval stage returns often - are also the negatives the ranker sees often.

A sampled item can occasionally be one the user did like; at ``ratio`` items out of a catalog of
hundreds this label noise is small and the usual price of sampled training.

This is deliberately small and local to the light ranker (a frame in, a frame out, on pandas or
cudf); a dataset-level sampler in ``workflows/`` can replace it.
"""
from __future__ import annotations

import numpy as np
from merlin.core.dispatch import concat


def sample_negatives(frame, item_columns: list[str], ratio: int, strategy: str, label: str = "click",
                     item_id: str = "item_id", seed: int = 42):
    """Return the positive rows of ``frame`` plus ``ratio`` sampled negatives per positive, shuffled.

    ``frame`` holds encoded features and ``label``; ``item_columns`` are the item-side columns that
    travel with a sampled ``item_id`` (looked up from the frame's own rows of that item).
    """
    if strategy not in ("uniform", "popularity"):
        raise ValueError(f"negative sampling strategy must be 'uniform' or 'popularity', got {strategy!r}")
    if ratio < 1:
        raise ValueError(f"negatives per positive must be >= 1, got {ratio}")
    missing = [c for c in [label, item_id, *item_columns] if c not in frame.columns]
    if missing:
        raise ValueError(f"cannot sample negatives: frame is missing column(s) {missing}")

    positives = frame[frame[label] > 0].reset_index(drop=True)
    if len(positives) == 0:
        raise ValueError(f"cannot sample negatives: no row has a positive '{label}'")
    items = frame[[item_id, *[c for c in item_columns if c != item_id]]].drop_duplicates(subset=[item_id])
    items = items.sort_values(item_id).reset_index(drop=True)

    rng = np.random.default_rng(seed)
    catalog = _host(items[item_id])
    if strategy == "uniform":
        probs = None
    else:
        counts = positives[item_id].value_counts()
        weights = np.zeros(len(catalog), dtype=np.float64)
        pos = np.searchsorted(catalog, _host(counts.index))
        weights[pos] = _host(counts).astype(np.float64)
        weights += 1.0  # items with no positive yet are still possible negatives
        probs = weights / weights.sum()
    sampled = catalog[rng.choice(len(catalog), size=len(positives) * ratio, p=probs)]

    user_side = [c for c in positives.columns if c not in item_columns and c != item_id]
    negatives = positives[user_side].take(np.repeat(np.arange(len(positives)), ratio)).reset_index(drop=True)
    negatives[item_id] = sampled
    negatives = negatives.merge(items, on=item_id, how="left")
    for col in positives.columns:
        if col != item_id and col not in user_side and col not in negatives.columns:
            raise ValueError(f"item column {col!r} could not be looked up for sampled items")
    negatives[label] = 0
    positives = positives.copy()
    positives[label] = 1
    out = concat([positives, negatives[positives.columns]], ignore_index=True)
    order = rng.permutation(len(out))
    return out.take(order).reset_index(drop=True)


def _host(values) -> np.ndarray:
    """A host numpy copy of a pandas/cudf series or index (sampling runs on host; tiny arrays)."""
    if hasattr(values, "to_numpy"):
        try:
            return values.to_numpy()
        except (TypeError, ValueError):
            pass
    return values.values_host if hasattr(values, "values_host") else np.asarray(values)
