"""The candidate generator: a Merlin Models two-tower retrieval model.

The query tower embeds a user from the user features, the item tower embeds an item from the item
features; the score of a pair is the dot product. It is trained on positive interactions (clicks)
with in-batch negatives: every other item in the batch is a negative for a row. Popular items appear
in more batches, so they are over-penalised as negatives, and items that are rarely positives are
almost never negatives. Two mitigations, measured side by side by the offline evaluation:

* ``logq_correction`` subtracts ``log q(item)``, the item's chance of being a sampled negative, from
  the logits during training (the sampled-softmax correction, Yi et al. 2019);
* ``sampled_negatives`` > 0 adds that many catalog items drawn uniformly per batch, embedded by the
  item tower, to the in-batch negatives (mixed negative sampling, Yi et al. 2020). With both on,
  ``q`` is the mixture's: ``batch_size * p(item) + sampled_negatives / catalog size``.

Served as two pieces that must come from the same training run: the query tower (a Keras model) and
the item embeddings that the ANN index is built from.
"""

from __future__ import annotations

import copy
import logging

import merlin.models.tf as mm
import numpy as np
import tensorflow as tf
from merlin.io import Dataset
from merlin.models.tf.outputs.base import DotProduct
from merlin.models.tf.outputs.sampling.base import Candidate, CandidateSampler
from merlin.models.tf.transforms.bias import PopularityLogitsCorrection
from merlin.schema import Schema, Tags

from configs import CandidateGeneratorConfig, EmbeddingConfig
from models import merlin_patches  # noqa: F401  (faster, fixed Merlin save; see the module)
from models.columns import to_host
from models.single_trace import BuildOptimizerFirst
from workflows.activity import ACTIVITY_TAG
from workflows.local_parquet import read_parquet

log = logging.getLogger(__name__)

TOP_K = 10  # the in-batch validation metrics' cutoff (recall@10, NDCG@10; early stopping watches recall)


def tower_schema(schema: Schema) -> Schema:
    """The features the two towers see: everything tagged USER or ITEM (no labels), except the
    windowed activity counts (``workflows/activity.py``): retrieval embeds lasting taste, and how
    busy the user was in the last hour is the heavy ranker's to weigh."""
    return schema.select_by_tag([Tags.USER, Tags.ITEM]).excluding_by_tag(ACTIVITY_TAG)


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
        vocab = read_parquet(col.properties["cat_path"])
        freqs[vocab.index.values] = vocab[f"{col.name}_size"].values
    else:
        counts = positive_rows.to_ddf()[col.name].value_counts().compute()
        freqs[to_host(counts.index)] = to_host(counts).astype(np.float32)
    return freqs


class UniformItemSampler(CandidateSampler):
    """Negatives drawn uniformly from the catalog, embedded by the item tower (mixed negative sampling).

    Merlin's two-tower samples in-batch only: a sampled id needs its item features to be embedded.
    This sampler holds the catalog's encoded item features and runs the model's own item tower on
    ``num_samples`` rows drawn per batch, so the gradients reach the item tower through them too.
    """

    def __init__(self, catalog: dict[str, np.ndarray], item_tower, num_samples: int, id_column: str, **kwargs):
        super().__init__(max_num_samples=num_samples, **kwargs)
        self.catalog = {name: tf.constant(values) for name, values in catalog.items()}
        self.catalog_size = int(len(catalog[id_column]))
        self.item_tower, self.id_column = item_tower, id_column

    def add(self, items: Candidate) -> None:  # nothing to remember between batches
        pass

    def sample(self) -> Candidate:
        raise NotImplementedError("call() samples: it needs the positives' id shape")

    def call(self, items: Candidate, features=None, targets=None, training=False, testing=False) -> Candidate:
        rows = tf.random.uniform([self.max_num_samples], 0, self.catalog_size, dtype=tf.int64)
        sampled = {name: tf.gather(values, rows) for name, values in self.catalog.items()}
        ids = sampled[self.id_column]
        # Same rank as the positives' ids: Merlin concatenates them with the in-batch ones.
        ids = tf.reshape(ids, tf.concat([[-1], tf.shape(items.id)[1:]], axis=0))
        return Candidate(id=ids, metadata={}).with_embedding(self.item_tower(sampled, training=training))


def catalog_features(schema: Schema, items) -> dict[str, np.ndarray]:
    """The item-tower columns of the encoded item table ``items`` (pandas or cudf) as host arrays."""
    return {name: to_host(items[name]) for name in tower_schema(schema).select_by_tag(Tags.ITEM).column_names}


def build_candidate_generator(
    schema: Schema,
    config: CandidateGeneratorConfig,
    embeddings: EmbeddingConfig | None = None,
    positive_rows: Dataset | None = None,
    catalog: dict[str, np.ndarray] | None = None,
) -> mm.RetrievalModelV2:
    """A two-tower model whose towers end in ``embedding_dim`` units, L2-normalised.

    With ``embeddings`` the towers' tables are sized (and hashed above the cap) by
    ``models/embeddings.py``; without, Merlin infers the sizes. ``positive_rows`` (the training
    positives) give the logQ correction its item frequencies (``item_frequencies``); ``catalog``
    (``catalog_features``) is what ``sampled_negatives`` are drawn from.
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
    samplers = ["in-batch"]
    if config.sampled_negatives:
        if catalog is None:
            raise ValueError("candidate_generator.sampled_negatives needs the catalog's item features")
        samplers.append(UniformItemSampler(catalog, item_tower, config.sampled_negatives, item_id_schema.first.name))
    post = None
    if config.logq_correction:
        q = item_frequencies(schema, positive_rows)
        if config.sampled_negatives:  # expected times an item is a negative, per batch
            catalog_ids = np.asarray(catalog[item_id_schema.first.name], dtype=np.int64)
            q = config.batch_size * q / q.sum()
            q[catalog_ids] += config.sampled_negatives / len(catalog_ids)
        # Ids that are never candidates (the reserved ones; in-batch only, items without positives) are
        # never looked up: a floor keeps log() finite. Set after the mixture: a count of 1 for each such
        # id before it diluted the in-batch share and gave an unclicked item a share it never has.
        q[q == 0] = 1.0
        # Merlin subtracts reg_factor * log(q) *before* dividing by the temperature, so reg_factor =
        # temperature makes the trained logit exactly score / T - log(q); with 1.0 the correction
        # was 1/T = 10x too strong (README, "Offline evaluation").
        post = PopularityLogitsCorrection(q, schema=item_id_schema, reg_factor=temperature * config.logq_strength)
    output = mm.ContrastiveOutput(
        to_call=DotProduct(),
        negative_samplers=samplers,
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


def loader(dataset: Dataset, config: CandidateGeneratorConfig) -> mm.Loader:
    """Batches of ``config.batch_size`` positives. A last batch of fewer than ``TOP_K`` rows is
    dropped where the in-batch metrics would need more predictions than it has: a part of
    512 n + 5 clicks failed the whole training run ("The TopkMetric recall_at_10 cutoff (10) cannot be
    bigger than the number of predictions per example"). Shuffled (``mm.Loader``'s default, kept for
    validation too: its in-batch recall depends on the batches), another remainder goes each epoch."""
    rest = dataset.num_rows % config.batch_size
    drop = dataset.num_rows > config.batch_size and 0 < rest < TOP_K and config.sampled_negatives < TOP_K
    return mm.Loader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=drop)


def train_candidate_generator(
    train: Dataset,
    valid: Dataset,
    config: CandidateGeneratorConfig,
    seed: int = 42,
    verbose: int = 1,
    embeddings: EmbeddingConfig | None = None,
    patience: int | None = None,
    callbacks=(),
    catalog=None,
) -> tuple[mm.RetrievalModelV2, dict[str, float]]:
    """Train on the positive rows of ``train``; return the model and its validation metrics.

    With ``patience``, training stops once the validation recall@10 has not improved for that many
    epochs and the best epoch's weights are restored. ``catalog`` (the encoded item table, pandas or
    cudf) is needed for ``config.sampled_negatives``.
    """
    tf.keras.utils.set_random_seed(seed)
    train_pos, valid_pos = positives(train), positives(valid)
    # Merlin's Loader waits forever for the first batch of a dataset without rows: a training or
    # validation part without a single click hung the training run instead of failing or going on.
    if not train_pos.num_rows:
        raise ValueError("the candidate generator trains on clicks, and the training part has none")
    # The in-batch metrics need TOP_K predictions per example, and with in-batch negatives only a
    # batch of n rows has n: a part of fewer clicks cannot be measured at all.
    if train_pos.num_rows < TOP_K and config.sampled_negatives < TOP_K:
        raise ValueError(
            f"the candidate generator needs at least {TOP_K} clicks to train (its recall@{TOP_K} over "
            f"in-batch negatives), the training part has {train_pos.num_rows}"
        )
    validate = bool(valid_pos.num_rows) and (valid_pos.num_rows >= TOP_K or config.sampled_negatives >= TOP_K)
    if not validate:
        have = f"{valid_pos.num_rows} clicks (recall@{TOP_K} needs {TOP_K})" if valid_pos.num_rows else "no clicks"
        log.warning("the validation part has %s: the candidate generator trains without validation", have)
        patience = None
    features = catalog_features(train.schema, catalog) if catalog is not None else None
    model = build_candidate_generator(train.schema, config, embeddings, train_pos, features)
    model.compile(
        optimizer=tf.keras.optimizers.Adam(config.learning_rate),
        metrics=[mm.RecallAt(TOP_K), mm.NDCGAt(TOP_K)],
    )
    callbacks = [BuildOptimizerFirst(), *callbacks]
    if patience is not None:
        callbacks.insert(
            1,
            tf.keras.callbacks.EarlyStopping(
                monitor=f"val_recall_at_{TOP_K}", mode="max", patience=patience, restore_best_weights=True
            ),
        )
    history = model.fit(
        loader(train_pos, config),
        validation_data=loader(valid_pos, config) if patience is not None else None,
        epochs=config.epochs,
        callbacks=callbacks,
        verbose=verbose,
    )
    metrics = {}
    if validate:
        metrics = model.evaluate(loader(valid_pos, config), return_dict=True, verbose=0)
        metrics = {k: float(v) for k, v in metrics.items()}
    metrics["epochs_run"] = len(history.history.get("loss", []))
    return model, metrics


def item_embeddings(model: mm.RetrievalModelV2, item_features: Dataset, batch_size: int = 1024):
    """Embed every item of ``item_features`` with the item tower.

    Returns ``(encoded_item_ids, embeddings)`` as host numpy arrays (faiss works on host memory).
    Calls the item tower batch by batch; Merlin's ``candidate_embeddings`` saves and reloads the
    whole model first so that dask workers could run it (measured 19 s of a 193 s ``train_all``).
    """
    schema = model.candidate_encoder.schema  # the item tower's features, tagged as in training
    item_id = schema.select_by_tag(Tags.ITEM_ID).column_names[0]
    encode = tf.function(lambda batch: model.candidate_encoder(batch, training=False), reduce_retracing=True)
    ids, vectors = [], []
    for batch, _ in mm.Loader(item_features, batch_size=batch_size, shuffle=False, schema=schema):
        ids.append(to_host(batch[item_id]).reshape(-1))
        vectors.append(to_host(encode(batch)))
    return np.concatenate(ids).astype(np.int64), np.ascontiguousarray(np.concatenate(vectors), dtype=np.float32)


def query_embeddings(
    model: mm.RetrievalModelV2, rows: Dataset, max_rows: int, batch_size: int = 1024, seed: int = 0
) -> np.ndarray:
    """The query tower's embeddings of ``max_rows`` rows drawn at random (seeded) from ``rows`` (e.g.
    the validation part: users as serving will ask, features as of their events), ``[n, dim]``
    float32 on the host: the queries the ANN index's recall is measured on (``models/item_index.py``).
    Drawn from every partition, not the first rows: a part ordered by user would give few users."""
    schema = model.query_encoder.schema  # the query tower's features, tagged as in training
    encode = tf.function(lambda batch: model.query_encoder(batch, training=False), reduce_retracing=True)
    total = rows.num_rows
    if total > max_rows:
        # A Bernoulli sample a few standard deviations above max_rows, so that it almost never falls
        # short; the exact number is drawn from it below.
        frac = min(1.0, (max_rows + 4 * np.sqrt(max_rows) + 10) / total)
        rows = Dataset(rows.to_ddf().sample(frac=frac, random_state=seed), schema=rows.schema)
    else:
        # A copy: Merlin's Loader sets the schema it is given on the dataset itself, and ``rows`` (the
        # validation part) still has to train the rankers with all of its columns.
        rows = copy.copy(rows)
    loader = mm.Loader(rows, batch_size=batch_size, shuffle=False, schema=schema)
    vectors = [to_host(encode(batch)) for batch, _ in loader]
    if not vectors:
        return np.zeros((0, 0), dtype=np.float32)
    vectors = np.concatenate(vectors)
    if len(vectors) > max_rows:
        vectors = vectors[np.sort(np.random.default_rng(seed).choice(len(vectors), max_rows, replace=False))]
    return np.ascontiguousarray(vectors, dtype=np.float32)
