"""Fixes for two Merlin bugs in fitting a workflow. Importing this module applies them once.

1. merlin-core 23.08 ``DaskExecutor.fit_phase`` computes the statistics of a fit phase with
   ``[r.result() for r in client.compute(stats) if r is not None]`` and then zips the results with
   the phase's nodes. A ``Subgraph`` node (our ``user_features`` / ``item_features``) fits itself and
   contributes ``None``, so with a client every statistic after it is handed to the wrong operator
   (seen as ``DurationAwareWatch`` receiving Categorify's vocabulary). Without a client the
   synchronous path keeps the ``None`` entries and stays aligned. The patch keeps the alignment in
   both.
2. NVTabular 23.08 ``Normalize`` computes a column's variance as ``sum(x^2) - sum(x)^2 / n``, which
   cancels to a tiny negative number for a constant column (MovieLens' made-up film duration): the
   saved std became NaN, with a RuntimeWarning from ``sqrt``, where it is 0. The patch clips the
   variance at 0; ``Normalize`` then subtracts the mean only, as it does for any std of 0.
"""

from __future__ import annotations

import dask
import numpy as np
from merlin.core.utils import global_dask_client
from merlin.dag import ColumnSelector
from merlin.dag.executors import DaskExecutor
from merlin.io import Dataset
from nvtabular.ops import moments


def _fit_phase(self, dataset, nodes, strict=False):
    stats, fitted_nodes = [], []
    ddf = dataset.to_ddf()
    for node in nodes:
        if not hasattr(node.op, "fit"):
            continue
        addl_input_cols = set()
        if node.parents:
            upstream = sum([p.output_columns for p in node.parents_with_dependencies], ColumnSelector())
            addl_input_cols = set(node.input_columns.names) - set(upstream.names)
        transformed_ddf = self.transform(
            ddf,
            node.parents_with_dependencies,
            additional_columns=addl_input_cols,
            capture_dtypes=True,
            strict=strict,
        )
        if node.op.is_subgraph:
            stats.append(node.op.fit(node.input_columns, Dataset(ddf)))
        else:
            stats.append(node.op.fit(node.input_columns, transformed_ddf))
        fitted_nodes.append(node)

    client = global_dask_client()
    if client:
        # Compute only the real statistics, then put each result back at its node's position.
        positions = [i for i, s in enumerate(stats) if s is not None]
        futures = client.compute([stats[i] for i in positions])
        results = [None] * len(stats)
        for i, future in zip(positions, futures):
            results[i] = future.result()
    else:
        results = dask.compute(stats, scheduler="synchronous")[0]
    for computed, node in zip(results, fitted_nodes):
        node.op.fit_finalize(computed)
        node.op.fitted = True


if getattr(DaskExecutor.fit_phase, "__name__", "") != "_fit_phase":
    DaskExecutor.fit_phase = _fit_phase


# NVTabular's own, also when this module is applied again (a reload would otherwise make the patch call itself).
_finalize_moments_unclipped = getattr(moments._finalize_moments, "merlin_original", moments._finalize_moments)


def _finalize_moments(inp, ddof=1):
    with np.errstate(invalid="ignore"):  # sqrt of the cancelled negative variance, replaced below
        out = _finalize_moments_unclipped(inp, ddof)
    negative = out["var"] < 0
    out.loc[negative, "var"] = 0.0
    out.loc[negative, "std"] = 0.0
    return out


_finalize_moments.merlin_original = _finalize_moments_unclipped
moments._finalize_moments = _finalize_moments
