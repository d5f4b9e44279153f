"""Evaluation protocols: how interactions are split into train / valid / test.

    recbole_random   RecBole's default for ml-100k: per user, shuffle the interactions and split
                     them 80/10/10 with RecBole's rounding (``_calcu_split_ids``); every interaction is
                     a positive; full ranking over the catalog with training and validation items
                     removed (for the test part)
    temporal         one global cutoff: the newest ``test_fraction`` of interactions (a quantile of
                     their timestamps, not of the time span) is test, the ``valid_fraction`` before
                     it validation (a ``test_fraction`` of 0: no test part; a ``valid_fraction`` of 0: no
                     validation part)
    explicit         train/valid/test given as files (parquet or csv with user_id, item_id), so any
                     published split can be reproduced exactly

Each returns a ``Split`` of three frames with the input's columns. RecBole shuffles with torch's RNG;
this implementation shuffles with numpy's, so the rows differ from RecBole's split but the protocol
(sizes per user, rounding, full ranking) is the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from workflows.local_parquet import read_parquet


@dataclass
class Split:
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "valid": len(self.valid), "test": len(self.test)}


def recbole_split_sizes(total: int, ratios=(0.8, 0.1, 0.1)) -> list[int]:
    """RecBole's ``_calcu_split_ids``: floor each share, give the rest to train, and make sure a
    split whose share is in (0, 1) interactions still gets one while train keeps more than one."""
    counts = [int(r * total) for r in ratios]
    counts[0] = total - sum(counts[1:])
    for i in range(1, len(ratios)):
        if counts[0] <= 1:
            break
        if 0 < ratios[-i] * total < 1:
            counts[-i] += 1
            counts[0] -= 1
    return counts


def recbole_random(interactions: pd.DataFrame, seed: int = 2020, ratios=(0.8, 0.1, 0.1)) -> Split:
    """Per user, a random order cut by ``recbole_split_sizes``. ``ratios`` need not sum to 1: they are
    normalised first, as RecBole's ``split_by_ratio`` does (``(8, 1, 1)`` is 80/10/10; unnormalised,
    the rounding made every interaction a test one)."""
    if len(ratios) != 3 or any(r < 0 for r in ratios) or not sum(ratios) > 0:
        raise ValueError(f"ratios must be three non-negative numbers with a positive sum, got {list(ratios)}")
    total = sum(ratios)
    ratios = [r / total for r in ratios]
    rng = np.random.default_rng(seed)
    # Rows are taken by label below: a repeated label (frames concatenated as they were) would take
    # every row holding it, another user's included, into train and test alike.
    interactions = interactions.reset_index(drop=True)
    parts = {0: [], 1: [], 2: []}
    for _, rows in interactions.groupby("user_id", sort=True):
        idx = rows.index.to_numpy()[rng.permutation(len(rows))]
        n_train, n_valid, _ = recbole_split_sizes(len(idx), ratios)
        parts[0].append(idx[:n_train])
        parts[1].append(idx[n_train : n_train + n_valid])
        parts[2].append(idx[n_train + n_valid :])
    take = lambda p: interactions.loc[np.concatenate(parts[p])].reset_index(drop=True)  # noqa: E731
    return Split(take(0), take(1), take(2))


def temporal(interactions: pd.DataFrame, valid_fraction: float = 0.1, test_fraction: float = 0.1) -> Split:
    t = interactions["timestamp"]
    valid_cut = t.quantile(1 - test_fraction - valid_fraction)
    # A test fraction of 0 is no test part (the 1.0 quantile would make the newest timestamp's events one).
    none = pd.Series(False, index=t.index)
    test = t >= t.quantile(1 - test_fraction) if test_fraction > 0 else none
    # Nor is a valid fraction of 0 a validation part (with no test part either, its cut was the 1.0 quantile).
    valid = (t >= valid_cut) & ~test if valid_fraction > 0 else none
    return Split(
        interactions[~valid & ~test].reset_index(drop=True),
        interactions[valid].reset_index(drop=True),
        interactions[test].reset_index(drop=True),
    )


def _read(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    frame = read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    missing = {"user_id", "item_id"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path} lacks column(s) {sorted(missing)}")
    return frame


def explicit(train_path, valid_path, test_path) -> Split:
    return Split(_read(train_path), _read(valid_path), _read(test_path))
