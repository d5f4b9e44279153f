"""Model quality against the generator's ground truth, and save/load round trips."""
import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_world(tmp_path_factory):
    """The demo's default data size: big enough for quality claims to mean something."""
    from configs import load_config
    from workflows.pipeline import run_dataset_pipeline
    from workflows.sources.synthetic import generate

    config = load_config()
    raw = generate(config.synthetic).write_parquet(tmp_path_factory.mktemp("demo_raw"))
    processed = run_dataset_pipeline(
        raw["events"], raw["users"], raw["items"], tmp_path_factory.mktemp("demo_proc"), config.workflow
    )
    return config, processed


def test_ranker_auc_is_far_above_chance(demo_world):
    from models.ranker import train_ranker

    config, processed = demo_world
    _, metrics = train_ranker(processed.train(), processed.valid(), config.ranker, verbose=0)
    # Chance is 0.5; the generator's own affinity reaches about 0.80 on this data.
    assert metrics["auc"] > 0.65, metrics


def test_candidate_generator_recall_beats_popularity(demo_world):
    import tensorflow as tf
    from merlin.io import Dataset

    from evaluation.metrics import recall_at_k
    from models.candidate_generator import item_embeddings, train_candidate_generator

    config, processed = demo_world
    model, _ = train_candidate_generator(processed.train(), processed.valid(), config.candidate_generator, verbose=0)
    users = pd.read_parquet(processed.user_features)
    items = pd.read_parquet(processed.item_features)
    from models.train import feature_lists

    ids, vectors = item_embeddings(model, Dataset(items.drop(columns=["item_id_raw"])))
    features = feature_lists(processed.train().schema)
    names = features["user_categorical"] + features["user_continuous"]  # continuous: point-in-time rates
    queries = model.query_encoder({n: tf.constant(users[n].values[:, None]) for n in names}).numpy()
    top = ids[np.argsort(-(queries @ vectors.T), axis=1)[:, :100]]

    valid = processed.valid().to_ddf().compute()
    clicked = valid[valid["click"] == 1].groupby("user_id")["item_id"].apply(set)
    relevant = [clicked.get(u, set()) for u in users["user_id"]]
    train = processed.train().to_ddf().compute()
    popular = train[train["click"] == 1]["item_id"].value_counts().index.values[:100]

    model_recall = recall_at_k(top, relevant)
    popularity_recall = recall_at_k(np.tile(popular, (len(users), 1)), relevant)
    assert model_recall > popularity_recall * 1.15, (model_recall, popularity_recall)


def test_ranker_save_load_round_trip_gives_identical_predictions(processed, small_config, tmp_path):
    import merlin.models.tf as mm
    import tensorflow as tf

    from models.ranker import ranker_schema, train_ranker

    model, _ = train_ranker(processed.train(), processed.valid(), small_config.ranker, verbose=0)
    model.save(str(tmp_path / "ranker"))
    reloaded = tf.keras.models.load_model(str(tmp_path / "ranker"))
    schema = ranker_schema(processed.valid().schema, "click")
    batch, _ = next(iter(mm.Loader(processed.valid(), batch_size=256, schema=schema)))
    before = np.asarray(model(batch, training=False)).reshape(-1)
    after = np.asarray(reloaded(batch, training=False)).reshape(-1)
    np.testing.assert_allclose(before, after, rtol=1e-5, atol=1e-6)
    assert ((after >= 0) & (after <= 1)).all()


def test_query_tower_served_from_the_registry_matches_training(model_version, processed):
    """The query tower as serving loads it gives the embeddings the item index was built against."""
    import tensorflow as tf
    import merlin.models.tf  # noqa: F401

    from models import item_index

    tower = tf.keras.models.load_model(str(model_version.path / "query_tower"))
    users = pd.read_parquet(processed.user_features).head(50)
    features = model_version.manifest["features"]
    names = features["user_categorical"] + features["user_continuous"]
    queries = np.asarray(tower({n: tf.constant(users[n].values[:, None]) for n in names}))
    assert queries.shape == (50, model_version.manifest["item_embedding_dim"])
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1.0, rtol=1e-4)  # L2-normalised tower
    index, meta = item_index.load_index(model_version.path, expected_version=model_version.version)
    assert meta["dim"] == queries.shape[1] and index.ntotal == model_version.manifest["num_indexed_items"]
