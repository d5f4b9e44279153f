"""The dataset pipeline on the session's small synthetic world."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from workflows.pipeline import category_mapping
from workflows.schema import check_columns


@pytest.fixture(scope="module")
def frames(processed):
    return processed.train().to_ddf().compute(), processed.valid().to_ddf().compute()


def test_temporal_split_has_no_validation_event_before_the_cutoff(processed, raw_paths):
    events = pd.read_parquet(raw_paths["events"])
    summary = processed.summary
    cutoff = summary["cutoff"]
    train_events = pd.read_parquet(processed.train_events)
    assert (train_events["timestamp"] < cutoff).all()
    assert summary["train_rows"] == len(train_events)
    # Cleaning removes rows, never adds: each whole-log step starts where the previous one ended.
    steps = {s["step"]: s for s in summary["steps"]}
    chain = ["dedup_identical_rows", "dedup_canonical_items", "content_filter", "recency_window"]
    assert steps[chain[0]]["rows_before"] == len(events)
    for a, b in zip(chain, chain[1:]):
        assert steps[a]["rows_after"] == steps[b]["rows_before"]
    assert steps["dedup_pairs_valid"]["rows_after"] == summary["valid_rows"]
    assert {c["check"] for c in summary["checks"]} >= {"temporal_split", "point_in_time", "labels_agree"}


def test_labels_agree_with_raw_signals(processed, raw_paths, frames, small_config):
    train, _ = frames
    events = pd.read_parquet(processed.train_events)
    items = pd.read_parquet(raw_paths["items"]).set_index("item_id")
    duration = events["item_id"].map(items["duration_seconds"])
    watched = events["watch_seconds"] / duration.clip(lower=1) >= small_config.workflow.watch_threshold
    assert len(train) == len(events)
    # The workflow keeps row order, so labels can be compared row by row.
    assert (train["click"].values == events["click"].values).all()
    assert (train["watched"].values == watched.astype(int).values).all()
    assert (train["like"].values == events["like"].values).all()
    assert (train["duration_watch"].values <= train["click"].values).all()


def test_encoded_ids_round_trip_through_the_vocabulary(processed, frames):
    train, _ = frames
    events = pd.read_parquet(processed.train_events)
    mapping = category_mapping(processed.workflow(), "user_id").set_index("encoded")["raw"]
    assert (train["user_id"].map(mapping).values == events["user_id"].values).all()


def test_user_sub_workflow_matches_training_features(processed, frames):
    train, _ = frames
    users = pd.read_parquet(processed.user_features)
    merged = train.merge(users, on="user_id", suffixes=("", "_table"))
    assert len(merged) == len(train)  # every training user is in the serving table
    for col in ("age_band", "gender", "location"):
        assert (merged[col] == merged[f"{col}_table"]).all()


def test_schema_tags_what_models_select(processed):
    from merlin.schema import Tags

    schema = processed.train().schema
    assert schema.select_by_tag(Tags.USER_ID).column_names == ["user_id"]
    assert schema.select_by_tag(Tags.ITEM_ID).column_names == ["item_id"]
    targets = {"click", "watched", "duration_watch", "like", "share"}
    assert set(schema.select_by_tag(Tags.TARGET).column_names) == targets
    assert set(schema.select_by_tag(Tags.BINARY_CLASSIFICATION).column_names) == targets
    user_cont = set(schema.select_by_tag(Tags.USER).select_by_tag(Tags.CONTINUOUS).column_names)
    item_cont = set(schema.select_by_tag(Tags.ITEM).select_by_tag(Tags.CONTINUOUS).column_names)
    # default point_in_time_features: [rates]; the windowed activity counts (workflows/activity.py)
    activity = set(schema.select_by_tag("activity").column_names)
    assert len(activity) == 6 and user_cont == {"user_click_rate_before"} | activity
    assert item_cont == {"duration_seconds", "item_click_rate_before"}
    # Time features are context: rankers may use them, the user/item towers (served per user) do not.
    assert set(schema.select_by_tag(Tags.CONTEXT).column_names) == {"hour_of_day", "day_of_week"}


def test_missing_raw_column_is_named():
    with pytest.raises(ValueError, match="watch_seconds"):
        check_columns(pd.DataFrame({"user_id": [1]}), ["user_id", "watch_seconds"], "events")


def test_out_of_range_signal_is_named():
    import dask.dataframe as dd

    from workflows.schema import check_event_values

    events = pd.DataFrame(
        {
            "user_id": [1],
            "item_id": [1],
            "timestamp": [5],
            "click": [2],
            "watch_seconds": [0],
            "like": [0],
            "share": [0],
        }
    )
    with pytest.raises(ValueError, match="events.click"):
        check_event_values(dd.from_pandas(events, npartitions=1))
    with pytest.raises(ValueError, match="watch_seconds"):
        check_event_values(dd.from_pandas(events.assign(click=1, watch_seconds=-3), npartitions=1))


def test_a_constant_continuous_column_normalises_to_zero_with_a_std_of_zero():
    """NVTabular's variance, sum(x^2) - sum(x)^2 / n, cancels to a tiny negative number for a constant
    column (MovieLens' film duration): the std was NaN, with a RuntimeWarning. The patch in
    ``workflows/merlin_patches.py`` (imported by the pipeline) clips it at 0."""
    import warnings

    import numpy as np
    import nvtabular as nvt
    from merlin.io import Dataset

    from workflows import merlin_patches  # noqa: F401

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"constant": np.full(1000, 6000, dtype="int64"), "varying": rng.integers(1, 9000, 1000)})
    workflow = nvt.Workflow(["constant", "varying"] >> nvt.ops.LogOp() >> nvt.ops.Normalize())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        workflow.fit(Dataset(df))
    normalize = workflow.output_node.op
    assert normalize.stds["constant"] == 0.0
    logged = np.log1p(df["varying"].to_numpy())
    assert normalize.stds["varying"] == pytest.approx(logged.std(ddof=1), rel=1e-4)  # LogOp works in float32
    out = workflow.transform(Dataset(df)).to_ddf().compute()
    assert (out["constant"] == 0).all() and np.isfinite(out["varying"]).all()


def test_reloading_the_workflow_patches_keeps_the_variance_clip_working(monkeypatch):
    """Applying ``workflows/merlin_patches.py`` twice (``importlib.reload``, a notebook's autoreload) must be
    harmless: the clipped ``_finalize_moments`` called itself, so every later ``Normalize`` fit recursed."""
    import importlib

    import numpy as np
    import nvtabular as nvt
    from merlin.io import Dataset
    from nvtabular.ops import moments

    from workflows import merlin_patches

    # Undo what the reload rebinds, so a failure here leaves the other tests a working Normalize.
    monkeypatch.setattr(moments, "_finalize_moments", moments._finalize_moments)
    monkeypatch.setattr(merlin_patches, "_finalize_moments_unclipped", merlin_patches._finalize_moments_unclipped)
    importlib.reload(merlin_patches)
    workflow = nvt.Workflow(["constant"] >> nvt.ops.LogOp() >> nvt.ops.Normalize())
    workflow.fit(Dataset(pd.DataFrame({"constant": np.full(1000, 6000, dtype="int64")})))
    assert workflow.output_node.op.stds["constant"] == 0.0


def test_an_interrupted_rerun_leaves_no_summary_beside_its_half_written_parts(raw_paths, small_config, tmp_path):
    """summary.json is the mark of a complete output: a rerun over an earlier output that fails
    halfway must not leave the earlier summary beside its new parts (training would read them)."""
    from unittest import mock

    from workflows import checks
    from workflows.pipeline import ProcessedData, run_dataset_pipeline

    out = tmp_path / "processed"

    def run():
        return run_dataset_pipeline(
            raw_paths["events"], raw_paths["users"], raw_paths["items"], out, small_config.workflow
        )

    run()
    assert (out / "summary.json").exists() and ProcessedData(out).summary["train_rows"] > 0
    with mock.patch.object(checks, "check_labels_agree", side_effect=RuntimeError("killed halfway")):
        with pytest.raises(RuntimeError, match="killed halfway"):
            run()
    assert (out / "train_events.parquet").exists()  # the new parts were being written...
    assert not (out / "summary.json").exists()  # ...and nothing says they are complete
    script = subprocess.run(
        [sys.executable, "scripts/train.py", "--data", str(out), "--registry", str(tmp_path / "registry")],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
    )
    assert (
        script.returncode == 2
        and "is not a processed dataset" in script.stderr
        and not (tmp_path / "registry").exists()
    )


def tiny_log(n: int, clicks=None) -> pd.DataFrame:
    """``n`` events of 10 users on items 1-8 over five days, in the raw schema; every event a click
    when ``clicks`` is 1, a coin flip when it is None."""
    import numpy as np

    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "user_id": rng.integers(1, 11, n),
            "item_id": rng.integers(1, 9, n),
            "timestamp": np.sort(rng.integers(1_000_000, 1_000_000 + 5 * 86400, n)),
            "click": rng.integers(0, 2, n) if clicks is None else clicks,
            "watch_seconds": 30,
            "like": 0,
            "share": 0,
        }
    )


def write_tables(folder: Path, events: pd.DataFrame, titles: list[str]) -> None:
    """``events`` (one row per user, item and time), 10 users and one item per title, as parquet."""
    events.drop_duplicates(["user_id", "item_id", "timestamp"]).to_parquet(folder / "events.parquet", index=False)
    users = pd.DataFrame({"user_id": range(1, 11), "age_band": "a", "gender": "g", "location": "l"})
    users.to_parquet(folder / "users.parquet", index=False)
    items = pd.DataFrame(
        {"item_id": range(1, len(titles) + 1), "category": "c", "duration_seconds": 60, "title": titles}
    )
    items.to_parquet(folder / "items.parquet", index=False)


def test_a_taken_down_item_the_item_table_lacks_is_neither_trained_on_nor_served(tmp_path):
    """checks.missing_items: warn adds an attribute-less row for an item the table lacks; one that is
    taken down lost its events, but its row came back after the filter: drawn as a sampled negative,
    it entered the training vocabulary and item_features.parquet."""
    import yaml

    from configs import load_config
    from workflows.live_store import LiveStore
    from workflows.pipeline import prepare_dataset
    from workflows.spec import RAW_SCHEMA_SPEC, spec_from_dict

    events = tiny_log(400, clicks=1)
    events.loc[::40, "item_id"] = 99  # not in the item table, and taken down
    write_tables(tmp_path, events, [f"title {i}" for i in range(1, 21)])
    store = str(tmp_path / "live.sqlite")
    LiveStore(store).set_takedown(99, True, "reported", "moderator")
    values = yaml.safe_load(RAW_SCHEMA_SPEC.read_text())
    for table in ("events", "users", "items"):
        values[table]["path"] = str(tmp_path / f"{table}.parquet")
    values["checks"] = {"missing_items": "warn"}
    workflow = {
        "content_filter": {"takedowns": store},
        "negative_sampling": {"kind": "uniform", "ratio": 5},
        "active_users": {"enabled": False},
        "checks": {"point_in_time_probe": False},
    }
    config = load_config(overrides={"workflow": workflow}).workflow
    out = prepare_dataset(spec_from_dict(values, where="test"), tmp_path / "out", config)
    assert out.summary["unsafe_items"] == [99]
    assert 99 not in set(category_mapping(out.workflow(), "item_id")["raw"])  # never trained on
    assert 99 not in set(pd.read_parquet(out.item_features)["item_id_raw"])  # never served


def test_a_step_that_leaves_no_event_is_a_named_error(tmp_path):
    """A content filter that takes every item (or an active-users rule no user meets) left an empty
    log, and the next step failed on it with whatever it tripped on first: the recency window's
    ``int(NaN)``, "cannot convert float NaN to integer"."""

    from configs import load_config
    from workflows.pipeline import run_dataset_pipeline
    from workflows.validate import DatasetError

    write_tables(tmp_path, tiny_log(300, clicks=None), [f"bad clip {i}" for i in range(1, 9)])
    paths = [str(tmp_path / f"{t}.parquet") for t in ("events", "users", "items")]
    every_item = {"content_filter": {"denylist": ["bad"]}, "recency_window": {"days": 30}}
    with pytest.raises(DatasetError, match="no event is left after content_filter.*unsafe or taken down"):
        run_dataset_pipeline(*paths, tmp_path / "out", load_config(overrides={"workflow": every_item}).workflow)
    nobody = {"active_users": {"enabled": True, "min_events": 10_000, "days": 30}}
    with pytest.raises(DatasetError, match="no event is left after active_users.*active enough"):
        run_dataset_pipeline(*paths, tmp_path / "out2", load_config(overrides={"workflow": nobody}).workflow)
    assert not (tmp_path / "out" / "summary.json").exists() and not (tmp_path / "out2" / "summary.json").exists()


def test_validation_negatives_avoid_the_training_items_of_users_the_active_filter_dropped(tmp_path):
    """Validation negatives must never be an item the user has before them: ``seen`` held the
    training part after ``active_users``, so a user that filter dropped (kept in validation, served
    by the fallback) had the items of their own training period drawn as validation negatives."""
    import numpy as np

    from configs import load_config
    from workflows.pipeline import run_dataset_pipeline

    log = tiny_log(400, clicks=1)
    log = log[log["user_id"] != 1]
    first, middle = int(log["timestamp"].min()), int(log["timestamp"].quantile(0.85))
    inactive = pd.DataFrame(  # user 1: items 1-7 early (too few to be active), item 8 in validation
        {"user_id": 1, "item_id": [*range(1, 8), 8], "timestamp": [*(first + np.arange(7)), middle]}
    ).assign(click=1, watch_seconds=30, like=0, share=0)
    titles = [f"title {i}" for i in range(1, 13)]  # items 9-12: no event
    write_tables(tmp_path, pd.concat([log, inactive], ignore_index=True), titles)
    paths = [str(tmp_path / f"{t}.parquet") for t in ("events", "users", "items")]
    workflow = {
        "split": {"kind": "temporal", "valid_fraction": 0.1, "test_fraction": 0.1},
        "active_users": {"enabled": True, "min_events": 10, "days": 30, "event": "click"},
        "negative_sampling": {"kind": "uniform", "ratio": 20, "valid": True},
        "checks": {"point_in_time_probe": False},
    }
    out = run_dataset_pipeline(*paths, tmp_path / "out", load_config(overrides={"workflow": workflow}).workflow)
    valid = out.valid().to_ddf().compute()
    assert 1 not in set(category_mapping(out.workflow(), "user_id")["raw"])  # dropped: user 1 is the OOV id, 2
    items = category_mapping(out.workflow(), "item_id").set_index("encoded")["raw"]
    negatives = valid[valid["click"] == 0]
    mine = items.reindex(negatives[negatives["user_id"] == 2]["item_id"]).tolist()
    assert len(mine) > 0  # user 1 has validation negatives: items never seen (9-12)
    before = sorted(set(mine) & set(range(1, 8)))
    assert before == [], f"user 1's validation negatives include items of their training period: {before}"


def test_rare_ids_sharing_the_oov_index_are_not_duplicate_pairs(tmp_path):
    """features.id_freq_threshold sends rare ids to the one OOV index; the duplicate-pair check read
    the encoded training data, so a user with two rare items had a "duplicate" pair and the pipeline
    raised CheckFailed on a log without any."""
    from configs import load_config
    from workflows.pipeline import run_dataset_pipeline

    log = tiny_log(300, clicks=1)
    first = int(log["timestamp"].min())
    rare = pd.DataFrame({"user_id": 1, "item_id": [9, 10], "timestamp": [first, first + 1]})
    write_tables(
        tmp_path, pd.concat([log, rare.assign(click=1, watch_seconds=30, like=0, share=0)]), list("abcdefghij")
    )
    paths = [str(tmp_path / f"{t}.parquet") for t in ("events", "users", "items")]
    workflow = {"features": {"id_freq_threshold": 2}, "checks": {"point_in_time_probe": False}}
    out = run_dataset_pipeline(*paths, tmp_path / "out", load_config(overrides={"workflow": workflow}).workflow)
    assert {"check": "no_duplicate_pairs", "passed": True} in [
        {k: c[k] for k in ("check", "passed")} for c in out.summary["checks"]
    ]


def test_a_random_split_that_leaves_a_part_empty_is_a_named_defect(tmp_path):
    """RecBole's rounding gives a user of 2 items one training and one test item and no validation
    item: on a log of such users the validation part was empty, and the pipeline failed later with a
    KeyError at the attribute join that named nothing."""
    from configs import load_config
    from workflows.pipeline import run_dataset_pipeline
    from workflows.validate import DatasetError

    log = tiny_log(300, clicks=1)
    log = log.assign(item_id=1 + log["user_id"] % 2 + 2 * (log.index % 2))  # two items per user
    write_tables(tmp_path, log, list("abcd"))
    paths = [str(tmp_path / f"{t}.parquet") for t in ("events", "users", "items")]
    workflow = {"split": {"kind": "random"}, "checks": {"point_in_time_probe": False}}
    with pytest.raises(DatasetError, match=r"the random split leaves the valid part empty .*split\.ratios"):
        run_dataset_pipeline(*paths, tmp_path / "out", load_config(overrides={"workflow": workflow}).workflow)
    assert not (tmp_path / "out" / "summary.json").exists()


def test_a_rerun_without_a_test_part_or_activity_windows_leaves_none_of_the_earlier_run(tmp_path):
    """A rerun into the same folder rewrote what it produced and kept what it did not: the earlier
    run's test/, test_events.parquet and recent_events.parquet stayed beside the new summary, so
    ``ProcessedData.test()`` returned the old test part, the offline evaluation scored the old test
    events, and training shipped the old recent events to serving."""
    from configs import load_config
    from workflows.pipeline import run_dataset_pipeline

    write_tables(tmp_path, tiny_log(400, clicks=None), [f"title {i}" for i in range(1, 9)])
    paths = [str(tmp_path / f"{t}.parquet") for t in ("events", "users", "items")]
    first = {
        "split": {"kind": "temporal", "valid_fraction": 0.1, "test_fraction": 0.1},
        "features": {"activity_windows": ["1h"]},
        "checks": {"point_in_time_probe": False},
    }
    out = run_dataset_pipeline(*paths, tmp_path / "out", load_config(overrides={"workflow": first}).workflow)
    assert out.test() is not None and out.held_out_events("test").exists() and out.recent_events.exists()
    again = {"split": {"kind": "temporal", "valid_fraction": 0.2, "test_fraction": 0.0}}
    out = run_dataset_pipeline(*paths, tmp_path / "out", load_config(overrides={"workflow": again}).workflow)
    assert "test_rows" not in out.summary
    assert out.test() is None
    assert not out.held_out_events("test").exists() and not out.recent_events.exists()


def test_a_random_split_trains_on_counts_of_earlier_training_events_only(tmp_path):
    """The point-in-time and activity features were computed on the whole log before the split: under
    a random split a training row counted the user's held-out events before it (a leak of held-out
    labels into training features), while serving counts the training part only. Now the rows of every
    part count the training part's strictly earlier events, and the probe checks that log."""
    import dask.dataframe as dd
    import numpy as np

    from configs import load_config
    from workflows.pipeline import run_dataset_pipeline
    from workflows.splits import random_split

    write_tables(tmp_path, tiny_log(400, clicks=None), [f"title {i}" for i in range(1, 9)])
    paths = [str(tmp_path / f"{t}.parquet") for t in ("events", "users", "items")]
    workflow = {"split": {"kind": "random"}, "features": {"activity_windows": ["7d"]}}
    config = load_config(overrides={"workflow": workflow}).workflow
    out = run_dataset_pipeline(*paths, tmp_path / "out", config)
    assert "point_in_time" in {c["check"] for c in out.summary["checks"]}
    log = pd.read_parquet(paths[0])
    train = random_split(dd.from_pandas(log, npartitions=2), config.split).train.compute()
    for part in ("train", "valid", "test"):
        rows = pd.read_parquet(out.train_events if part == "train" else out.held_out_events(part))
        encoded = getattr(out, part)().to_ddf().compute()  # the same rows, in the same order
        got = np.rint(np.expm1(encoded[["user_events_last_7d", "user_clicks_last_7d"]].to_numpy())).astype(int)
        # The 7-day window spans the whole 5-day log: every earlier training event of the user.
        earlier = rows.reset_index().merge(train, on="user_id", suffixes=("", "_t"))
        earlier = earlier[earlier["timestamp_t"] < earlier["timestamp"]].groupby("index")["click_t"]
        want = np.stack([earlier.size(), earlier.sum()], axis=1)
        want = pd.DataFrame(want, index=earlier.size().index).reindex(rows.index, fill_value=0).to_numpy()
        assert len(got) == len(rows) > 0
        np.testing.assert_array_equal(got, want, err_msg=f"{part}: counts not of earlier training events")
    # ...and the serving table's counts as of the end of the training data are the training part's.
    users = pd.read_parquet(out.user_features).set_index("user_id_raw")
    served = np.rint(np.expm1(users["user_events_last_7d"])).astype(int)
    assert served.to_dict() == train.groupby("user_id").size().reindex(served.index, fill_value=0).to_dict()


def test_the_raw_log_is_released_once_it_is_cleaned(tmp_path, monkeypatch):
    """``inputs.events`` is the raw log, persisted; ``_run`` kept ``inputs`` referenced until the
    summary, so the raw log stayed in memory beside the cleaned one through the split, the features,
    the negatives and the feature workflow. By the attribute join it must be gone."""
    import gc
    import weakref

    from configs import load_config
    from workflows import pipeline

    write_tables(tmp_path, tiny_log(300), [f"clip {i}" for i in range(1, 9)])
    paths = [str(tmp_path / f"{t}.parquet") for t in ("events", "users", "items")]
    raw, alive = [], []
    load, join = pipeline.load_inputs, pipeline.attribute_join

    def loaded(spec):
        inputs = load(spec)
        # The persisted raw log's partitions: what its memory is.
        raw.extend(weakref.ref(part) for part in inputs.events.dask.values() if isinstance(part, pd.DataFrame))
        return inputs

    def joined(*args, **kwargs):
        gc.collect()
        alive.append(sum(ref() is not None for ref in raw))
        return join(*args, **kwargs)

    monkeypatch.setattr(pipeline, "load_inputs", loaded)
    monkeypatch.setattr(pipeline, "attribute_join", joined)
    out = pipeline.run_dataset_pipeline(*paths, tmp_path / "out", load_config().workflow)
    assert raw, "the raw log's partitions were not found"
    assert alive == [0]  # before 2026-12-07 every raw partition was still alive here
    assert (out.root / "summary.json").exists()
