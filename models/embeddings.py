"""Embedding tables sized from cardinalities, hashed above a cap, and reported in parameters and bytes.

Recommendation models are memory-heavy and compute-light: almost all of a ranker's parameters sit in
its embedding tables, one row per id. So the size of every table is decided here, from the column's
cardinality in the schema (NVTabular's Categorify records it):

* width: ``multiplier * cardinality ** 0.25`` clipped to ``[min_dim, max_dim]`` - tables of a few
  categories get a few dimensions, large id spaces more, up to the cap;
* rows: a column with more than ``max_rows`` ids is *hashed*: ids are taken modulo ``max_rows`` before
  the lookup (``HashIds``), so colliding ids share a row instead of the table growing without bound.
  Its width follows the table's ``max_rows`` rows, not the ids hashed into them (with the defaults,
  36 for any column above 100,000 ids).

``describe_tables`` lists every table of a built model (rows, dim, parameters, bytes) and
``log_tables`` prints it: the training log shows where the memory goes.
"""

from __future__ import annotations

import logging

import merlin.models.tf as mm
import tensorflow as tf
from merlin.schema import Schema, Tags

from configs import EmbeddingConfig

log = logging.getLogger(__name__)


def embedding_dim(cardinality: int, config: EmbeddingConfig) -> int:
    """Width of a table with ``cardinality`` rows (fourth-root rule, clipped)."""
    dim = int(round(config.multiplier * float(cardinality) ** 0.25))
    return max(config.min_dim, min(config.max_dim, dim))


def cardinality(col) -> int:
    domain = col.int_domain
    if domain is None:
        raise ValueError(f"categorical column {col.name!r} has no integer domain in the schema (run Categorify)")
    return int(domain.max) + 1


def cap_schema(schema: Schema, config: EmbeddingConfig) -> tuple[Schema, dict[str, int]]:
    """Return ``schema`` with every over-cap categorical domain shrunk to ``max_rows``, and the caps.

    The returned mapping ``{column: buckets}`` tells ``HashIds`` which columns to fold.
    """
    buckets: dict[str, int] = {}
    cols = []
    for col in schema:
        if Tags.CATEGORICAL in col.tags and cardinality(col) > config.max_rows:
            buckets[col.name] = config.max_rows
            domain = dict(col.properties.get("domain", {}))
            domain.update({"min": 0, "max": config.max_rows - 1, "name": col.int_domain.name or col.name})
            col = col.with_properties({**col.properties, "domain": domain})
        cols.append(col)
    return Schema(cols), buckets


@tf.keras.utils.register_keras_serializable(package="merlin_funnel")
class HashIds(tf.keras.layers.Layer):
    """Folds the ids of the named columns into ``buckets`` rows (``id mod buckets``) before the lookup.

    Registered with Keras so a saved model reloads with the same folding.
    """

    def __init__(self, buckets: dict[str, int], **kwargs):
        super().__init__(**kwargs)
        self.buckets = {str(k): int(v) for k, v in buckets.items()}

    def call(self, inputs):
        out = dict(inputs)
        for name, n in self.buckets.items():
            if name in out:
                out[name] = tf.math.floormod(out[name], tf.cast(n, out[name].dtype))
        return out

    def get_config(self):
        return {**super().get_config(), "buckets": self.buckets}


def input_block(schema: Schema, config: EmbeddingConfig) -> mm.Block:
    """Merlin ``InputBlockV2`` with sized (and, above the cap, hashed) tables for ``schema``."""
    capped, buckets = cap_schema(schema, config)
    categorical = capped.select_by_tag(Tags.CATEGORICAL)
    dims = {col.name: embedding_dim(cardinality(col), config) for col in categorical}
    embeddings = mm.Embeddings(categorical, dim=dims, pre=HashIds(buckets) if buckets else None)
    return mm.InputBlockV2(capped, categorical=embeddings)


def describe_tables(model: tf.keras.Model) -> list[dict]:
    """Rows, dim, parameters and bytes of every embedding table of a built model."""
    from merlin.models.tf.inputs.embedding import EmbeddingTable

    tables = []
    for layer in model._flatten_layers(include_self=False, recursive=True):  # every nested Keras layer
        if isinstance(layer, EmbeddingTable) and getattr(layer, "table", None) is not None:
            weights = layer.table.embeddings  # the table is a Keras Embedding layer
            rows, dim = (int(x) for x in weights.shape)
            tables.append(
                {
                    "table": layer.name,
                    "rows": rows,
                    "dim": dim,
                    "params": rows * dim,
                    "bytes": rows * dim * weights.dtype.size,
                }
            )
    return sorted(tables, key=lambda t: t["table"])


def log_tables(model: tf.keras.Model, title: str) -> dict:
    """Log the table report of ``model``; return totals for the manifest."""
    tables = describe_tables(model)
    total = int(sum(w.shape.num_elements() for w in model.weights))
    emb = sum(t["params"] for t in tables)
    log.info(
        "%s: %d parameters, %d (%.0f%%) in %d embedding tables",
        title,
        total,
        emb,
        100.0 * emb / max(total, 1),
        len(tables),
    )
    for t in tables:
        log.info(
            "  %-16s %8d rows x %3d dim = %9d params, %10d bytes",
            t["table"],
            t["rows"],
            t["dim"],
            t["params"],
            t["bytes"],
        )
    return {"total_params": total, "embedding_params": emb, "tables": tables}
