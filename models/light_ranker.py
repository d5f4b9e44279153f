"""The light ranker: a small DCN-v2 on a few features, trained with sampled negatives.

Second stage of the funnel. Retrieval hands over a few hundred to thousands of candidates; the light
ranker must score all of them in a few milliseconds and keep the best ``serving.light_ranker_k`` for
the heavy ranker. So it is small: a handful of features (``light_ranker.features``, by default user
id, item id and category), one cross layer, a thin MLP, one head (P(``target``)).

Its candidates are mostly items the user was never shown, so it trains on positives against items
drawn from the catalog (``models/negative_sampling.py``: uniform or popularity-weighted,
``negatives_per_positive`` of them), not against the impressions the user skipped (those rows are
left out of its training). It is validated on the real validation impressions (AUC of clicked vs.
shown-and-skipped), the same question the heavy ranker answers, so the two AUCs can be compared.
"""

from __future__ import annotations

import logging

from merlin.io import Dataset
from merlin.schema import Schema, Tags

from configs import EmbeddingConfig, LightRankerConfig, TrainingConfig
from models.negative_sampling import sample_negatives
from models.ranker import build_dcn, fit, head_aucs

log = logging.getLogger(__name__)


def light_features(schema: Schema, config: LightRankerConfig) -> list[str]:
    """The configured features, checked against the schema (a clear error names a missing one)."""
    missing = [f for f in config.features if f not in schema.column_names]
    if missing:
        raise ValueError(f"light_ranker.features {missing} are not in the data; available: {schema.column_names}")
    return list(config.features)


def training_rows(train: Dataset, features: list[str], config: LightRankerConfig, seed: int) -> Dataset:
    """Positives of ``train`` plus sampled negatives, as a Dataset with the light ranker's schema."""
    schema = train.schema
    frame = train.to_ddf()[features + [config.target]].compute()
    item_columns = [f for f in features if Tags.ITEM in schema[f].tags]
    rows = sample_negatives(
        frame, item_columns, config.negatives_per_positive, config.negative_sampling, label=config.target, seed=seed
    )
    return Dataset(rows, schema=schema.select_by_name(features + [config.target]))


def train_light_ranker(
    train: Dataset,
    valid: Dataset,
    config: LightRankerConfig,
    embeddings: EmbeddingConfig,
    training: TrainingConfig,
    seed: int = 42,
    callbacks=(),
    verbose: int = 1,
):
    """Train on sampled negatives; return ``(model, metrics)`` with the validation AUC on real impressions."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed)
    features = light_features(train.schema, config)
    rows = training_rows(train, features, config, seed)
    columns = features + [config.target]
    valid_ds = Dataset(valid.to_ddf()[columns], schema=valid.schema.select_by_name(columns))
    model = build_dcn(rows.schema, features, [config.target], config.cross_depth, config.deep_layers, embeddings)
    history = fit(
        model,
        rows,
        valid_ds,
        epochs=config.epochs,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        patience=training.early_stopping_patience,
        monitor="val_auc",
        mode="max",
        callbacks=callbacks,
        verbose=verbose,
    )
    aucs = head_aucs(model, valid_ds, features, [config.target])
    metrics = {
        "auc": aucs[config.target],
        "epochs_run": len(history.history.get("loss", [])),
        "train_rows": int(len(rows.to_ddf())),
    }
    log.info("light ranker: valid AUC %.4f after %d epochs", metrics["auc"], metrics["epochs_run"])
    return model, metrics
