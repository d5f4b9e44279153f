"""Fixes for Merlin Models 23.12 bugs that change what a saved model computes.

``Cross.get_config`` does not record ``output_x0``. In a DCN with ``depth >= 2`` every cross layer
but the last passes ``(x0, x)`` on; after ``save``/``load_model`` the revived layers forget that, so
the second layer crosses with its own input instead of the original features. Weights reload
exactly, predictions do not (measured: up to 0.03 absolute on P(click) after one epoch). The
ranker's save/load round-trip test guards this. Importing this module applies the fix; it must be
imported before a model is saved (``models.ranker`` does).

``Model.save`` and ``Encoder.save`` then re-load the whole SavedModel with Keras (every layer revived)
only to read the output names and dtypes of its serving signature for Merlin's metadata: measured
36 s of a 195 s ``train_all`` on the test world. The signature's names, dtypes and shapes are in
``saved_model.pb`` itself: read from there, the metadata written is the same.
"""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf
from merlin.models.tf.blocks.cross import Cross
from merlin.models.tf.core import encoder as merlin_encoder
from merlin.models.tf.models import base as merlin_base
from merlin.schema import ColumnSchema, Schema

# Merlin's own, also when this module is applied again (a reload would otherwise make the patch call itself).
_original_get_config = getattr(Cross.get_config, "merlin_original", Cross.get_config)


def _get_config_with_output_x0(self):
    config = _original_get_config(self)
    config["output_x0"] = self.output_x0
    return config


if not getattr(Cross.get_config, "_records_output_x0", False):
    _get_config_with_output_x0._records_output_x0 = True
    _get_config_with_output_x0.merlin_original = _original_get_config
    Cross.get_config = _get_config_with_output_x0


def output_schema_from_signature(export_path) -> Schema:
    """Merlin's ``get_output_schema`` read from the SavedModel's ``serving_default`` signature in
    ``saved_model.pb`` (names, dtypes, shapes), without loading the model: same result."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((Path(export_path) / "saved_model.pb").read_bytes())
    outputs = saved.meta_graphs[0].signature_def["serving_default"].outputs
    output_schema = Schema()
    for name in sorted(outputs):
        info = outputs[name]
        dims = [d.size for d in info.tensor_shape.dim]
        extra = {"dims": (None, dims[1])} if len(dims) > 1 and dims[1] > 1 else {}
        output_schema.column_schemas[name] = ColumnSchema(
            name, dtype=tf.dtypes.as_dtype(info.dtype).as_numpy_dtype, **extra
        )
    return output_schema


# Merlin's own (a full Keras reload), kept for the test that compares the two.
MERLIN_GET_OUTPUT_SCHEMA = getattr(merlin_base.get_output_schema, "merlin_original", merlin_base.get_output_schema)
output_schema_from_signature.merlin_original = MERLIN_GET_OUTPUT_SCHEMA
merlin_base.get_output_schema = output_schema_from_signature
merlin_encoder.get_output_schema = output_schema_from_signature
