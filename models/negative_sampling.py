"""Sampled negatives for the rankers: positives plus items the user was never shown.

``sample_negatives`` (the light ranker) draws them at random; ``affinity_negatives`` (the heavy
ranker's members with ``hard_negatives``) takes the unrated items the user's history points at most.

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

from models.columns import to_host


def rng_rows(seed: int) -> np.random.Generator:
    """The generator that picks which row a negative copies, apart from the one that draws items."""
    return np.random.default_rng([seed, 1])


def random_rows(keys: np.ndarray, wanted: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each of ``wanted``, the position of a random row of ``keys`` holding that key (uniform over
    its rows). Every wanted key must occur in ``keys``.

    Why not the key's first row: a frame's rows carry point-in-time features (an item's click rate
    before the event, the hour of the event), and in time order the first row is the earliest one,
    where every count is still the no-history prior. Negatives that all copied it differed from the
    positives in those columns alone, a shortcut the ranker learned instead of the items."""
    keys = np.asarray(keys, dtype=np.int64)
    wanted = np.asarray(wanted, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    start = np.searchsorted(keys[order], wanted, side="left")
    end = np.searchsorted(keys[order], wanted, side="right")
    if (end <= start).any():
        raise ValueError("a wanted key has no row")
    return order[start + (rng.random(len(wanted)) * (end - start)).astype(np.int64)]


def item_side(frame, item_keys: np.ndarray, columns: list[str], items: np.ndarray, rng: np.random.Generator):
    """``columns`` of ``items``, each row from a random row of that item in ``frame`` (``random_rows``;
    ``item_keys``: ``frame``'s item ids on the host), in ``items``' order with a fresh index."""
    rows = random_rows(item_keys, items, rng)
    return frame[columns].take(rows).reset_index(drop=True)


def sample_negatives(
    frame,
    item_columns: list[str],
    ratio: int,
    strategy: str,
    label: str = "click",
    item_id: str = "item_id",
    seed: int = 42,
):
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

    rng = np.random.default_rng(seed)
    item_keys = to_host(frame[item_id]).astype(np.int64)  # one copy to the host, for the draws and the rows
    catalog = np.unique(item_keys)
    if strategy == "uniform":
        probs = None
    else:
        counts = positives[item_id].value_counts()
        weights = np.zeros(len(catalog), dtype=np.float64)
        pos = np.searchsorted(catalog, to_host(counts.index))
        weights[pos] = to_host(counts).astype(np.float64)
        weights += 1.0  # items with no positive yet are still possible negatives
        probs = weights / weights.sum()
    sampled = catalog[rng.choice(len(catalog), size=len(positives) * ratio, p=probs)]

    user_side = [c for c in positives.columns if c not in item_columns and c != item_id]
    negatives = positives[user_side].take(np.repeat(np.arange(len(positives)), ratio)).reset_index(drop=True)
    # Each negative's item columns from a random row of its item (its own generator: the draws above
    # and the shuffle below are the same whatever the item columns hold).
    columns = [item_id, *[c for c in item_columns if c != item_id]]
    items = item_side(frame, item_keys, columns, sampled, rng_rows(seed))
    for col in items.columns:
        negatives[col] = items[col]
    for col in positives.columns:
        if col != item_id and col not in user_side and col not in negatives.columns:
            raise ValueError(f"item column {col!r} could not be looked up for sampled items")
    negatives[label] = 0
    positives = positives.copy()
    positives[label] = 1
    out = concat([positives, negatives[positives.columns]], ignore_index=True)
    order = rng.permutation(len(out))
    return out.take(order).reset_index(drop=True)


def affinity_negatives(
    frame,
    weights: np.ndarray,
    per_user: int,
    labels: list[str],
    item_columns: list[str],
    user_id: str = "user_id",
    item_id: str = "item_id",
    chunk: int = 4096,
    seed: int = 0,
):
    """Hard negatives: per user with a positive, the ``per_user`` items the item affinity of their
    positives ranks highest among the items they have no positive for, as rows of ``frame``'s
    columns with every label 0.

    ``weights`` are the item-to-item affinity weights over encoded item ids (``models/item_affinity.py``);
    a row is positive when any of ``labels`` is > 0. User-side (and context) columns come from a
    random positive row of the user, ``item_columns`` from a random row of the item (``random_rows``,
    seeded by ``seed``), so only items with a row in ``frame`` can be drawn.

    Why: the uniformly sampled negatives are mostly items nothing would retrieve for the user, easy
    to reject on popularity alone; the candidates the heavy ranker sorts when serving are the items
    retrieval and the affinity favour. Such a list also holds items the user rates later (held out),
    labelled 0 here: the label noise of uniform sampling, at a higher rate.
    """
    import scipy.sparse as sp

    if per_user < 1:
        raise ValueError(f"hard negatives per user must be >= 1, got {per_user}")
    missing = [c for c in [user_id, item_id, *labels, *item_columns] if c not in frame.columns]
    if missing:
        raise ValueError(f"cannot draw hard negatives: frame is missing column(s) {missing}")
    size = weights.shape[0]
    positives = frame[frame[labels].max(axis=1) > 0]
    users, items = to_host(positives[user_id]).astype(np.int64), to_host(positives[item_id]).astype(np.int64)
    if items.size and (items.min() < 0 or items.max() >= size):
        raise ValueError(f"item ids outside the {size} items the affinity weights cover")
    known = np.zeros(size, dtype=bool)
    item_keys = to_host(frame[item_id]).astype(np.int64)  # one copy to the host, for both uses
    known[item_keys] = True
    user_list, rows = np.unique(users, return_inverse=True)
    history = sp.csr_matrix((np.ones(len(rows)), (rows, items)), shape=(len(user_list), size))
    history.data[:] = 1.0
    n = min(per_user, size)
    drawn_users, drawn_items = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]  # no positives: no negatives
    for start in range(0, len(user_list), chunk):
        block = history[start : start + chunk]
        scores = np.asarray(block @ weights, dtype=np.float64)
        scores[block.nonzero()] = -np.inf  # never an item the user has a positive for
        scores[:, ~known] = -np.inf
        top = np.argpartition(-scores, n - 1, axis=1)[:, :n]
        usable = np.isfinite(np.take_along_axis(scores, top, axis=1))
        drawn_users.append(np.repeat(user_list[start : start + chunk], n)[usable.ravel()])
        drawn_items.append(top[usable])
    item_only = [c for c in item_columns if c != item_id]
    user_side = [c for c in frame.columns if c not in (user_id, item_id, *item_only, *labels)]
    # Each negative copies a random positive row of its user (user and context columns, as the
    # dataset's sampled negatives copy a positive) and a random row of its item (random_rows).
    rng = rng_rows(seed)
    drawn_users, drawn_items = np.concatenate(drawn_users), np.concatenate(drawn_items)
    negatives = positives[[user_id, *user_side]].take(random_rows(users, drawn_users, rng)).reset_index(drop=True)
    items_of = item_side(frame, item_keys, [item_id, *item_only], drawn_items, rng)
    for col in items_of.columns:
        negatives[col] = items_of[col]
    for label in labels:
        negatives[label] = 0
    return negatives[list(frame.columns)].astype(dict(frame.dtypes))
