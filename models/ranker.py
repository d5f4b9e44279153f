"""What the light and the heavy ranker share: a Merlin DCN-v2 with sized tables, and how it is trained.

DCN-v2 (deep & cross network) feeds the feature embeddings through ``cross_depth`` explicit
feature-cross layers and then an MLP (``deep_layers``; empty = cross layers only); every target
gets a sigmoid head, so every score lies in [0, 1]. The two rankers differ only in which features
and targets they get and how their training rows are made (``models/light_ranker.py``,
``models/heavy_ranker.py``).

Training stops early on a validation metric (Keras ``EarlyStopping`` with ``restore_best_weights``,
so the saved model is the best epoch, not the last) and reports per-epoch metrics to the callbacks
it is given (the MLflow logger of ``models/tracking.py``).
"""

from __future__ import annotations

import merlin.models.tf as mm
import numpy as np
import tensorflow as tf
from merlin.io import Dataset
from merlin.schema import Schema, Tags

from configs import EmbeddingConfig
from models import merlin_patches  # noqa: F401  (DCN save/load fix, see the module)
from models.embeddings import input_block
from models.heads import head_outputs
from models.single_trace import BuildOptimizerFirst


def build_dcn(
    schema: Schema,
    features: list[str],
    targets: list[str],
    cross_depth: int,
    deep_layers: list[int],
    embeddings: EmbeddingConfig,
) -> mm.Model:
    """A DCN-v2 over ``features`` with one binary head per target."""
    feature_schema = schema.select_by_name(features)
    schema = binary_targets(schema, targets)
    target_schema = schema.select_by_name(targets)
    # One sigmoid head per target, whatever the label column's dtype tags say.
    heads = (
        mm.BinaryOutput(targets[0])
        if len(targets) == 1
        else mm.ParallelBlock(
            {mm.BinaryOutput.get_task_name(t): mm.BinaryOutput(t) for t in targets}, schema=target_schema
        )
    )
    return mm.DCNModel(
        feature_schema + target_schema,
        depth=cross_depth,
        # No deep layers: the cross layers feed the heads directly (Merlin's MLPBlock([]) fails to build).
        deep_block=mm.MLPBlock(list(deep_layers)) if deep_layers else mm.NoOp(),
        input_block=input_block(feature_schema, embeddings),
        prediction_tasks=heads,
    )


def binary_targets(schema: Schema, targets: list[str]) -> Schema:
    """``schema`` with the ``targets`` tagged as binary targets, so the loader yields them as labels
    (a label column added by the dataset pipeline need not carry the tags)."""
    missing = [t for t in targets if t not in schema.column_names]
    if missing:
        raise ValueError(f"target column(s) {missing} are not in the data")
    return Schema(
        [
            schema[c].with_tags([Tags.TARGET, Tags.BINARY_CLASSIFICATION]) if c in targets else schema[c]
            for c in schema.column_names
        ]
    )


def fit(
    model: mm.Model,
    train: Dataset,
    valid: Dataset,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    patience: int,
    monitor: str,
    mode: str,
    callbacks=(),
    verbose: int = 1,
):
    """Compile and fit with early stopping on ``monitor`` of ``valid``; return the Keras history."""
    model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate))
    stop = tf.keras.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=patience, restore_best_weights=True)
    return model.fit(
        mm.Loader(train, batch_size=batch_size, shuffle=True),
        validation_data=mm.Loader(valid, batch_size=batch_size),
        epochs=epochs,
        callbacks=[BuildOptimizerFirst(), stop, *callbacks],
        verbose=verbose,
    )


def predict_heads(
    model: tf.keras.Model, dataset: Dataset, features: list[str], targets: list[str], batch_size: int = 4096
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Scores of every head and the true labels over ``dataset`` (host arrays, in row order)."""
    schema = dataset.schema.select_by_name(features + targets)
    scores: dict[str, list] = {t: [] for t in targets}
    labels: dict[str, list] = {t: [] for t in targets}
    for inputs, y in mm.Loader(dataset, batch_size=batch_size, schema=schema, shuffle=False):
        out = head_outputs(model(inputs, training=False), targets)
        for t in targets:
            scores[t].append(out[t])
            labels[t].append(np.asarray(y[t] if isinstance(y, dict) else y).reshape(-1))
    return ({t: np.concatenate(v) for t, v in scores.items()}, {t: np.concatenate(v) for t, v in labels.items()})


def head_aucs(model, dataset: Dataset, features: list[str], targets: list[str]) -> dict[str, float]:
    """Validation ROC-AUC of every head (NaN where a label has a single class): the Mann-Whitney U of
    the positives' scores against the negatives', over both counts (ties count half)."""
    from scipy.stats import mannwhitneyu

    scores, labels = predict_heads(model, dataset, features, targets)
    out = {}
    for t in targets:
        positive = labels[t].astype(bool)
        if positive.all() or not positive.any():
            out[t] = float("nan")
            continue
        u = mannwhitneyu(scores[t][positive], scores[t][~positive]).statistic
        out[t] = float(u / (positive.sum() * (~positive).sum()))
    return out
