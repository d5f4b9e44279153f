import pytest

from models import registry


def test_versions_increase_and_publish_only_when_complete(tmp_path):
    with registry.VersionWriter(tmp_path) as out:
        (out.tmp / "weights").write_text("a")
        out.write_manifest(note="first")
    assert registry.list_versions(tmp_path) == [1]

    with pytest.raises(RuntimeError, match="boom"):
        with registry.VersionWriter(tmp_path) as out:
            (out.tmp / "weights").write_text("b")
            raise RuntimeError("boom")
    # The failed run left nothing behind, not even its temporary folder.
    assert registry.list_versions(tmp_path) == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]

    with registry.VersionWriter(tmp_path) as out:
        out.write_manifest(note="second")
    assert registry.latest(tmp_path).version == 2
    assert registry.get(tmp_path, 1).manifest["note"] == "first"


def test_missing_version_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model version"):
        registry.latest(tmp_path)
    with pytest.raises(FileNotFoundError, match="version 7"):
        registry.get(tmp_path, 7)


def test_fingerprint_changes_with_the_data(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("1")
    first = registry.fingerprint(tmp_path / "d")
    (tmp_path / "d" / "x").write_text("2")
    assert registry.fingerprint(tmp_path / "d") != first


def test_two_runs_writing_at_once_get_different_versions(tmp_path):
    """Two training runs that start before either publishes (a retraining beside a manual run) both
    reserved version 1: the second failed at the very end (``OSError: Directory not empty``) and left
    its temporary folder behind."""
    first, second = registry.VersionWriter(tmp_path), registry.VersionWriter(tmp_path)
    assert first.version != second.version
    with first:
        first.write_manifest(run="first")
    third = registry.VersionWriter(tmp_path)  # starts after the first published, before the second
    with second:
        second.write_manifest(run="second")
    with third:
        third.write_manifest(run="third")
    assert registry.list_versions(tmp_path) == [1, 2, 3]
    assert [registry.get(tmp_path, v).manifest["run"] for v in (1, 2, 3)] == ["first", "second", "third"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2", "3"]  # no temporary folder left


def test_fingerprint_tells_apart_data_that_differ_only_in_where_names_and_contents_split(tmp_path):
    """Names and bytes were hashed back to back: ``train/part`` holding ``1x`` and ``train/part1``
    holding ``x`` (or one file holding what two files held, the other's name included) shared a
    fingerprint, so rankers trained on one were reusable for the other."""
    one, two = tmp_path / "one" / "train", tmp_path / "two" / "train"
    one.mkdir(parents=True)
    two.mkdir(parents=True)
    (one / "part").write_text("1x")
    (two / "part1").write_text("x")
    assert registry.fingerprint(one) != registry.fingerprint(two)

    for name, files in {"a": {"train/x": "1workflow/y2"}, "b": {"train/x": "1", "workflow/y": "2"}}.items():
        for rel in ("train", "workflow"):
            (tmp_path / name / rel).mkdir(parents=True)
        for rel, text in files.items():
            (tmp_path / name / rel).write_text(text)
    a, b = tmp_path / "a", tmp_path / "b"
    assert registry.fingerprint(a / "train", a / "workflow") != registry.fingerprint(b / "train", b / "workflow")


@pytest.mark.parametrize("name", ["007", "\u00b2", "\u0663"])  # zero-padded, superscript two, Arabic-Indic three
def test_a_folder_whose_name_is_not_a_plain_version_number_is_not_a_version(tmp_path, name):
    """``str.isdigit`` let such folders in: ``latest`` then opened ``<registry>/7`` (no such folder)
    or ``int`` raised on ``²``; only the names ``get`` and ``latest`` open, ``str(version)``, count."""
    with registry.VersionWriter(tmp_path) as out:
        out.write_manifest(note="real")
    (tmp_path / name).mkdir()
    (tmp_path / name / registry.MANIFEST).write_text('{"version": 7}')
    assert registry.list_versions(tmp_path) == [1]
    assert registry.latest(tmp_path).manifest["note"] == "real"


def test_a_config_value_longer_than_mlflows_param_limit_is_logged_not_fatal(tmp_path):
    """mlflow-skinny 1.26 (the lock's) refuses a param value over 250 characters, so a content
    denylist of 20 terms failed every training run before it trained anything (``MlflowException:
    Param value ... had length 282``). Such a value is now logged shortened, marked as such, and
    whole in the run's ``params.json``."""
    import json

    from configs import load_config, with_overrides
    from models.tracking import tracked_run

    config = load_config()
    terms = [f"denied term {i}" for i in range(20)]
    config = with_overrides(config, {"workflow": {"content_filter": {"denylist": terms}}})
    with tracked_run(config.training, tmp_path / "registry", config.to_dict(), run_name="long") as run:
        run.log_params({"tuning.chosen.note": "x" * 300})
    (run_dir,) = [p.parent for p in (tmp_path / "mlruns").glob("*/*/params")]
    logged = (run_dir / "params" / "workflow.content_filter.denylist").read_text()
    assert len(logged) <= 250 and logged.startswith('["denied term 0", ') and "params.json" in logged
    assert len((run_dir / "params" / "tuning.chosen.note").read_text()) <= 250
    whole = json.loads((run_dir / "artifacts" / "params.json").read_text())
    assert whole["workflow"]["content_filter"]["denylist"] == terms
    assert (run_dir / "params" / "seed").read_text() == str(config.seed)  # short values as they were


def test_rankers_are_not_reused_across_processed_data_whose_validation_parts_differ(tmp_path, monkeypatch):
    """The rankers stop early on the validation part (their best epoch restored) and the manifest
    keeps their validation metrics, yet ``train_all`` fingerprinted only ``train/`` and ``workflow/``:
    data reprocessed with, e.g., ``negative_sampling.valid`` switched on (training part and encodings
    unchanged) passed the ``rankers_from`` data check."""
    from types import SimpleNamespace

    from merlin.schema import Schema

    from configs import load_config
    from models import train as train_module

    class Stop(Exception):
        pass

    seen = []

    def capture(manifest, config, fingerprint):
        seen.append(fingerprint)
        raise Stop

    monkeypatch.setattr(train_module, "config_for_dataset", lambda config, summary, columns: (config, []))
    monkeypatch.setattr(train_module, "check_rankers_reusable", capture)
    part = SimpleNamespace(schema=Schema([]))
    for name, valid in (("a", "impressions"), ("b", "impressions and sampled negatives")):
        root = tmp_path / name
        for sub, text in (("train", "same"), ("workflow", "same"), ("valid", valid)):
            (root / sub).mkdir(parents=True)
            (root / sub / "part_0.parquet").write_text(text)
        data = SimpleNamespace(
            root=root,
            train_dir=root / "train",
            valid_dir=root / "valid",
            workflow_dir=root / "workflow",
            summary={},
            train=lambda: part,
            valid=lambda: part,
        )
        with pytest.raises(Stop):
            train_module.train_all(data, load_config(), tmp_path / "reg", rankers_from=SimpleNamespace(manifest={}))
    assert seen[0] != seen[1]


@pytest.mark.parametrize("folder", ["run#1", "q?x", "50%20off"])
def test_the_default_mlflow_store_is_beside_the_registry_whatever_its_folder_is_named(tmp_path, folder):
    """The default store was ``"file:" + path``, a URI MLflow parses: a registry under ``run#1`` logged
    its runs into a new sibling folder ``run`` (``#1/mlruns`` read as a fragment), ``q?x`` into ``q``,
    ``50%20off`` into ``50 off``."""
    from configs import load_config
    from models.tracking import tracked_run

    root = tmp_path / folder
    root.mkdir()
    with tracked_run(load_config().training, root / "registry", {"seed": 1}, run_name="named") as run:
        run.log_metrics({"m": 1.0})
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder]
    assert len(list((root / "mlruns").glob("*/*/params/seed"))) == 1


def test_the_store_location_printed_is_where_the_run_went(tmp_path, monkeypatch):
    """``make demo`` printed ``<workdir>/mlruns`` whatever ``training.mlflow_tracking_uri`` said; it
    now prints ``store_location``, read off the same ``tracking_uri`` that ``tracked_run`` logs to."""
    from configs import load_config
    from models.tracking import store_location, tracked_run

    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    config = load_config().training
    assert store_location(config, "work/registry") == "work/mlruns"  # the default, beside the registry
    elsewhere = tmp_path / "runs #1"  # outside the working directory: printed whole
    config.mlflow_tracking_uri = elsewhere.as_uri()
    with tracked_run(config, "work/registry", {"seed": 1}, run_name="configured") as run:
        run.log_metrics({"m": 1.0})
    assert store_location(config, "work/registry") == str(elsewhere)
    assert len(list(elsewhere.glob("*/*/params/seed"))) == 1 and not (here / "work" / "mlruns").exists()
    config.mlflow_tracking_uri = "http://tracking:5000"
    assert store_location(config, "work/registry") == "http://tracking:5000"


def test_a_tracking_store_that_fails_mid_run_does_not_end_the_training(tmp_path, monkeypatch, caplog):
    """Every epoch's metrics, the manifest and the run's close went to MLflow inside the training:
    a tracking server that went away mid-run (here: every write after the first raises) raised out of
    a Keras callback or the run's close, and the registry discarded the trained version."""
    import logging

    import mlflow

    from configs import load_config
    from models.tracking import tracked_run

    def down(*args, **kwargs):
        raise ConnectionError("tracking server went away")

    finished = []
    with tracked_run(load_config().training, tmp_path / "registry", {"seed": 1}, run_name="flaky") as run:
        run.log_metrics({"m": 1.0}, step=0)
        monkeypatch.setattr(mlflow, "log_metrics", down)
        monkeypatch.setattr(mlflow, "log_artifact", down)
        monkeypatch.setattr(mlflow, "end_run", down)
        with caplog.at_level(logging.WARNING, logger="models.tracking"):
            run.callback("heavy_ranker").on_epoch_end(1, {"loss": 0.5})
            run.log_metrics({"m": 2.0}, step=1)  # after the first failure: not tried again
            run.log_json("manifest.json", {"version": 1})
        finished.append(True)
    assert finished and run.lost == "ConnectionError: tracking server went away"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "training goes on" in warnings[0] and "could not close" in warnings[1]
    monkeypatch.undo()
    mlflow.end_run()  # the patched close left MLflow's active run open in this process


def test_a_run_that_starts_after_another_reserved_a_number_gets_a_higher_one(tmp_path):
    """The next number was counted from the published versions only: with a first run failing (its
    number freed) while a second still trained, a third run took the first's number, below the
    second's, so once both published ``latest`` (and Triton) served the second, older, run."""
    first, second = registry.VersionWriter(tmp_path), registry.VersionWriter(tmp_path)
    with pytest.raises(RuntimeError, match="out of memory"):
        with first:
            raise RuntimeError("out of memory")
    third = registry.VersionWriter(tmp_path)
    assert third.version > second.version
    with second:
        second.write_manifest(run="second")
    with third:
        third.write_manifest(run="third")
    assert registry.latest(tmp_path).manifest["run"] == "third"


def test_a_temporary_folder_that_fails_mid_run_does_not_end_the_training(tmp_path, monkeypatch):
    """``log_json`` wrote its artifact's temporary copy outside the guarded write: a temporary
    folder that could not be written mid-run (a full disk, TMPDIR removed) raised out of the run's
    last steps and the registry discarded the trained version."""
    import tempfile

    import mlflow

    from configs import load_config
    from models.tracking import tracked_run

    finished = []
    with tracked_run(load_config().training, tmp_path / "registry", {"seed": 1}, run_name="tmp-gone") as run:
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))
        run.log_json("embedding_tables.json", {"light_ranker": 1})
        finished.append(True)
    assert finished and run.lost is not None and "gone" in run.lost
    assert mlflow.active_run() is None


def test_a_version_is_on_disk_before_its_rename_publishes_it(tmp_path, monkeypatch, sync_recorder):
    """Nothing was synced: after a power cut soon after the rename, a version could be listed whose
    manifest and models were empty or cut short (the rename's metadata reached the disk before the
    files' data), and ``latest``, the export and a retraining run resuming after its durable train
    marker accepted it. Every file and folder of the version is now synced before the rename, and the
    registry folder (the rename) after it."""
    with registry.VersionWriter(tmp_path) as out:
        (out.tmp / "light_ranker" / "variables").mkdir(parents=True)
        (out.tmp / "light_ranker" / "variables" / "variables.data").write_bytes(b"w" * 100)
        (out.tmp / "popularity.parquet").write_bytes(b"p")
        out.write_manifest(note="durable")
    monkeypatch.undo()

    assert sync_recorder.published == [out.path]
    assert len([out.path, *out.path.rglob("*")]) == 6
    assert sync_recorder.missed(out.path) == []
    assert sync_recorder.parent_synced(out.path)  # the registry folder, after the rename


def test_latest_passes_over_a_version_the_retraining_run_refused(tmp_path):
    """A candidate the retraining gate (or its export's checklist) refused stayed the registry's latest,
    so ``scripts/export_triton.py`` or ``scripts/rollout.py`` without ``--version`` took it."""
    for _ in range(3):
        with registry.VersionWriter(tmp_path) as out:
            out.write_manifest()
    registry.refuse(tmp_path, 3, "gate refused the candidate: AUC regressed")
    assert registry.latest(tmp_path).version == 2
    assert registry.refusal(tmp_path / "3") == "gate refused the candidate: AUC regressed"
    assert registry.get(tmp_path, 3).version == 3  # by its number it still opens
    assert registry.list_versions(tmp_path) == [1, 2, 3]
    registry.clear_refusal(tmp_path, 3)
    assert registry.latest(tmp_path).version == 3
    for version in (1, 2, 3):
        registry.refuse(tmp_path, version, "no")
    with pytest.raises(FileNotFoundError, match="every model version .* was refused"):
        registry.latest(tmp_path)
    (tmp_path / "2" / registry.REFUSED).write_text("{not json")  # unreadable: still a refusal
    registry.clear_refusal(tmp_path, 1)
    assert registry.latest(tmp_path).version == 1


def test_a_killed_runs_temporary_folder_is_removed_by_a_later_run_but_never_a_live_one(tmp_path):
    """A run killed while writing (SIGKILL, out of memory, a power cut) left its ``.v<N>.tmp`` for good:
    the disk it held was never freed and nothing removed it. A later run now removes it, but not the
    folder of a run still writing (its lock is held), nor one without an owner record of this host."""
    import json
    import os
    import signal
    import socket
    import subprocess
    import sys
    from pathlib import Path

    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, signal, sys; from models import registry; w = registry.VersionWriter(sys.argv[1]); "
            "(w.tmp / 'weights').write_bytes(b'w' * 1000); os.kill(os.getpid(), signal.SIGKILL)",
            str(tmp_path),
        ],
        cwd=Path(__file__).resolve().parents[1],
    )
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / ".v1.tmp" / "weights").exists()
    live = registry.VersionWriter(tmp_path)  # a second training, still writing
    assert live.version == 2 and not (tmp_path / ".v1.tmp").exists()  # old code: the killed run's folder stayed
    (tmp_path / ".v3.tmp").mkdir()  # no owner record (an older writer): not known to be abandoned
    (tmp_path / ".v4.tmp").mkdir()
    (tmp_path / ".v4.tmp" / registry.OWNER).write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    assert socket.gethostname() != "elsewhere"
    with registry.VersionWriter(tmp_path) as third:
        third.write_manifest()
    assert third.version == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == [".v2.tmp", ".v3.tmp", ".v4.tmp", "5"]
    assert not (third.path / registry.OWNER).exists()  # the record is not part of the version
    with live:
        live.write_manifest()
    assert registry.list_versions(tmp_path) == [2, 5]
    os.rmdir(tmp_path / ".v3.tmp")
    # A writer dropped unused (never entered) frees its lock: its folder goes at the next run.
    dropped = registry.VersionWriter(tmp_path)
    dropped_tmp = dropped.tmp
    del dropped
    with registry.VersionWriter(tmp_path) as out:
        out.write_manifest()
    assert not dropped_tmp.exists()
