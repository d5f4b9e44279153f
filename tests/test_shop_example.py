"""The shop example end to end from nothing but its spec: a generated CSV / JSON-lines log in another
shape than the raw schema (customer, sku, ts in ms, view / add_to_cart / purchase; brand, price,
category_path) goes through prepare -> train -> export -> serve -> query.

The spec gets one column the code has never heard of (``colour``, added to items.csv and to the
spec's item categoricals here): it must reach the exported heavy ranker's inputs and the served
funnel without a code change. One tiny model version is trained once for the module."""

import sqlite3

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.slow

TINY = {
    "candidate_generator": {"epochs": 1, "batch_size": 512},
    "light_ranker": {"epochs": 1, "batch_size": 512},
    "heavy_ranker": {"epochs": 1, "batch_size": 512},
    "serving": {"retrieval_k": 100, "light_ranker_k": 30, "max_k": 50},
    "workflow": {"checks": {"point_in_time_probe": False}},
}
COLOURS = ["red", "green", "blue", "black", "white"]


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """prepare -> train -> export, once; ``(spec path, processed, model version, repository)``."""
    from configs import load_config
    from deployment.export import export_repository
    from models.train import train_all
    from workflows.pipeline import prepare_dataset
    from workflows.sources.shop import generate
    from workflows.spec import load_spec

    root = tmp_path_factory.mktemp("shop_e2e")
    paths = generate(customers=300, skus=200, events_per_customer=30, seed=5).write(root / "data")
    items = pd.read_csv(paths["items"])
    items["colour"] = [COLOURS[i % len(COLOURS)] for i in range(len(items))]
    items.to_csv(paths["items"], index=False)
    spec_path = root / "data" / "dataset.yaml"
    spec = yaml.safe_load(spec_path.read_text())
    spec["items"]["categorical"].append("colour")  # the new column: nothing else changes
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))

    config = load_config(overrides=TINY)
    processed = prepare_dataset(load_spec(spec_path), root / "processed", config.workflow)
    version = train_all(processed, config, root / "registry", verbose=0)
    repo = export_repository(version, root / "triton_repo")
    return spec_path, processed, version, repo


@pytest.fixture(scope="module")
def client(shop, tmp_path_factory):
    from deployment.server import TritonServer
    from serving.client import FunnelClient

    server = TritonServer(shop[3], log_path=tmp_path_factory.mktemp("shop_triton") / "server.log")
    server.start()
    try:
        with FunnelClient(server.grpc_url) as c:
            yield c
    finally:
        server.stop()


def test_prepare_adapts_to_the_shop(shop):
    from merlin.schema import Tags

    _, processed, _, _ = shop
    dataset = processed.summary["dataset"]
    assert dataset["name"] == "shop"
    assert dataset["labels"] == ["click", "view", "add_to_cart", "purchase"]  # no watch time: no watch labels
    assert any("keyword denylist off" in note for note in dataset["adaptations"])  # no text column
    schema = processed.train().schema
    item = set(schema.select_by_tag(Tags.ITEM).column_names)
    assert {"brand", "colour", "category_path_1", "category_path_2", "category_path_3", "price"} <= item
    assert {"segment", "region"} <= set(schema.select_by_tag(Tags.USER).column_names)
    assert set(schema.select_by_tag(Tags.TARGET).column_names) == set(dataset["labels"])


def test_the_objective_is_set_in_the_specs_signals(shop):
    manifest = shop[2].manifest
    assert manifest["heavy_ranker"]["weights"] == {"view": 0.2, "add_to_cart": 0.3, "purchase": 0.5}
    assert manifest["config"]["serving"]["fallback_content_column"] == "brand"  # no "category" here


def test_a_new_item_column_reaches_the_exported_heavy_ranker_and_the_stores(shop):
    import tensorflow as tf

    from serving.fast_inference import ServingFunction

    _, _, version, repo = shop
    stage = repo / "heavy_ranker" / str(version.manifest["version"])
    inputs = ServingFunction(tf, stage / "heavy_ranker").input_names
    assert {"colour", "brand", "price", "category_path_1", "segment", "region"} <= set(inputs)
    served_items = pd.read_parquet(stage / "item_features.parquet")
    assert {"colour", "brand", "category_path_3"} <= set(served_items.columns)
    store = repo / "feature_lookup" / str(version.manifest["version"]) / "online_store.sqlite"
    with sqlite3.connect(store) as con:
        columns = [row[1] for row in con.execute("PRAGMA table_info(user_features)")]
    assert {"segment", "region"} <= set(columns)


def test_the_served_funnel_answers_known_and_unknown_customers(shop, client):
    _, processed, version, _ = shop
    users = pd.read_parquet(processed.user_features)["user_id_raw"]
    skus = set(pd.read_parquet(version.path / "item_features.parquet")["item_id_raw"])
    recs = client.recommend(user_id=int(users.iloc[0]), k=10)
    assert recs.served_by == "model" and len(recs.item_ids) == 10
    assert set(int(i) for i in recs.item_ids) <= skus
    assert list(recs.scores) == sorted(recs.scores, reverse=True)
    assert recs.stage_counts["retrieval"] > 0
    unknown = client.recommend(user_id=999_999, k=5)
    assert unknown.served_by == "fallback" and len(unknown.item_ids) == 5
