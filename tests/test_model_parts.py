"""Fast checks of the model building blocks: table sizing and hashing, heavy-ranker targets."""

import numpy as np
import pytest
from merlin.schema import ColumnSchema, Schema, Tags

from configs import EmbeddingConfig, HeavyRankerConfig, TargetConfig


def _categorical(name, cardinality, *tags):
    col = ColumnSchema(name, tags=[Tags.CATEGORICAL, *tags], dtype=np.int64)
    return col.with_properties({"domain": {"min": 0, "max": cardinality - 1, "name": name}})


def test_embedding_width_grows_with_cardinality_within_bounds():
    from models.embeddings import embedding_dim

    cfg = EmbeddingConfig(min_dim=8, max_dim=64, multiplier=2.0)
    assert embedding_dim(5, cfg) == 8  # clipped up
    assert embedding_dim(10_000, cfg) == 20  # 2 * 10_000 ** 0.25
    assert embedding_dim(10**9, cfg) == 64  # clipped down
    widths = [embedding_dim(n, cfg) for n in (10, 1_000, 100_000, 10_000_000)]
    assert widths == sorted(widths)


def test_columns_above_the_cap_are_hashed_into_max_rows():
    import tensorflow as tf

    from models.embeddings import HashIds, cap_schema, describe_tables, input_block

    schema = Schema([_categorical("user_id", 5000, Tags.USER), _categorical("gender", 4, Tags.USER)])
    cfg = EmbeddingConfig(min_dim=4, max_dim=16, max_rows=100)
    capped, buckets = cap_schema(schema, cfg)
    assert buckets == {"user_id": 100}
    assert capped["user_id"].int_domain.max == 99 and capped["gender"].int_domain.max == 3

    ids = {
        "user_id": tf.constant([[7], [107], [4999]], dtype=tf.int64),
        "gender": tf.constant([[1], [2], [3]], dtype=tf.int64),
    }
    folded = HashIds(buckets)(ids)
    assert folded["user_id"].numpy().reshape(-1).tolist() == [7, 7, 99]
    assert folded["gender"].numpy().reshape(-1).tolist() == [1, 2, 3]  # under the cap: untouched

    block = input_block(schema, cfg)
    out = block(ids)  # id 4999 would be out of range without hashing
    tables = {t["table"]: t for t in describe_tables(block)}
    assert tables["user_id"]["rows"] == 100 and tables["gender"]["rows"] == 4
    assert tables["user_id"]["bytes"] == 100 * tables["user_id"]["dim"] * 4
    assert out.shape[0] == 3


def _label_schema(*names):
    return Schema([ColumnSchema(n, tags=[Tags.TARGET, Tags.BINARY_CLASSIFICATION], dtype=np.int64) for n in names])


def test_heavy_targets_fall_back_or_drop_and_weights_sum_to_one(caplog):
    from models.heavy_ranker import resolve_targets

    cfg = HeavyRankerConfig(
        targets=[TargetConfig("click", 0.4), TargetConfig("duration_watch", 0.4), TargetConfig("like", 0.2)]
    )
    assert resolve_targets(_label_schema("click", "duration_watch", "like"), cfg) == pytest.approx(
        {"click": 0.4, "duration_watch": 0.4, "like": 0.2}
    )
    with caplog.at_level("WARNING"):
        weights = resolve_targets(_label_schema("click", "watched", "like"), cfg)
    assert weights == pytest.approx({"click": 0.4, "watched": 0.4, "like": 0.2})
    assert "duration_watch" in caplog.text
    weights = resolve_targets(_label_schema("click", "like"), cfg)  # no fallback either: dropped
    assert weights == pytest.approx({"click": 2 / 3, "like": 1 / 3})
    with pytest.raises(ValueError, match="none is in the data"):
        resolve_targets(_label_schema("share"), cfg)
    # Only targets weighted 0 in the data (the default config on data without clicks): no score to
    # normalise, and the error says so instead of that none of them is in the data.
    with pytest.raises(ValueError) as refused:
        resolve_targets(_label_schema("watched", "like"), HeavyRankerConfig())
    assert "none is in the data" not in str(refused.value)
    assert "weight 0" in str(refused.value) and "['click']" in str(refused.value)
    # A fallback configured as a target of its own keeps its own weight, in either order of the list.
    both = [TargetConfig("click", 0.4), TargetConfig("duration_watch", 0.4), TargetConfig("watched", 0.2)]
    for order in (both, both[::-1]):
        weights = resolve_targets(_label_schema("click", "watched"), HeavyRankerConfig(targets=order))
        assert weights == pytest.approx({"click": 2 / 3, "watched": 1 / 3})


def test_combined_score_is_the_weighted_sum_of_the_heads():
    from models.heads import combine

    rng = np.random.default_rng(0)
    heads = {t: rng.random(1000).astype(np.float32) for t in ("click", "watched", "like")}
    weights = {"click": 0.4, "watched": 0.4, "like": 0.2}
    score = combine(heads, weights)
    np.testing.assert_allclose(score, 0.4 * heads["click"] + 0.4 * heads["watched"] + 0.2 * heads["like"], rtol=1e-6)
    with pytest.raises(KeyError, match="like"):
        combine({"click": heads["click"]}, weights)


def test_a_ranker_with_no_deep_layers_builds_and_scores_in_0_1():
    """``deep_layers: []`` loads (cross layers only); Merlin's ``MLPBlock([])`` failed with an IndexError."""
    import tensorflow as tf

    from configs import load_config
    from models.ranker import build_dcn

    assert load_config(overrides={"light_ranker": {"deep_layers": []}}).light_ranker.deep_layers == []
    label = ColumnSchema("click", tags=[Tags.TARGET, Tags.BINARY_CLASSIFICATION], dtype=np.float32)
    schema = Schema([_categorical("user_id", 20, Tags.USER), _categorical("item_id", 30, Tags.ITEM), label])
    model = build_dcn(schema, ["user_id", "item_id"], ["click"], 1, [], EmbeddingConfig(min_dim=4, max_dim=8))
    ids = {"user_id": tf.constant([[1], [19]], dtype=tf.int64), "item_id": tf.constant([[0], [29]], dtype=tf.int64)}
    scores = np.asarray(model(ids, training=False)).reshape(-1)
    assert scores.shape == (2,) and ((scores >= 0) & (scores <= 1)).all()


def test_invalid_ranker_configs_are_rejected():
    from configs import load_config

    with pytest.raises(ValueError, match="negative_sampling"):
        load_config(overrides={"light_ranker": {"negative_sampling": "hard"}})
    with pytest.raises(ValueError, match="duplicate"):
        load_config(
            overrides={"heavy_ranker": {"targets": [{"name": "click", "weight": 1}, {"name": "click", "weight": 1}]}}
        )
    with pytest.raises(TypeError, match=r"targets\[0\].weight"):
        load_config(overrides={"heavy_ranker": {"targets": [{"name": "click", "weight": "high"}]}})


def test_logq_correction_uses_positive_frequencies_and_survives_the_temperature(processed, small_config):
    import dataclasses

    from models.candidate_generator import build_candidate_generator, item_frequencies, positives

    train = processed.train()
    frame = train.to_ddf().compute()
    clicks = frame.loc[frame["click"] > 0, "item_id"].value_counts()
    from_positives = item_frequencies(train.schema, positives(train))
    np.testing.assert_array_equal(from_positives[clicks.index.to_numpy()], clicks.to_numpy())
    # Categorify's counts include every row (here every impression), so they are never smaller.
    assert (item_frequencies(train.schema) >= from_positives).all()
    config = dataclasses.replace(small_config.candidate_generator, logq_correction=True, logq_strength=1.5)
    model = build_candidate_generator(train.schema, config, positive_rows=positives(train))
    post = next(layer.post for layer in model.submodules if getattr(layer, "post", None) is not None)
    # Merlin divides by the temperature after the correction: reg_factor = T * strength undoes that.
    assert post.reg_factor == pytest.approx(0.1 * 1.5)


def test_heavy_ranker_members_need_the_affinity_for_hard_negatives(processed, small_config):
    import dataclasses

    from configs import HeavyRankerMemberConfig
    from models.heavy_ranker import train_heavy_ranker_members

    config = dataclasses.replace(small_config.heavy_ranker, members=[HeavyRankerMemberConfig(hard_negatives=5)])
    with pytest.raises(ValueError, match="needs the item affinity"):
        train_heavy_ranker_members(
            processed.train(),
            processed.valid(),
            config,
            small_config.embeddings,
            small_config.training,
            affinity_weights=None,
            verbose=0,
        )
    with pytest.raises(ValueError, match="at least one member"):
        HeavyRankerConfig(members=[])
    with pytest.raises(ValueError, match="hard_negatives must be >= 0"):
        HeavyRankerMemberConfig(hard_negatives=-1)


def test_hard_negatives_are_labelled_0_for_an_untagged_target_too(monkeypatch):
    import pandas as pd
    from merlin.io import Dataset

    from configs import EmbeddingConfig, HeavyRankerMemberConfig, TrainingConfig
    from models import heavy_ranker

    frame = pd.DataFrame(
        {
            "user_id": [0, 0, 1, 1],
            "item_id": [0, 1, 2, 3],
            "click": [1, 0, 1, 0],
            "duration_watch": [1.0, 0.0, 1.0, 0.0],
        }
    )
    schema = Schema(
        [
            ColumnSchema("user_id", tags=[Tags.USER, Tags.USER_ID, Tags.CATEGORICAL], dtype=np.int64),
            ColumnSchema("item_id", tags=[Tags.ITEM, Tags.ITEM_ID, Tags.CATEGORICAL], dtype=np.int64),
            *_label_schema("click"),
            ColumnSchema("duration_watch", dtype=np.float32),  # a label the pipeline added later: no tags
        ]
    )
    trained = []
    monkeypatch.setattr(
        heavy_ranker, "train_heavy_ranker", lambda train, *a, **k: trained.append(train) or (None, {}, {})
    )
    config = HeavyRankerConfig(
        targets=[TargetConfig("click", 0.5), TargetConfig("duration_watch", 0.5)],
        members=[HeavyRankerMemberConfig(hard_negatives=2)],
    )
    weights = np.ones((4, 4), dtype=np.float32)
    heavy_ranker.train_heavy_ranker_members(
        Dataset(frame, schema=schema), None, config, EmbeddingConfig(), TrainingConfig(), affinity_weights=weights
    )
    rows = trained[0].to_ddf().compute()
    assert len(rows) == len(frame) + 4  # two hard negatives per user
    # Copied from the user's first positive row before, where duration_watch is 1.
    assert (rows.loc[rows["click"] == 0, "duration_watch"] == 0).all(), rows


def test_logq_mixture_with_sampled_negatives_is_the_expected_count_per_batch():
    import pandas as pd
    from merlin.io import Dataset

    from configs import CandidateGeneratorConfig
    from models.candidate_generator import build_candidate_generator, item_frequencies

    def categorical(name, cardinality, *tags):
        col = _categorical(name, cardinality, *tags)
        return col.with_properties({**col.properties, "embedding_sizes": {"cardinality": cardinality, "dimension": 8}})

    # Ids 0-2 reserved, 3-15 the catalog, of which 13-15 are never clicked; 16-19 unused.
    schema = Schema(
        [categorical("user_id", 10, Tags.USER, Tags.USER_ID), categorical("item_id", 20, Tags.ITEM, Tags.ITEM_ID)]
    )
    clicked = np.array([3] * 10 + [4] * 5 + [5] * 3 + list(range(6, 13)), dtype=np.int64)
    positives = Dataset(pd.DataFrame({"user_id": np.arange(len(clicked)) % 10, "item_id": clicked}), schema=schema)
    counts = np.bincount(clicked, minlength=20).astype(np.float64)
    np.testing.assert_array_equal(item_frequencies(schema, positives), counts)  # 0 where never clicked
    catalog = np.arange(3, 16, dtype=np.int64)
    config = CandidateGeneratorConfig(embedding_dim=4, tower_layers=[8], batch_size=6, sampled_negatives=3)
    model = build_candidate_generator(schema, config, positive_rows=positives, catalog={"item_id": catalog})
    post = next(layer.post for layer in model.submodules if getattr(layer, "post", None) is not None)
    # Expected times each catalog item is a negative per batch: batch_size * p(item) + sampled / catalog size.
    expected = 6 * counts[catalog] / counts.sum() + 3 / len(catalog)
    got = post.candidate_probs.numpy()[catalog]
    # Merlin normalises q; only its ratios between candidates matter (log q up to a constant).
    np.testing.assert_allclose(got / got.sum(), expected / expected.sum(), rtol=1e-5)


def test_a_history_event_the_training_events_lack_is_refused_before_any_training(processed, small_config, tmp_path):
    # training.history_event naming no column of the training events ("clik") was refused only once the
    # candidate generator had trained and its item index was built.
    from configs import with_overrides
    from models import train

    def trained(*args, **kwargs):
        raise AssertionError("the candidate generator trained before the history event was checked")

    config = with_overrides(small_config, {"training": {"history_event": "clik"}})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "train_candidate_generator", trained)
        with pytest.raises(ValueError, match="training.history_event 'clik' is not a column"):
            train.train_all(processed, config, tmp_path / "registry", verbose=0)


def test_reloading_the_merlin_patches_keeps_the_cross_config_fix_working(monkeypatch):
    """Applying ``models/merlin_patches.py`` twice (``importlib.reload``, a notebook's autoreload) must be
    harmless: the patched ``Cross.get_config`` recursed into itself, so every later DCN save failed."""
    import importlib

    from merlin.models.tf.blocks.cross import Cross

    from models import merlin_patches

    # Undo what the reload rebinds, so a failure here leaves the other tests a working Cross.
    monkeypatch.setattr(Cross, "get_config", Cross.get_config)
    monkeypatch.setattr(merlin_patches, "_original_get_config", merlin_patches._original_get_config)
    importlib.reload(merlin_patches)
    assert Cross(output_x0=True).get_config()["output_x0"] is True


def test_an_item_affinity_the_catalog_cannot_have_is_refused_before_any_training(processed, small_config, tmp_path):
    # A catalog above item_affinity.max_items with the affinity in the blend (or a member's hard negatives
    # drawn with it) was refused only once the candidate generator (and the light ranker) had trained.
    from configs import with_overrides
    from models import train

    def trained(*args, **kwargs):
        raise AssertionError("the candidate generator trained before the item affinity's size was checked")

    small = {"item_affinity": {"max_items": 2}}
    blend = with_overrides(small_config, {**small, "serving": {"ordering": {"affinity_weight": 0.3}}})
    members = [{"hard_negatives": 2}]
    unused = {"serving": {"ordering": {"affinity_weight": 0.0}}}
    hard = with_overrides(small_config, {**small, **unused, "heavy_ranker": {"members": members}})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "train_candidate_generator", trained)
        with pytest.raises(ValueError, match="item_affinity.max_items=2"):
            train.train_all(processed, blend, tmp_path / "registry", verbose=0)
        with pytest.raises(ValueError, match="hard_negatives needs the item affinity"):
            train.train_all(processed, hard, tmp_path / "registry", verbose=0)
