"""Item-to-item affinity: how strongly a user's history points at a candidate item.

The two-tower sees a user through one embedding and the DCN rankers through features; neither looks
at *which* items the user already has. Item-to-item collaborative filtering does: "users who had
these items also had that one". This module learns those item-item weights in closed form with EASE
(Steck 2019, "Embarrassingly Shallow Autoencoders for Sparse Data")::

    P = (X^T X + reg_weight * I)^-1        X: users x items, 1 where the user has the item
    B = I - P / diag(P),  diag(B) = 0      B[h, c]: how much having h predicts c

    affinity(user, c) = sum over the user's history h of B[h, c]

``item_affinity.dropout`` > 0 turns EASE into EDLAE (Steck 2020, "Autoencoders that don't overfit
towards the identity"): training as a denoising autoencoder that drops each input item with
probability ``p`` is, in closed form, a penalty that grows with the item's count,
``reg_weight + p / (1 - p) * count(item)`` on the diagonal of ``X^T X``; popular items, whose
co-occurrences are the most certain, are held back most. On MovieLens-100K (docs/measurements.md)
it ranks the whole catalog about 1% better than EASE, yet blended into the funnel it moved nothing.

The ordering stage blends a candidate's affinity into the final score
(``serving.ordering.affinity_weight``, ``serving/ordering.py``); the history is the online store's
(the "already seen" filter's), so training and serving read the same items.

Why the dense closed form: the negative weights (having h makes c *less* likely) carry much of its
accuracy, so keeping only each item's 50-200 strongest neighbours cost 2-4% NDCG@10 on MovieLens-100K
(README, "Offline evaluation"). The price is ``items^2`` weights (float32) and an ``items^3``
solve, so ``item_affinity.max_items`` refuses catalogs where that would not fit; the solve runs on
the GPU with cupy where one exists.

The weights are stamped with the training run's version, like the query tower and the item index;
``load`` refuses weights of another run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from models.columns import to_host
from models.item_index import check_versions

WEIGHTS_FILE = "item_affinity.npy"
META_FILE = "item_affinity.json"


def _solver():
    """cupy where a GPU is present (the ``items^3`` solve is the cost), numpy otherwise."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:  # no cupy, or no usable device
        pass
    return np


def fit(user_rows, item_ids, num_items: int, reg_weight: float, max_items: int, dropout: float = 0.0) -> np.ndarray:
    """EASE weights ``B`` (``[num_items, num_items]`` float32, zero diagonal) from parallel arrays of
    user rows and encoded item ids (one pair per interaction; repeats count once); EDLAE's with
    ``dropout`` > 0."""
    if num_items > max_items:
        raise ValueError(
            f"item_affinity needs a dense {num_items} x {num_items} weight matrix, above "
            f"item_affinity.max_items={max_items}; raise the limit or set serving.ordering.affinity_weight: 0"
        )
    if reg_weight <= 0:
        raise ValueError(f"item_affinity.reg_weight must be > 0, got {reg_weight}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"item_affinity.dropout must be in [0, 1), got {dropout}")
    user_rows, item_ids = np.asarray(user_rows, dtype=np.int64), np.asarray(item_ids, dtype=np.int64)
    if item_ids.size and (item_ids.min() < 0 or item_ids.max() >= num_items):
        raise ValueError(f"item ids must lie in [0, {num_items}), got [{item_ids.min()}, {item_ids.max()}]")
    num_users = int(user_rows.max()) + 1 if user_rows.size else 0
    x = sp.csr_matrix((np.ones(len(user_rows)), (user_rows, item_ids)), shape=(num_users, num_items))
    return ease_weights(x, reg_weight, dropout)


def ease_weights(x: sp.spmatrix, reg_weight: float, dropout: float = 0.0) -> np.ndarray:
    """EASE's closed form for a users x items interaction matrix (any nonzero counts once):
    ``B = I - P / diag(P)``, ``P = (X^T X + reg_weight I)^-1``, ``diag(B) = 0``; float32. The item
    affinity and the EASE peer of the offline evaluation (``evaluation/peers.py``) both use it.
    ``dropout`` > 0: EDLAE, the penalty of item ``i`` ``reg_weight + dropout / (1 - dropout) * G[i, i]``."""
    x = sp.csr_matrix(x, dtype=np.float64, copy=True)
    x.data[:] = 1.0  # an item the user had twice still counts once
    num_items = x.shape[1]
    xp = _solver()
    gram = xp.asarray((x.T @ x).toarray())
    gram[xp.diag_indices(num_items)] += reg_weight + dropout / (1.0 - dropout) * xp.diag(gram)
    p = xp.linalg.inv(gram)
    b = -p / xp.diag(p)
    b[xp.diag_indices(num_items)] = 0.0
    b = b.astype(xp.float32)
    return b.get() if xp is not np else b


def save(weights: np.ndarray, directory: str | Path, version: int, reg_weight: float, dropout: float = 0.0) -> None:
    directory = Path(directory)
    np.save(directory / WEIGHTS_FILE, np.asarray(weights, dtype=np.float32))
    meta = {
        "version": int(version),
        "items": int(weights.shape[0]),
        "reg_weight": float(reg_weight),
        "dropout": float(dropout),
    }
    (directory / META_FILE).write_text(json.dumps(meta))


def load(directory: str | Path, expected_version: int | None = None) -> tuple[np.ndarray, dict]:
    """The weights (memory-mapped: stage processes share the pages) and their metadata."""
    directory = Path(directory)
    meta = json.loads((directory / META_FILE).read_text())
    if expected_version is not None:
        check_versions(manifest=expected_version, item_affinity=meta["version"])
    weights = np.load(directory / WEIGHTS_FILE, mmap_mode="r")
    if weights.shape != (meta["items"], meta["items"]):
        raise RuntimeError(
            f"{directory / WEIGHTS_FILE} has shape {weights.shape}, its metadata says {meta['items']} items"
        )
    return weights, meta


def scores(weights: np.ndarray, history: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Affinity of each of ``candidates`` to ``history`` (encoded item ids): ``sum_h B[h, c]``.
    An item the history names twice counts once (the binary row of ``X`` the weights were fitted on).
    Zeros for an empty history; a ``ValueError`` for ids outside the weights."""
    history = np.unique(np.asarray(history, dtype=np.int64).reshape(-1))
    candidates = np.asarray(candidates, dtype=np.int64).reshape(-1)
    size = weights.shape[0]
    for name, ids in (("history", history), ("candidate", candidates)):
        if ids.size and (ids.min() < 0 or ids.max() >= size):
            raise ValueError(f"{name} ids outside the {size} items the affinity weights cover")
    if history.size == 0 or candidates.size == 0:
        return np.zeros(candidates.size, dtype=np.float64)
    return np.asarray(weights[np.ix_(history, candidates)], dtype=np.float64).sum(axis=0)


def fit_from_history(history, item_table, reg_weight: float, max_items: int, dropout: float = 0.0) -> np.ndarray:
    """EASE weights from the training history the online store serves (``user_id_raw``,
    ``item_id_raw``; pandas or cudf) over the catalog of ``item_table`` (``item_id_raw`` -> encoded
    ``item_id``), so a weight's row and column are the encoded ids serving passes around."""
    encoded = history.merge(item_table[["item_id_raw", "item_id"]], on="item_id_raw", how="inner")
    users = to_host(encoded["user_id_raw"])
    user_rows = np.unique(users, return_inverse=True)[1]
    num_items = int(item_table["item_id"].max()) + 1
    return fit(user_rows, to_host(encoded["item_id"]), num_items, reg_weight, max_items, dropout)
