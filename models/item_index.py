"""The ANN item index the candidate generator retrieves from (faiss, inner product).

Exact search (``IndexFlatIP``) below ``exact_max_items``: at small catalogs it is both exact and
fast. Above it, HNSW trades a little recall for sub-linear search. Index ids are encoded item ids.

The index is built from one training run's item embeddings and stamped with that run's version; the
query tower carries the same stamp, and ``check_versions`` refuses a mismatched pair, because a
query embedding from one run is meaningless against item embeddings of another.
"""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np

INDEX_FILE = "item_index.faiss"
INDEX_META_FILE = "item_index.json"


class VersionMismatchError(RuntimeError):
    """Two artifacts that must come from one training run carry different versions."""


def build_index(ids: np.ndarray, vectors: np.ndarray, exact_max_items: int) -> faiss.Index:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    if len(ids) <= exact_max_items:
        base = faiss.IndexFlatIP(dim)
    else:
        base = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = 80
        base.hnsw.efSearch = 128
    index = faiss.IndexIDMap(base)
    index.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))
    return index


def save_index(index: faiss.Index, directory: str | Path, version: int) -> None:
    directory = Path(directory)
    faiss.write_index(index, str(directory / INDEX_FILE))
    meta = {"version": int(version), "size": int(index.ntotal), "dim": int(index.d)}
    (directory / INDEX_META_FILE).write_text(json.dumps(meta))


def load_index(directory: str | Path, expected_version: int | None = None) -> tuple[faiss.Index, dict]:
    directory = Path(directory)
    meta = json.loads((directory / INDEX_META_FILE).read_text())
    if expected_version is not None:
        check_versions(query_tower=expected_version, item_index=meta["version"])
    return faiss.read_index(str(directory / INDEX_FILE)), meta


def check_versions(**versions: int) -> int:
    """Raise ``VersionMismatchError`` unless every named artifact has the same version."""
    distinct = set(int(v) for v in versions.values())
    if len(distinct) != 1:
        raise VersionMismatchError(f"artifacts come from different training runs: {versions}")
    return distinct.pop()


def search(index: faiss.Index, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` ids and inner-product scores for one query vector (padding ids removed)."""
    scores, ids = index.search(np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1), k)
    keep = ids[0] >= 0
    return ids[0][keep], scores[0][keep]


class ItemVectors:
    """The vectors an id index holds, by item id: the score ``search`` would give any item.

    Search returns the top ``k``; scoring an item it did not return (a held-out positive, say) needs
    its vector, which the index reconstructs (exact and HNSW indexes both store them)."""

    def __init__(self, index: faiss.Index):
        self._base = faiss.downcast_index(index.index)
        ids = faiss.vector_to_array(index.id_map)
        self._order = np.argsort(ids)
        self._sorted_ids = ids[self._order]

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The vectors of the ``ids`` the index holds (``[n, dim]``; ids it lacks are skipped)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not len(self._sorted_ids) or not len(ids):
            return np.zeros((0, self._base.d), dtype=np.float32)
        at = np.minimum(np.searchsorted(self._sorted_ids, ids), len(self._sorted_ids) - 1)
        positions = self._order[at[self._sorted_ids[at] == ids]]
        return (
            np.stack([self._base.reconstruct(int(p)) for p in positions])
            if len(positions)
            else np.zeros((0, self._base.d), dtype=np.float32)
        )

    def scores(self, query: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Inner product of ``query`` with each of ``ids``' vectors; -inf for ids not in the index."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        at = np.minimum(np.searchsorted(self._sorted_ids, ids), max(len(self._sorted_ids) - 1, 0))
        known = (self._sorted_ids[at] == ids) if len(self._sorted_ids) else np.zeros(len(ids), dtype=bool)
        out = np.full(len(ids), -np.inf, dtype=np.float64)
        if known.any():
            vectors = np.stack([self._base.reconstruct(int(p)) for p in self._order[at[known]]])
            out[known] = vectors @ np.asarray(query, dtype=np.float32).reshape(-1)
        return out
