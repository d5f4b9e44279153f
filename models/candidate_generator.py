"""The candidate generator: a Merlin Models two-tower retrieval model.

The query tower embeds a user from the user features, the item tower embeds an item from the item
features; the score of a pair is the dot product. It is trained on positive interactions (clicks)
with in-batch negatives: every other item in the batch is a negative for a row. Popular items appear
in more batches, so they are over-penalised as negatives; the logQ correction (``logq_correction``)
subtracts ``log(item frequency)`` from the logits during training to undo that.

Served as two pieces that must come from the same training run: the query tower (a Keras model) and
the item embeddings that the ANN index is built from.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import tensorflow as tf
import merlin.models.tf as mm
from merlin.io import Dataset
from merlin.models.tf.outputs.base import DotProduct
from merlin.models.tf.transforms.bias import PopularityLogitsCorrection
from merlin.schema import Schema, Tags

from configs import CandidateGeneratorConfig, EmbeddingConfig


def tower_schema(schema: Schema) -> Schema:
    """The features the two towers see: everything tagged USER or ITEM (no labels)."""
    return schema.select_by_tag([Tags.USER, Tags.ITEM])


def item_frequencies(schema: Schema, positive_rows: Dataset | None = None) -> np.ndarray:
    """Training frequency of every encoded item id (0 for the reserved pad/OOV/null ids).

    The logQ correction needs how often an item is a *positive* (that is how often it turns up as an
    in-batch negative). Without ``positive_rows`` the counts Categorify recorded next to its
    vocabulary are used (no pass over the data), which count every training row: right when the
    rows are impressions, but flattened when sampled negatives were added to them, so callers that
    have the positive rows pass them.
    """
    col = schema.select_by_tag(Tags.ITEM_ID).first
    cardinality = int(col.properties["embedding_sizes"]["cardinality"])
    freqs = np.zeros(cardinality, dtype=np.float32)
    if positive_rows is None:
        vocab = pd.read_parquet(col.properties["cat_path"])
        freqs[vocab.index.values] = vocab[f"{col.name}_size"].values
    else:
        counts = positive_rows.to_ddf()[col.name].value_counts().compute()
        freqs[_host(counts.index)] = _host(counts).astype(np.float32)
    # Reserved ids never occur as positives; a tiny count keeps log() finite.
    freqs[freqs == 0] = 1.0
    return freqs


def _host(values) -> np.ndarray:
    """A host numpy copy of a (small) pandas or cudf series/index."""
    return values.to_numpy() if not hasattr(values, "values_host") else values.values_host


def build_candidate_generator(
    schema: Schema, config: CandidateGeneratorConfig, embeddings: EmbeddingConfig | None = None,
    positive_rows: Dataset | None = None,
) -> mm.RetrievalModelV2:
    """A two-tower model whose towers end in ``embedding_dim`` units, L2-normalised.

    With ``embeddings`` the towers' tables are sized (and hashed above the cap) by
    ``models/embeddings.py``; without, Merlin infers the sizes. ``positive_rows`` (the training
    positives) give the logQ correction its item frequencies (``item_frequencies``).
    """
    towers = tower_schema(schema)
    layers = list(config.tower_layers)
    if layers[-1] != config.embedding_dim:
        layers.append(config.embedding_dim)

    def tower(tag: Tags) -> mm.Encoder:
        inputs = towers.select_by_tag(tag)
        if embeddings is not None:
            from models.embeddings import input_block

            inputs = input_block(inputs, embeddings)
        return mm.Encoder(
            inputs,
            mm.MLPBlock(layers, no_activation_last_layer=True),
            post=mm.L2Norm(),
        )

    query_tower, item_tower = tower(Tags.USER), tower(Tags.ITEM)
    item_id_schema = towers.select_by_tag(Tags.ITEM_ID)
    temperature = 0.1  # scores of L2-normalised towers live in [-1, 1]: sharpen them
    post = None
    if config.logq_correction:
        # Merlin subtracts reg_factor * log(q) *before* dividing by the temperature, so reg_factor =
        # temperature makes the trained logit exactly score / T - log(q); with 1.0 the correction
        # was 1/T = 10x too strong (README, "Offline evaluation").
        post = PopularityLogitsCorrection(item_frequencies(schema, positive_rows), schema=item_id_schema,
                                          reg_factor=temperature * config.logq_strength)
    output = mm.ContrastiveOutput(
        to_call=DotProduct(),
        negative_samplers="in-batch",
        schema=item_id_schema,
        post=post,
        store_negative_ids=config.logq_correction,  # the logQ correction needs them
        logits_temperature=temperature,
    )
    return mm.TwoTowerModelV2(query_tower, item_tower, outputs=output)


def positives(dataset: Dataset, label: str = "click") -> Dataset:
    """Rows with a positive ``label``, restricted to the tower features."""
    ddf = dataset.to_ddf()
    ddf = ddf[ddf[label] > 0]
    schema = tower_schema(dataset.schema)
    return Dataset(ddf[schema.column_names], schema=schema)


def train_candidate_generator(
    train: Dataset,
    valid: Dataset,
    config: CandidateGeneratorConfig,
    seed: int = 42,
    verbose: int = 1,
    embeddings: EmbeddingConfig | None = None,
    patience: int | None = None,
    callbacks=(),
) -> tuple[mm.RetrievalModelV2, dict[str, float]]:
    """Train on the positive rows of ``train``; return the model and its validation metrics.

    With ``patience``, training stops once the validation recall@10 has not improved for that many
    epochs and the best epoch's weights are restored.
    """
    tf.keras.utils.set_random_seed(seed)
    train_pos, valid_pos = positives(train), positives(valid)
    model = build_candidate_generator(train.schema, config, embeddings, train_pos)
    model.compile(
        optimizer=tf.keras.optimizers.Adam(config.learning_rate),
        metrics=[mm.RecallAt(10), mm.NDCGAt(10)],
    )
    callbacks = list(callbacks)
    if patience is not None:
        callbacks.insert(0, tf.keras.callbacks.EarlyStopping(
            monitor="val_recall_at_10", mode="max", patience=patience, restore_best_weights=True
        ))
    history = model.fit(
        mm.Loader(train_pos, batch_size=config.batch_size, shuffle=True),
        validation_data=mm.Loader(valid_pos, batch_size=config.batch_size) if patience is not None else None,
        epochs=config.epochs,
        callbacks=callbacks,
        verbose=verbose,
    )
    metrics = model.evaluate(
        mm.Loader(valid_pos, batch_size=config.batch_size), return_dict=True, verbose=0
    )
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics["epochs_run"] = len(history.history.get("loss", []))
    return model, metrics


def item_embeddings(model: mm.RetrievalModelV2, item_features: Dataset, batch_size: int = 1024):
    """Embed every item of ``item_features`` with the item tower.

    Returns ``(encoded_item_ids, embeddings)`` as host numpy arrays (faiss works on host memory).
    """
    emb = model.candidate_embeddings(item_features, index=Tags.ITEM_ID, batch_size=batch_size)
    df = emb.to_ddf().compute()
    if hasattr(df, "to_pandas"):  # cudf on GPU
        df = df.to_pandas()
    ids = df.index.values.astype(np.int64)
    vectors = df.values.astype(np.float32)
    return ids, np.ascontiguousarray(vectors)
