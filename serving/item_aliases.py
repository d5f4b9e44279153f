"""One item under two ids, at serving: a duplicate's raw id answers for its canonical item.

The dataset pipeline maps every duplicated item to one canonical id (``workflows/dedup.py``), so
the models, the catalog and the history hold canonical ids only. Raw ids still arrive from outside
after the export: a request's ``exclude_item_ids``, a live event, a takedown. Each may name the
other copy of an item; read through these aliases it reaches the item the funnel serves, where
before it matched nothing until the next training run.

The version's ``item_aliases.parquet`` (``models/train.py``, from ``workflows.dedup.duplicate_ids``)
holds one ``item_id_raw, canonical_item_id_raw`` row per duplicate id; an id it does not list is its
own canonical id.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FILE = "item_aliases.parquet"


class ItemAliases:
    """Maps raw item ids to the canonical raw ids the export serves (sorted lookup, no per-id Python)."""

    def __init__(self, raw: np.ndarray, canonical: np.ndarray):
        raw, canonical = np.asarray(raw, np.int64), np.asarray(canonical, np.int64)
        if raw.shape != canonical.shape:
            raise ValueError("item aliases: raw and canonical ids differ in length")
        order = np.argsort(raw, kind="stable")
        self.raw, self.canonical = raw[order], canonical[order]
        if np.any(self.raw[1:] == self.raw[:-1]):
            raise ValueError("item aliases: a raw id maps to two canonical ids")

    @classmethod
    def load(cls, folder: str | Path) -> ItemAliases:
        """The aliases a stage folder holds; none (every id its own) for a version exported without."""
        path = Path(folder) / FILE
        if not path.exists():
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int64))
        from workflows.local_parquet import read_parquet  # a small table read once per stage process

        table = read_parquet(path, columns=["item_id_raw", "canonical_item_id_raw"])
        return cls(table["item_id_raw"].to_numpy(np.int64), table["canonical_item_id_raw"].to_numpy(np.int64))

    def __len__(self) -> int:
        return int(self.raw.size)

    def canonical_ids(self, raw_ids) -> np.ndarray:
        """``raw_ids`` with every duplicate id replaced by its canonical id (order and length kept)."""
        ids = np.asarray(raw_ids, dtype=np.int64).reshape(-1)
        if self.raw.size == 0 or ids.size == 0:
            return ids
        at = np.minimum(np.searchsorted(self.raw, ids), self.raw.size - 1)
        return np.where(self.raw[at] == ids, self.canonical[at], ids)
