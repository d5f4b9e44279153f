"""The ANN item index the candidate generator retrieves from (faiss, inner product).

Exact search (``IndexFlatIP``) up to ``exact_max_items``: at small catalogs it is both exact and
fast. Above it an approximate index (``serving.ann``): inverted lists (``IVF<nlist>,Flat``: the
query is compared exactly with the items of the ``nprobe`` lists whose centroids are nearest) by
default, or an HNSW graph. How far to search is not a guess: the build measures recall@k against
exact search on validation queries (the query tower's own embeddings, which is what serving asks
with) for a ladder of settings and keeps the cheapest that reaches ``target_recall``; the curve
and the choice are saved beside the index (``item_index.json``). Item vectors make poor stand-ins
for those queries: each sits in its own list, so they overstate recall (at 1M items, 2,048 lists,
nprobe 16: 0.86 for item vectors, 0.66 for users' queries).

Index ids are encoded item ids. The index is built from one training run's item embeddings and
stamped with that run's version; the query tower carries the same stamp, and ``check_versions``
refuses a mismatched pair, because a query embedding from one run is meaningless against item
embeddings of another. The stamp lives in ``item_index.json``, so ``save_index`` also records the
index file's SHA-256 there, and ``load_index`` refuses (``IndexIntegrityError``) a file whose bytes,
item count or dimension are not the recorded ones: another run's index copied beside this run's JSON,
or an index whose ids are paired with other vectors. A JSON written before the digest was recorded
loads with a warning that the file is not tied to it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import faiss
import numpy as np

from configs import AnnConfig

INDEX_FILE = "item_index.faiss"
INDEX_META_FILE = "item_index.json"

log = logging.getLogger(__name__)


# Search settings the build tries, cheapest first (IVF: lists probed; HNSW: efSearch).
SEARCH_LADDER = (1, 2, 3, *(m << e for e in range(11) for m in (4, 5, 6)))  # 4, 5, 6, 8, 10, 12, 16, ... 6144


class VersionMismatchError(RuntimeError):
    """Two artifacts that must come from one training run carry different versions."""


class IndexIntegrityError(VersionMismatchError):
    """``item_index.faiss`` is not the file its ``item_index.json`` was written for (digest, size or dim)."""


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 of the bytes of ``path`` (hex), read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def index_file_problem(directory: str | Path, meta: dict | None = None) -> str | None:
    """Why ``directory``'s ``item_index.faiss`` is not the file its ``item_index.json`` (``meta``, read
    when None) records, or None where its SHA-256 matches. Raises ``KeyError`` where the JSON records
    no digest (written before it was recorded): callers say so rather than claim a check."""
    directory = Path(directory)
    meta = json.loads((directory / INDEX_META_FILE).read_text()) if meta is None else meta
    recorded = meta["sha256"]
    actual = file_sha256(directory / INDEX_FILE)
    if actual != recorded:
        return (
            f"{directory / INDEX_FILE} has SHA-256 {actual[:12]}..., its {INDEX_META_FILE} records "
            f"{recorded[:12]}... (version {meta.get('version')}): an index file of another build"
        )
    return None


def shape_problems(index: faiss.Index, meta: dict) -> list[str]:
    """What differs between ``index`` and the item count (``size``) and dimension (``dim``) that ``meta``,
    its ``item_index.json``, records: one sentence each, empty where both agree (or are not recorded)."""
    return [
        f"{INDEX_META_FILE} records {key} {meta[key]}, the index file has {actual}"
        for key, actual in (("size", int(index.ntotal)), ("dim", int(index.d)))
        if key in meta and int(meta[key]) != actual
    ]


def check_shape(index: faiss.Index, meta: dict, where: str | Path) -> None:
    """Raise ``IndexIntegrityError`` unless ``index`` holds the item count and dimension ``meta`` records."""
    problems = shape_problems(index, meta)
    if problems:
        raise IndexIntegrityError(f"the item index in {where}: {'; '.join(problems)}: an index file of another build")


def build_index(
    ids: np.ndarray,
    vectors: np.ndarray,
    exact_max_items: int,
    *,
    k: int = 300,
    queries: np.ndarray | None = None,
    ann: AnnConfig | None = None,
    seed: int = 0,
) -> tuple[faiss.Index, dict]:
    """The index over ``vectors`` (ids ``ids``) and what was chosen for it (``{"kind": "exact"}``, or
    the approximate index's parameters, its measured recall@``k`` and the curve it was chosen from).

    ``ann``: a ``configs.AnnConfig`` (its defaults when None). Above ``exact_max_items`` the search
    setting is chosen on ``queries`` (``[n, dim]``, validation queries) unless ``ann`` fixes it."""
    ann = ann or AnnConfig()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    check_ann(n, exact_max_items, ann)
    if n <= exact_max_items:
        index = faiss.IndexIDMap(faiss.IndexFlatIP(dim))
        index.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))
        return index, {"kind": "exact"}
    if ann.kind == "ivf":
        nlist = ann.nlist or default_nlist(n)
        base = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(seed).choice(n, min(n, 64 * nlist), replace=False)
        base.train(vectors[np.sort(sample)])
        info = {"kind": "ivf", "factory": f"IVF{nlist},Flat", "nlist": nlist}
        param, fixed, ladder = "nprobe", ann.nprobe, [p for p in SEARCH_LADDER if p < nlist] + [nlist]
    else:
        base = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = 80
        info = {"kind": "hnsw", "factory": "HNSW32,Flat"}
        param, fixed, ladder = "ef_search", ann.ef_search, [e for e in SEARCH_LADDER if e >= 16]
    index = faiss.IndexIDMap(base)
    index.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))
    if ann.kind == "ivf":
        base.make_direct_map()  # ItemVectors reconstructs a vector by position
    k = min(int(k), n)
    info.update({"k": k, "target_recall": ann.target_recall})
    if queries is None or not len(queries):
        if not fixed:
            raise ValueError(
                f"an approximate index ({ann.kind}) needs validation queries to choose its {param} "
                f"for recall {ann.target_recall}, or serving.ann.{param} set"
            )
        set_search_param(index, {**info, param: fixed})
        return index, {**info, param: fixed, "recall_at_k": None, "queries": 0}
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    exact = faiss.IndexFlatIP(dim)
    exact.add(vectors)
    _, truth = exact.search(queries, k)
    curve = []
    for value in [fixed] if fixed else ladder:
        set_search_param(index, {**info, param: value})
        _, got = base.search(queries, k)
        recall = recall_at_k(got, truth, k)
        curve.append({param: int(value), "recall_at_k": round(recall, 4)})
        if recall >= ann.target_recall:
            break
    chosen = curve[-1]
    info.update({param: chosen[param], "recall_at_k": chosen["recall_at_k"], "queries": len(queries)})
    # The measured recall, not the rounded one recorded: 0.94996 is no pass of a 0.95 target.
    info.update({"target_met": recall >= ann.target_recall, "curve": curve})
    set_search_param(index, info)
    level = logging.INFO if info["target_met"] else logging.WARNING
    log.log(
        level,
        "item index %s over %d items: %s %d gives recall@%d %.3f on %d validation queries (target %.2f)",
        info["factory"],
        n,
        param,
        chosen[param],
        k,
        chosen["recall_at_k"],
        len(queries),
        ann.target_recall,
    )
    return index, info


def check_ann(num_items: int, exact_max_items: int, ann: AnnConfig | None = None) -> None:
    """Refuse an index the catalog cannot have: more inverted lists (``serving.ann.nlist``) than items
    (faiss's k-means fails on it, after the candidate generator has trained). ``train_all`` checks
    before training."""
    ann = ann or AnnConfig()
    if num_items > exact_max_items and ann.kind == "ivf" and ann.nlist > num_items:
        raise ValueError(
            f"serving.ann.nlist {ann.nlist} is above the catalog's {num_items} items (an IVF index needs at "
            "least one item per list): lower it, or 0 to choose from the catalog size"
        )


def recall_at_k(found, truth, k: int) -> float:
    """Mean share of each row of ``truth`` (the exact top ``k`` ids) that the same row of ``found``
    holds (``-1`` padding ignored)."""
    return float(np.mean([np.intersect1d(np.asarray(f)[np.asarray(f) >= 0], t).size / k for f, t in zip(found, truth)]))


def default_nlist(n: int) -> int:
    """About 2 * sqrt(n) lists, a power of two, with at least 39 training points each (faiss's floor)."""
    lists = 2 ** int(round(math.log2(max(2.0 * math.sqrt(n), 1.0))))
    return max(1, min(lists, n // 39))


def set_search_param(index: faiss.Index, info: dict) -> None:
    """Apply the search setting recorded in ``info`` (``nprobe`` / ``ef_search``) to ``index``."""
    base = faiss.downcast_index(index.index if isinstance(index, faiss.IndexIDMap) else index)
    if isinstance(base, faiss.IndexIVF) and info.get("nprobe"):
        base.nprobe = int(info["nprobe"])
    elif isinstance(base, faiss.IndexHNSW) and info.get("ef_search"):
        base.hnsw.efSearch = int(info["ef_search"])


def save_index(index: faiss.Index, directory: str | Path, version: int, info: dict | None = None) -> None:
    directory = Path(directory)
    faiss.write_index(index, str(directory / INDEX_FILE))
    meta = {"version": int(version), "size": int(index.ntotal), "dim": int(index.d), **(info or {})}
    meta["faiss_version"] = faiss.__version__  # the file's writer: another faiss may read it differently, or not
    # The version stamp is in this JSON, not the index file: the digest ties the two together.
    meta["sha256"] = file_sha256(directory / INDEX_FILE)
    (directory / INDEX_META_FILE).write_text(json.dumps(meta))


def load_index(directory: str | Path, expected_version: int | None = None) -> tuple[faiss.Index, dict]:
    """The index saved in ``directory`` with its search setting applied, and its ``item_index.json``.
    An index written by another faiss version (recorded since ``faiss_version``) loads with a warning:
    faiss reads older files, but a newer one's may fail to load or search differently.

    Refuses (``IndexIntegrityError``) an index file whose SHA-256, item count or dimension are not
    the ones its ``item_index.json`` records; a JSON without a digest (written before it was recorded)
    loads with a warning, its file checked only for count and dimension."""
    directory = Path(directory)
    meta = json.loads((directory / INDEX_META_FILE).read_text())
    if expected_version is not None:
        check_versions(query_tower=expected_version, item_index=meta["version"])
    if "sha256" in meta:
        problem = index_file_problem(directory, meta)
        if problem:
            raise IndexIntegrityError(f"refusing the item index: {problem}")
    else:
        log.warning(
            "%s in %s records no sha256 (built before it was recorded): the index file is not checked against it",
            INDEX_META_FILE,
            directory,
        )
    written_by = meta.get("faiss_version")
    if written_by is not None and written_by != faiss.__version__:
        log.warning(
            "item index in %s was written by faiss %s, read by faiss %s: check its recall (serving.ann)",
            directory,
            written_by,
            faiss.__version__,
        )
    index = faiss.read_index(str(directory / INDEX_FILE))
    check_shape(index, meta, directory)
    set_search_param(index, meta)
    return index, meta


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


def max_norm(index: faiss.Index, chunk: int = 65_536) -> float:
    """The largest L2 norm among the vectors ``index`` holds (0 for an empty index), read in chunks
    of ``chunk`` vectors: by Cauchy-Schwarz no inner product with a query exceeds it times the
    query's norm."""
    base = faiss.downcast_index(index.index if isinstance(index, faiss.IndexIDMap) else index)
    largest = 0.0
    for start in range(0, base.ntotal, chunk):
        vectors = base.reconstruct_n(start, min(chunk, base.ntotal - start)).astype(np.float64)
        largest = max(largest, float(np.linalg.norm(vectors, axis=1).max()))
    return largest


def stores_exact_vectors(index: faiss.Index) -> bool:
    """Whether ``index`` (or the index its id map wraps) keeps every vector as it was added, so that
    ``reconstruct`` gives it back bit for bit: flat, IVF-Flat and HNSW-Flat, the kinds ``build_index``
    builds. A quantized index (PQ, scalar quantizer) reconstructs an approximation only."""
    base = faiss.downcast_index(index.index if isinstance(index, faiss.IndexIDMap) else index)
    if isinstance(base, faiss.IndexHNSW):
        base = faiss.downcast_index(base.storage)
    return isinstance(base, (faiss.IndexFlat, faiss.IndexIVFFlat))


class ItemVectors:
    """The vectors an id index holds, by item id: the score ``search`` would give any item.

    Search returns the top ``k``; scoring an item it did not return (a held-out positive, say) needs
    its vector, which the index reconstructs (exact, IVF-Flat and HNSW indexes all store them)."""

    def __init__(self, index: faiss.Index):
        self._base = faiss.downcast_index(index.index)
        ids = faiss.vector_to_array(index.id_map)
        self._order = np.argsort(ids)
        self._sorted_ids = ids[self._order]

    def _lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For ``ids``: whether the index holds each (a bool per id, in order), and the index positions
        of those it holds."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not len(self._sorted_ids):
            return np.zeros(len(ids), dtype=bool), np.zeros(0, dtype=np.int64)
        at = np.minimum(np.searchsorted(self._sorted_ids, ids), len(self._sorted_ids) - 1)
        known = self._sorted_ids[at] == ids
        return known, self._order[at[known]]

    def _reconstruct(self, positions: np.ndarray) -> np.ndarray:
        if not len(positions):
            return np.zeros((0, self._base.d), dtype=np.float32)
        return np.stack([self._base.reconstruct(int(p)) for p in positions])

    def holds(self, ids: np.ndarray) -> np.ndarray:
        """Whether the index holds each of ``ids`` (a bool per id, in order)."""
        return self._lookup(ids)[0]

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The vectors of the ``ids`` the index holds (``[n, dim]``; ids it lacks are skipped)."""
        return self._reconstruct(self._lookup(ids)[1])

    def scores(self, query: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Inner product of ``query`` with each of ``ids``' vectors; -inf for ids not in the index."""
        known, positions = self._lookup(ids)
        out = np.full(len(known), -np.inf, dtype=np.float64)
        if known.any():
            out[known] = self._reconstruct(positions) @ np.asarray(query, dtype=np.float32).reshape(-1)
        return out
