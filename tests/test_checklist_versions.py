"""Checklist items on hand-made artifacts (no training): what each must catch, and what it must not."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from deployment.export import STAGE_ARTIFACTS
from evaluation import checklist


def _stamp(path: Path, version: int, **extra) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": version, **extra}))


def _registry_version(root: Path, version: int) -> Path:
    folder = root / "registry" / str(version)
    _stamp(folder / "manifest.json", version, item_affinity={"items": 3})
    for name in ("query_tower.json", "item_index.json", "item_affinity.json"):
        _stamp(folder / name, version)
    return folder


def _add_to_repo(repo: Path, version: int) -> None:
    for stage in STAGE_ARTIFACTS:
        _stamp(repo / stage / str(version) / "manifest.json", version, item_affinity={"items": 3})
    _stamp(repo / "ordering" / str(version) / "item_affinity.json", version)
    _stamp(repo / "query_tower" / str(version) / "query_tower.json", version)
    _stamp(repo / "retrieval" / str(version) / "item_index.json", version)


def test_a_repository_holding_the_next_version_beside_this_one_is_consistent(tmp_path):
    # After deployment.rollout.add_version (a rollout or an A/B test): <stage>/1 and <stage>/2 side by side.
    v1, v2 = _registry_version(tmp_path, 1), _registry_version(tmp_path, 2)
    repo = tmp_path / "repo"
    _stamp(repo / "export.json", 1)
    _add_to_repo(repo, 1)
    assert checklist.check_versions_consistent(v1, repo).passed
    _add_to_repo(repo, 2)
    result = checklist.check_versions_consistent(v1, repo)
    assert result.passed, result.detail
    _stamp(repo / "export.json", 2)  # rolled out to 2, version 1 not yet retired
    result = checklist.check_versions_consistent(v2, repo)
    assert result.passed, result.detail


def test_a_stage_of_this_version_with_another_stamp_or_missing_still_fails(tmp_path):
    v1 = _registry_version(tmp_path, 1)
    repo = tmp_path / "repo"
    _stamp(repo / "export.json", 1)
    _add_to_repo(repo, 1)
    _stamp(repo / "heavy_ranker" / "1" / "manifest.json", 7)
    result = checklist.check_versions_consistent(v1, repo)
    assert not result.passed and '"stage:heavy_ranker": 7' in result.detail
    _stamp(repo / "heavy_ranker" / "1" / "manifest.json", 1)
    (repo / "ordering" / "1" / "item_affinity.json").unlink()
    result = checklist.check_versions_consistent(v1, repo)
    assert not result.passed and '"item_affinity:ordering/1": -1' in result.detail
    (repo / "retrieval" / "1" / "manifest.json").unlink()
    result = checklist.check_versions_consistent(v1, repo)
    assert not result.passed and '"stage:retrieval": -1' in result.detail


@pytest.mark.parametrize("served", ["retrieval/1/item_index.json", "query_tower/1/query_tower.json"])
def test_a_served_index_or_query_tower_of_another_version_or_missing_fails(tmp_path, served):
    # Only the stage manifests were read: an index (or tower stamp) of another run, or none, in this
    # version's stage folder passed.
    v1 = _registry_version(tmp_path, 1)
    repo = tmp_path / "repo"
    _stamp(repo / "export.json", 1)
    _add_to_repo(repo, 1)
    assert checklist.check_versions_consistent(v1, repo).passed
    _stamp(repo / served, 2)
    result = checklist.check_versions_consistent(v1, repo)
    assert not result.passed and f'"{Path(served).stem}:{Path(served).parent}": 2' in result.detail
    (repo / served).unlink()
    result = checklist.check_versions_consistent(v1, repo)
    assert not result.passed and f'"{Path(served).stem}:{Path(served).parent}": -1' in result.detail


@pytest.mark.parametrize("scores", [[0.9, np.nan, 0.1], [np.nan, np.nan], [0.5, np.inf], [-np.inf]])
def test_nan_or_infinite_scores_fail_the_unit_range_check(monkeypatch, scores):
    from evaluation import offline

    ordering = SimpleNamespace(name="ordering", policy=SimpleNamespace(exploration_temperature=0.0))
    monkeypatch.setattr(offline, "load_funnel", lambda repo, version: [ordering])
    monkeypatch.setattr(offline, "run_funnel", lambda stages, user, k: {"scores": np.array(scores)})
    result = checklist.check_scores_in_unit_range(Path("repo"), 1, [1, 2])
    assert not result.passed and "[1, 2]" in result.detail
    monkeypatch.setattr(offline, "run_funnel", lambda stages, user, k: {"scores": np.array([0.9, 0.5, 0.1])})
    assert checklist.check_scores_in_unit_range(Path("repo"), 1, [1, 2]).passed


def _data_manifest(folder: Path, features: dict, checks: list[str]) -> Path:
    summary = {"split": {"kind": "random"}, "checks": [{"check": c, "passed": True} for c in checks]}
    _stamp(folder / "manifest.json", 1, data_summary=summary, config={"workflow": {"features": features}})
    return folder


def test_windowed_activity_features_without_the_leak_probe_fail_the_data_checks(tmp_path):
    # point_in_time: false dropped the leak check from what is required, though windowed activity counts
    # (features.activity_windows) read earlier events too: a version without the probe passed.
    checks = ["no_duplicate_pairs", "labels_agree"]
    windowed = {"point_in_time": False, "activity_windows": ["1h", "24h"]}
    result = checklist.check_data(_data_manifest(tmp_path / "a", windowed, checks))
    assert not result.passed and "point_in_time" in result.detail
    assert checklist.check_data(_data_manifest(tmp_path / "b", windowed, [*checks, "point_in_time"])).passed
    none = {"point_in_time": False, "activity_windows": []}  # no feature from events: nothing to probe
    assert checklist.check_data(_data_manifest(tmp_path / "c", none, checks)).passed


def test_the_datas_own_event_features_decide_whether_the_leak_probe_is_required(tmp_path):
    # The requirement was read from the training run's config alone: data prepared with point-in-time
    # counts and the probe switched off (checks.point_in_time_probe: false), trained with a config whose
    # point_in_time is false (scripts/train.py --config), passed with its features never probed.
    checks = ["no_duplicate_pairs", "labels_agree"]
    off = {"point_in_time": False, "activity_windows": []}

    def with_features(folder: Path, event_features: list[str], recorded: list[str], config: dict) -> Path:
        _data_manifest(folder, config, recorded)
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["data_summary"]["event_features"] = event_features
        (folder / "manifest.json").write_text(json.dumps(manifest))
        return folder

    counted = ["user_events_before", "user_clicks_before"]
    result = checklist.check_data(with_features(tmp_path / "a", counted, checks, off))
    assert not result.passed and "missing ['point_in_time']" in result.detail, result.detail
    assert checklist.check_data(with_features(tmp_path / "b", counted, [*checks, "point_in_time"], off)).passed
    # Data without event features has nothing to probe, whatever the training config says.
    assert checklist.check_data(with_features(tmp_path / "c", [], checks, {"point_in_time": True})).passed


def test_the_unknown_user_of_the_score_check_is_no_user_of_the_table(tmp_path, monkeypatch):
    # The unknown user was the sampled users' largest id + 10**6: on a table whose ids are not in order
    # (or reach past 10**6) that is a known user, and the fallback went unchecked.
    import pandas as pd

    folder = _registry_version(tmp_path, 1)
    known = [5, 3, 1_000_005, 7]
    pd.DataFrame({"user_id_raw": known}).to_parquet(folder / "user_features.parquet", index=False)
    (tmp_path / "repo" / "ordering" / "1").mkdir(parents=True)
    passed = checklist.CheckResult("stub", True, "")
    for name in ("check_versions_consistent", "check_index_matches_items", "check_index_recall", "check_data"):
        monkeypatch.setattr(checklist, name, lambda *args: passed)
    checked = []
    monkeypatch.setattr(checklist, "check_scores_in_unit_range", lambda repo, version, users: checked.extend(users))
    checklist.run_checklist(folder, tmp_path / "repo", sample_users=2)
    assert checked[:2] == [5, 3] and len(checked) == 3 and checked[-1] not in known, checked


def _index_and_table(folder: Path, index_ids: list[int], table_ids: list[int], seed: int = 0) -> Path:
    import pandas as pd

    from models.item_index import build_index, save_index

    folder.mkdir(parents=True, exist_ok=True)
    index, info = build_index(np.array(index_ids), np.random.default_rng(seed).random((len(index_ids), 4)), 100)
    save_index(index, folder, 1, info)
    pd.DataFrame({"item_id": table_ids}).to_parquet(folder / "item_features.parquet", index=False)
    return folder


def test_an_index_over_other_items_of_the_same_count_fails_naming_them(tmp_path):
    # Same counts, other ids: the detail read "index 3 ids, item table 3 rows", as on a pass.
    assert checklist.check_index_matches_items(_index_and_table(tmp_path / "ok", [1, 2, 3], [3, 1, 2])).passed
    result = checklist.check_index_matches_items(_index_and_table(tmp_path / "other", [1, 2, 5], [1, 2, 3]))
    assert not result.passed and "only in the index: [5], only in the table: [3]" in result.detail, result.detail
    result = checklist.check_index_matches_items(_index_and_table(tmp_path / "twice", [1, 2, 2], [1, 2, 3]))
    assert not result.passed and "only in the table: [3]" in result.detail and "repeated ids: index 1" in result.detail
    result = checklist.check_index_matches_items(_index_and_table(tmp_path / "more", [1, 2, 3, 4], [1, 2, 3]))
    assert not result.passed and "only in the index: [4]" in result.detail, result.detail


@pytest.mark.parametrize(
    "scores, temperature, passes",
    [
        ([1.5, 0.2], 0.0, False),  # above 1
        ([0.5, -0.1], 0.0, False),  # below 0
        ([0.1, 0.9], 0.0, False),  # not sorted
        ([], 0.0, False),  # nothing served
        ([0.1, 0.9], 0.5, True),  # an exploring ordering samples its list: only the range is checked
        ([1.1, 0.9], 0.5, False),
    ],
)
def test_scores_out_of_range_unsorted_or_missing_fail_the_unit_range_check(monkeypatch, scores, temperature, passes):
    from evaluation import offline

    ordering = SimpleNamespace(name="ordering", policy=SimpleNamespace(exploration_temperature=temperature))
    monkeypatch.setattr(offline, "load_funnel", lambda repo, version: [ordering])
    monkeypatch.setattr(offline, "run_funnel", lambda stages, user, k: {"scores": np.array(scores)})
    result = checklist.check_scores_in_unit_range(Path("repo"), 1, [4, 9])
    assert result.passed is passes and (passes or "failing: [4, 9]" in result.detail), result.detail


def test_a_temporal_split_without_its_order_check_or_missing_pipeline_checks_fail(tmp_path):
    checks = ["no_duplicate_pairs", "labels_agree", "point_in_time"]
    folder = _data_manifest(tmp_path / "a", {}, checks)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["data_summary"]["split"] = {"kind": "temporal"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    result = checklist.check_data(folder)
    assert not result.passed and "missing ['temporal_split']" in result.detail
    manifest["data_summary"]["checks"].append({"check": "temporal_split", "passed": True})
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert checklist.check_data(folder).passed
    for name in ("no_duplicate_pairs", "labels_agree"):
        result = checklist.check_data(_data_manifest(tmp_path / name, {}, [c for c in checks if c != name]))
        assert not result.passed and f"missing ['{name}']" in result.detail
    manifest["data_summary"]["checks"][1]["passed"] = False  # recorded, and failed
    (folder / "manifest.json").write_text(json.dumps(manifest))
    result = checklist.check_data(folder)
    assert not result.passed and "failed ['labels_agree']" in result.detail
    (tmp_path / "none" / "manifest.json").parent.mkdir()
    _stamp(tmp_path / "none" / "manifest.json", 1)  # a version without a data summary: no evidence
    assert not checklist.check_data(tmp_path / "none").passed


def test_an_export_of_another_version_fails(tmp_path):
    v1 = _registry_version(tmp_path, 1)
    repo = tmp_path / "repo"
    _stamp(repo / "export.json", 2)
    _add_to_repo(repo, 1)
    result = checklist.check_versions_consistent(v1, repo)
    assert not result.passed and '"export": 2' in result.detail


def _served(tmp_path: Path, registry: Path) -> Path:
    """A repository whose ``retrieval/1/`` holds copies of ``registry``'s index, as the export writes them."""
    import shutil

    from models.item_index import INDEX_FILE, INDEX_META_FILE

    repo = tmp_path / "repo"
    (repo / "retrieval" / "1").mkdir(parents=True)
    for name in (INDEX_FILE, INDEX_META_FILE):
        shutil.copy2(registry / name, repo / "retrieval" / "1" / name)
    return repo


def _only_the_index_check(monkeypatch, folder: Path, repo: Path | None) -> checklist.CheckResult:
    """``index_matches_items`` as ``run_checklist`` calls it (the other checks stubbed out)."""
    import pandas as pd

    _stamp(folder / "manifest.json", 1)
    pd.DataFrame({"user_id_raw": [1]}).to_parquet(folder / "user_features.parquet", index=False)
    passed = checklist.CheckResult("stub", True, "")
    for name in ("check_versions_consistent", "check_index_recall", "check_data", "check_scores_in_unit_range"):
        monkeypatch.setattr(checklist, name, lambda *args: passed)
    return next(r for r in checklist.run_checklist(folder, repo, sample_users=1) if r.name == "index_matches_items")


def test_an_index_file_of_another_build_beside_this_runs_json_fails_and_is_refused(tmp_path, monkeypatch):
    # The version stamp lives only in item_index.json: another build's index file (same ids and count,
    # other vectors) copied beside it passed the checklist, and the retrieval stage served it.
    import shutil

    from models import item_index
    from models.registry import ModelVersion, check_artifact_versions
    from serving.stages import Retrieval

    ours = _index_and_table(tmp_path / "ours", [1, 2, 3], [1, 2, 3])
    other = _index_and_table(tmp_path / "other", [1, 2, 3], [1, 2, 3], seed=1)
    result = _only_the_index_check(monkeypatch, ours, None)
    assert result.passed and "as recorded" in result.detail, result.detail
    shutil.copy2(other / item_index.INDEX_FILE, ours / item_index.INDEX_FILE)
    result = _only_the_index_check(monkeypatch, ours, None)
    assert not result.passed and "not the file its item_index.json records" in result.detail  # old code: passed
    with pytest.raises(item_index.IndexIntegrityError, match="SHA-256"):
        item_index.load_index(ours, expected_version=1)  # old code: loaded
    _stamp(ours / "manifest.json", 1, features={"user_categorical": []}, config={"serving": {"retrieval_k": 2}})
    with pytest.raises(item_index.IndexIntegrityError, match="refusing the item index"):
        Retrieval(ours)  # the stage refuses it at model load
    _stamp(ours / "query_tower.json", 1)
    with pytest.raises(item_index.IndexIntegrityError):
        check_artifact_versions(ModelVersion(ours))  # and so does the export (it calls this first)
    shutil.copy2(other / item_index.INDEX_FILE, ours / item_index.INDEX_FILE)
    shutil.copy2(other / item_index.INDEX_META_FILE, ours / item_index.INDEX_META_FILE)
    assert item_index.load_index(ours, expected_version=1)[0].ntotal == 3  # the pair the build wrote


def test_the_served_copy_of_the_index_is_checked(tmp_path, monkeypatch):
    # Only the registry's index was read: another build's index in retrieval/<version>/, the one served,
    # passed, with its own JSON or beside the registry's.
    import shutil

    from models.item_index import INDEX_FILE, INDEX_META_FILE

    ours = _index_and_table(tmp_path / "ours", [1, 2, 3], [1, 2, 3])
    other = _index_and_table(tmp_path / "other", [1, 2, 3], [1, 2, 3], seed=1)
    repo = _served(tmp_path, ours)
    result = _only_the_index_check(monkeypatch, ours, repo)
    assert result.passed and "served retrieval/1 is the same file" in result.detail, result.detail
    shutil.copy2(other / INDEX_FILE, repo / "retrieval" / "1" / INDEX_FILE)
    result = _only_the_index_check(monkeypatch, ours, repo)
    assert not result.passed and "the served retrieval/1/item_index.faiss is not the registry's" in result.detail
    shutil.copy2(other / INDEX_META_FILE, repo / "retrieval" / "1" / INDEX_META_FILE)  # a whole pair, stamped 1
    result = _only_the_index_check(monkeypatch, ours, repo)  # old code: passed
    assert not result.passed and "not the registry's" in result.detail, result.detail
    (repo / "retrieval" / "1" / INDEX_FILE).unlink()
    result = _only_the_index_check(monkeypatch, ours, repo)
    assert not result.passed and "retrieval/1/item_index.faiss is missing" in result.detail


def test_an_index_json_without_a_digest_loads_and_the_check_says_it_is_unverified(tmp_path, monkeypatch, caplog):
    # Registries built before the digest was recorded: they load (with a warning) and the check does not
    # claim to have tied the file to its JSON; the served copy is still compared with the registry's bytes.
    import shutil

    from models.item_index import INDEX_FILE, INDEX_META_FILE, load_index

    ours = _index_and_table(tmp_path / "ours", [1, 2, 3], [1, 2, 3])
    other = _index_and_table(tmp_path / "other", [1, 2, 3], [1, 2, 3], seed=1)
    meta = json.loads((ours / INDEX_META_FILE).read_text())
    del meta["sha256"]
    (ours / INDEX_META_FILE).write_text(json.dumps(meta))
    with caplog.at_level("WARNING", logger="models.item_index"):
        assert load_index(ours, expected_version=1)[0].ntotal == 3
    assert any("records no sha256" in r.getMessage() for r in caplog.records)
    repo = _served(tmp_path, ours)
    result = _only_the_index_check(monkeypatch, ours, repo)
    assert result.passed and "digest unverified" in result.detail, result.detail
    shutil.copy2(other / INDEX_FILE, repo / "retrieval" / "1" / INDEX_FILE)
    result = _only_the_index_check(monkeypatch, ours, repo)
    assert not result.passed and "not the registry's" in result.detail, result.detail
    # A file of another item count or dimension is refused even without a digest.
    _index_and_table(tmp_path / "four", [1, 2, 3, 4], [1, 2, 3, 4])
    shutil.copy2(tmp_path / "four" / INDEX_FILE, ours / INDEX_FILE)
    with pytest.raises(RuntimeError, match="item_index.json records size 3, the index file has 4"):
        load_index(ours)
