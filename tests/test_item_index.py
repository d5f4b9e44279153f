import numpy as np
import pytest

from models import item_index


def _vectors(n, d=16, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_exact_index_returns_the_brute_force_top_k():
    vectors = _vectors(500)
    ids = np.arange(1000, 1500)
    index = item_index.build_index(ids, vectors, exact_max_items=1000)
    query = _vectors(1, seed=1)[0]
    got, scores = item_index.search(index, query, 20)
    expected = ids[np.argsort(-(vectors @ query))[:20]]
    assert got.tolist() == expected.tolist()
    assert np.all(np.diff(scores) <= 1e-6)


def test_hnsw_index_above_the_threshold_keeps_recall():
    vectors = _vectors(3000)
    ids = np.arange(3000)
    index = item_index.build_index(ids, vectors, exact_max_items=1000)
    assert "HNSW" in type(index.index).__name__ or index.ntotal == 3000
    overlaps = []
    for seed in range(10):
        query = _vectors(1, seed=100 + seed)[0]
        got, _ = item_index.search(index, query, 50)
        truth = set(np.argsort(-(vectors @ query))[:50].tolist())
        overlaps.append(len(truth & set(got.tolist())) / 50)
    assert np.mean(overlaps) > 0.9


def test_saved_index_refuses_a_query_tower_of_another_version(tmp_path):
    index = item_index.build_index(np.arange(10), _vectors(10), 100)
    item_index.save_index(index, tmp_path, version=3)
    loaded, meta = item_index.load_index(tmp_path, expected_version=3)
    assert loaded.ntotal == 10 and meta["version"] == 3
    with pytest.raises(item_index.VersionMismatchError, match="different training runs"):
        item_index.load_index(tmp_path, expected_version=4)
