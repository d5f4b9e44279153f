import shutil
from pathlib import Path

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


def test_every_model_with_metrics_gets_the_configured_metrics_interval(triton_repo, model_version):
    import json

    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    from configs import ServingConfig
    from deployment.export import with_metrics_interval
    from serving.interface import FEEDBACK, ROUTER
    from serving.triton_model import metrics_interval

    def as_json(text):  # what a stub's initialize() gets as args["model_config"]
        config = model_config_pb2.ModelConfig()
        text_format.Parse(text, config)
        return json.loads(json_format.MessageToJson(config, preserving_proto_field_name=True))

    default = ServingConfig().metrics_interval_s
    for model in [*STAGE_ARTIFACTS, ROUTER, FEEDBACK]:
        text = (triton_repo / model / "config.pbtxt").read_text()
        assert metrics_interval(as_json(text)) == default, model
        assert metrics_interval(as_json(with_metrics_interval(text, 0.0))) == 0.0
        assert with_metrics_interval(text, 2.0).startswith("#")  # the header comment is kept
    assert metrics_interval({}) == default  # a repository exported before the parameter existed
    with pytest.raises(ValueError, match="metrics_interval_s"):
        with_metrics_interval(text, -1)


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


def test_a_replace_that_fails_at_the_swap_leaves_the_served_repository_in_place(model_version, tmp_path, monkeypatch):
    """The old repository is moved aside before the new one is moved in: if that second rename
    fails (a full disk), the old one used to stay in a hidden folder with nothing at the served path."""
    import os

    from deployment import export

    target = export_repository(model_version, tmp_path / "repo")
    (target / "marker").write_text("old")
    rename, swaps = os.rename, []

    def flaky_rename(src, dst):
        if Path(dst) == target and Path(src).name.startswith(".repo-staging-"):  # the new one moving in
            swaps.append(src)
            raise OSError(28, "No space left on device (simulated)")
        return rename(src, dst)

    monkeypatch.setattr(export.os, "rename", flaky_rename)
    with pytest.raises(OSError, match="simulated"):
        export_repository(model_version, target, replace=True)
    assert len(swaps) == 1  # it failed at the swap itself, after the old one was moved aside
    assert (target / "marker").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # no staging or old copy left
