"""The whole pipeline under other configurations: random per-user split with a test part, sampled
negatives, hashed attribute vocabularies; and on a 2-worker dask.distributed cluster."""

import numpy as np
import pandas as pd
import pytest

from configs import load_config

SMALL = {"synthetic": {"num_users": 150, "num_items": 100, "events_per_user": 30, "seed": 9}}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    from workflows.sources.synthetic import generate

    config = load_config(overrides=SMALL)
    return config, generate(config.synthetic).write_parquet(tmp_path_factory.mktemp("variants_raw"))


def run(raw_paths, out, workflow_overrides, scheduler=None):
    from workflows.pipeline import run_dataset_pipeline

    config = load_config(overrides={**SMALL, "workflow": workflow_overrides})
    return run_dataset_pipeline(
        raw_paths["events"], raw_paths["users"], raw_paths["items"], out, config.workflow, scheduler=scheduler
    )


def test_random_split_negatives_and_hashing(raw, tmp_path):
    _, paths = raw
    out = run(
        paths,
        tmp_path / "p",
        {
            "split": {"kind": "random"},
            "negative_sampling": {"kind": "popularity", "ratio": 1.0, "valid": True},
            "features": {
                "attribute_num_buckets": 3,
                "attribute_freq_threshold": 500,
                "point_in_time_features": ["counts", "rates"],
            },
        },
    )
    s = out.summary
    assert s["test_rows"] > 0 and out.test() is not None
    steps = {st["step"]: st for st in s["steps"]}
    added = steps["negative_sampling"]["rows_after"] - steps["negative_sampling"]["rows_before"]
    assert added > 0
    # Validation negatives: signal-free rows for items the user has in neither training nor validation.
    valid_added = steps["negative_sampling_valid"]["rows_after"] - steps["negative_sampling_valid"]["rows_before"]
    assert valid_added > 0 and s["valid_rows"] == steps["negative_sampling_valid"]["rows_after"]
    valid = out.valid().to_ddf().compute()
    known = valid[(valid["user_id"] > 2) & (valid["item_id"] > 2)]  # 0-2: padding, null, out of vocabulary
    assert not known.duplicated(["user_id", "item_id"]).any()  # never a pair the part already holds
    assert (valid["click"] == 0).sum() >= valid_added
    train = out.train().to_ddf().compute()
    assert len(train) == s["train_rows"]
    # Sampled negatives carry no signal at all.
    assert (train["click"] == 0).sum() >= added and train["duration_watch"].max() == 1
    # Locations below the frequency threshold are hashed into 3 buckets instead of getting own ids.
    cardinality = out.train().schema["location"].properties["embedding_sizes"]["cardinality"]
    raw_locations = pd.read_parquet(paths["users"])["location"].nunique()
    assert cardinality < raw_locations + 3
    assert {c["check"] for c in s["checks"]} >= {"no_duplicate_pairs", "labels_agree", "point_in_time"}
    from merlin.schema import Tags

    user_cont = out.train().schema.select_by_tag(Tags.USER).select_by_tag(Tags.CONTINUOUS).column_names
    assert set(user_cont) == {"user_events_before", "user_clicks_before", "user_click_rate_before"}
    # Serving tables carry the same features, as of the end of the training data.
    users = pd.read_parquet(out.user_features)
    assert set(user_cont) <= set(users.columns) and users["user_events_before"].notna().all()
    # ...and the values are the counts of the cleaned log's training part (held-out events before the
    # end of training are not counted), recomputed here in plain pandas and passed through the same
    # fitted user sub-workflow.
    import dask.dataframe as dd
    from merlin.io import Dataset

    from workflows.splits import random_split

    events = pd.read_parquet(paths["events"]).drop_duplicates()
    id_map = pd.read_parquet(out.item_id_map).set_index("item_id")["canonical_item_id"]
    events["item_id"] = events["item_id"].map(id_map)
    events = events[~events["item_id"].isin(s["unsafe_items"])]
    end_of_training = s["cutoff"]
    split_config = load_config(overrides={**SMALL, "workflow": {"split": {"kind": "random"}}}).workflow.split
    past = random_split(dd.from_pandas(events, npartitions=2), split_config).train.compute()
    assert len(past) < (events["timestamp"] < end_of_training).sum()  # held-out events lie before the end too
    totals = past.groupby("user_id").agg(user_events_before=("click", "size"), user_clicks_before=("click", "sum"))
    table = pd.read_parquet(paths["users"]).merge(totals.reset_index(), on="user_id", how="left").fillna(0)
    for c in ("user_events_before", "user_clicks_before"):
        table[c] = table[c].astype("int64")
    expected = out.workflow().get_subworkflow("user_features").transform(Dataset(table)).to_ddf().compute()
    expected = expected.assign(user_id_raw=table["user_id"].values).set_index("user_id_raw")
    got = users.set_index("user_id_raw")
    for c in user_cont:
        np.testing.assert_allclose(got[c].values, expected.loc[got.index, c].values, rtol=1e-6)
    # The item table likewise: a held-out item's own clicks are not in its popularity.
    items = pd.read_parquet(out.item_features).set_index("item_id_raw")
    clicks = past.groupby("item_id")["click"].sum()
    raw_clicks = items["item_clicks_before"] if "item_clicks_before" in items else None
    assert raw_clicks is not None
    encoded = out.workflow().get_subworkflow("item_features")
    table = pd.read_parquet(paths["items"]).set_index("item_id").loc[items.index.to_numpy()].rename_axis("item_id")
    table = table.reset_index()
    table["item_events_before"] = table["item_id"].map(past.groupby("item_id").size()).fillna(0).astype("int64")
    table["item_clicks_before"] = table["item_id"].map(clicks).fillna(0).astype("int64")
    want = encoded.transform(Dataset(table)).to_ddf().compute().assign(raw=table["item_id"].values).set_index("raw")
    np.testing.assert_allclose(raw_clicks.values, want.loc[items.index, "item_clicks_before"].values, rtol=1e-6)


def test_two_worker_cluster_gives_the_same_output_as_one_process(raw, tmp_path):
    from distributed import Client, LocalCluster

    _, paths = raw
    overrides = {"checks": {"point_in_time_probe": False}}
    single = run(paths, tmp_path / "single", overrides)
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        assert len(client.scheduler_info()["workers"]) == 2
        multi = run(paths, tmp_path / "multi", overrides, scheduler=client)

    def frame(ds):
        df = ds.to_ddf().compute()
        return df.sort_values(list(df.columns)).reset_index(drop=True)

    pd.testing.assert_frame_equal(frame(single.train()), frame(multi.train()))
    pd.testing.assert_frame_equal(frame(single.valid()), frame(multi.valid()))
    for table in ("user_features", "item_features"):
        pd.testing.assert_frame_equal(pd.read_parquet(getattr(single, table)), pd.read_parquet(getattr(multi, table)))
    a, b = single.summary, multi.summary
    assert a["steps"] == b["steps"] and a["duration_watch_thresholds"] == b["duration_watch_thresholds"]


def test_scheduler_argument_is_validated(raw, tmp_path):
    _, paths = raw
    with pytest.raises(ValueError, match="scheduler"):
        run(paths, tmp_path / "x", {}, scheduler="not-an-address")
