import shutil

import pytest

from deployment.export import STAGE_ARTIFACTS, export_repository, exported_version
from serving.interface import FUNNEL

pytestmark = pytest.mark.slow


def test_export_writes_every_stage_with_its_version(triton_repo, model_version):
    v = str(model_version.version)
    assert exported_version(triton_repo) == model_version.version
    for stage in STAGE_ARTIFACTS:
        assert (triton_repo / stage / "config.pbtxt").exists()
        assert (triton_repo / stage / v / "model.py").exists()
    assert 'platform: "ensemble"' in (triton_repo / FUNNEL / "config.pbtxt").read_text()
    assert (triton_repo / "feature_lookup" / v / "online_store.sqlite").exists()


def test_existing_repository_is_not_overwritten_without_replace(triton_repo, model_version):
    with pytest.raises(FileExistsError, match="replace"):
        export_repository(model_version, triton_repo)


def test_failed_export_leaves_no_partial_repository(model_version, tmp_path):
    from models.registry import ModelVersion

    broken = tmp_path / "broken_version"
    shutil.copytree(model_version.path, broken)
    shutil.rmtree(broken / "heavy_ranker")  # an artifact the heavy ranker stage needs
    target = tmp_path / "repo"
    with pytest.raises(FileNotFoundError):
        export_repository(ModelVersion(broken), target)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == [broken]  # no staging folder left either


def test_replace_swaps_in_a_complete_repository(model_version, tmp_path):
    target = export_repository(model_version, tmp_path / "repo")
    (target / "marker").write_text("old")
    export_repository(model_version, target, replace=True)
    assert not (target / "marker").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]
