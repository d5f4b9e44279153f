"""The ranker: a DCN-v2 (deep & cross network) that scores (user, item) pairs.

It sees the user features, the item features and their explicit crosses, and predicts the
probability of the target signal (``click`` by default) with a sigmoid, so scores lie in [0, 1].
It is trained on every impression of the training period: the impressions that were not clicked are
the real negatives a ranker must learn to push down.
"""
from __future__ import annotations

import tensorflow as tf
import merlin.models.tf as mm
from merlin.io import Dataset
from merlin.schema import Schema, Tags

from configs import RankerConfig
from models import merlin_patches  # noqa: F401  (DCN save/load fix, see the module)


def ranker_schema(schema: Schema, target: str) -> Schema:
    """User and item features plus the one target column."""
    features = schema.select_by_tag([Tags.USER, Tags.ITEM])
    return features + schema.select_by_name([target])


def build_ranker(schema: Schema, config: RankerConfig) -> mm.Model:
    return mm.DCNModel(
        ranker_schema(schema, config.target),
        depth=config.cross_depth,
        deep_block=mm.MLPBlock(list(config.deep_layers)),
        prediction_tasks=mm.BinaryOutput(config.target),
    )


def train_ranker(
    train: Dataset,
    valid: Dataset,
    config: RankerConfig,
    seed: int = 42,
    verbose: int = 1,
) -> tuple[mm.Model, dict[str, float]]:
    """Train on all training impressions; return the model and validation AUC / log-loss."""
    tf.keras.utils.set_random_seed(seed)
    model = build_ranker(train.schema, config)
    model.compile(
        optimizer=tf.keras.optimizers.Adam(config.learning_rate),
        metrics=[tf.keras.metrics.AUC(name="auc")],
    )
    schema = ranker_schema(train.schema, config.target)
    train_ds = Dataset(train.to_ddf()[schema.column_names], schema=schema)
    valid_ds = Dataset(valid.to_ddf()[schema.column_names], schema=schema)
    model.fit(
        mm.Loader(train_ds, batch_size=config.batch_size, shuffle=True),
        epochs=config.epochs,
        verbose=verbose,
    )
    metrics = model.evaluate(mm.Loader(valid_ds, batch_size=config.batch_size), return_dict=True, verbose=0)
    return model, {k: float(v) for k, v in metrics.items()}
