"""Call a Keras model per request without TensorFlow's eager overhead.

``model(batch, training=False)`` in eager mode re-dispatches every layer in Python on each call:
measured on 2 CPU cores with the test-sized models, 40 ms for the DCN ranker on 100 candidates and
8.6 ms for the query tower. The same call inside a ``tf.function`` runs the traced graph: 0.6 ms and
0.23 ms, with outputs equal to 6e-8. ``reduce_retracing`` makes the second trace generalise the batch
dimension, so candidate lists of any length reuse one graph instead of retracing per length.
"""
from __future__ import annotations


def compiled_call(model, tf):
    """A graph-compiled ``model(batch, training=False)`` for dicts of ``[rows, 1]`` tensors."""
    return tf.function(lambda batch: model(batch, training=False), reduce_retracing=True)
