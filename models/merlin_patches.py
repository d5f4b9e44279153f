"""Fixes for Merlin Models 23.12 bugs that change what a saved model computes.

``Cross.get_config`` does not record ``output_x0``. In a DCN with ``depth >= 2`` every cross layer
but the last passes ``(x0, x)`` on; after ``save``/``load_model`` the revived layers forget that, so
the second layer crosses with its own input instead of the original features. Weights reload
exactly, predictions do not (measured: up to 0.03 absolute on P(click) after one epoch). The
ranker's save/load round-trip test guards this. Importing this module applies the fix; it must be
imported before a model is saved (``models.ranker`` does).
"""

from __future__ import annotations

from merlin.models.tf.blocks.cross import Cross

_original_get_config = Cross.get_config


def _get_config_with_output_x0(self):
    config = _original_get_config(self)
    config["output_x0"] = self.output_x0
    return config


if not getattr(Cross.get_config, "_records_output_x0", False):
    _get_config_with_output_x0._records_output_x0 = True
    Cross.get_config = _get_config_with_output_x0
