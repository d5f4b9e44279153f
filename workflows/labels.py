"""Training labels, one per signal, because no single signal is "relevance":

    click           the user clicked the impression (rewards clickbait on its own)
    watched         watched >= ``watch_threshold`` (75%) of the duration (rewards short items:
                    15 s of a 20 s clip counts, 30 min of a 60 min tutorial does not)
    duration_watch  clicked and watched a fraction at least the ``duration_watch_quantile`` of
                    clicked training events in the same duration bucket: each bucket has the same
                    share of positives, so length no longer decides the label
    like, share     explicit positive feedback

Those are the raw schema's labels. For a dataset spec (``workflows/spec.py``) every binary signal is a
label under its own name, a continuous signal with a ``threshold`` becomes ``value >= threshold``,
and ``watched`` / ``duration_watch`` exist only when the spec has a watch-time signal and item
durations.

``DurationAwareWatch`` is an NVTabular ``StatOperator``: it learns its per-bucket thresholds when the
workflow is fitted on training data and is saved with the workflow.
"""

from __future__ import annotations

import math

import dask
import nvtabular as nvt
from merlin.dag.ops.stat_operator import StatOperator
from merlin.dag.selector import ColumnSelector
from merlin.schema import Tags

from configs import WorkflowConfig
from workflows.spec import RAW_LAYOUT, Layout

LABELS = ["click", "watched", "duration_watch", "like", "share"]
LABEL_INPUTS = ["click", "watch_seconds", "duration_seconds", "like", "share"]


def _bucket(duration, edges):
    """Index of the duration bucket (0 .. len(edges)) using only arithmetic both cudf and pandas have."""
    out = duration * 0
    for edge in edges:
        out = out + (duration >= edge).astype("int64")
    return out.astype("int64")


def _fraction(df):
    return df["watch_seconds"] / df["duration_seconds"].clip(lower=1)


class _BinaryLabel:
    """One int64 label column, named ``self.name``, computed from the selected input columns."""

    def column_mapping(self, col_selector):
        return {self.name: list(col_selector.names)}

    @property
    def output_dtype(self):
        return "int64"


class DurationAwareWatch(_BinaryLabel, StatOperator):
    """``duration_watch`` from ``click, watch_seconds, duration_seconds`` with learned bucket thresholds."""

    def __init__(self, bucket_edges=(60.0, 300.0, 1200.0), quantile: float = 0.5, name: str = "duration_watch"):
        super().__init__()
        self.bucket_edges = [float(e) for e in bucket_edges]
        self.quantile = float(quantile)
        self.name = name
        self.thresholds: list[float] = []

    def fit(self, col_selector: ColumnSelector, ddf):
        clicked = ddf[ddf["click"] > 0]
        frac = _fraction(clicked)
        bucket = _bucket(clicked["duration_seconds"], self.bucket_edges)
        per_bucket = [frac[bucket == b].quantile(self.quantile) for b in range(len(self.bucket_edges) + 1)]
        # One delayed object: the distributed executor computes each operator's stats as one future.
        return dask.delayed(list)(per_bucket + [frac.quantile(self.quantile)])

    def fit_finalize(self, stats):
        values = [float(s) for s in stats]
        overall = values[-1] if not math.isnan(values[-1]) else 1.0
        # A bucket with no clicked training event uses the overall quantile.
        self.thresholds = [overall if math.isnan(v) else v for v in values[:-1]]

    def clear(self):
        self.thresholds = []

    def threshold_for(self, duration_seconds: float) -> float:
        b = sum(duration_seconds >= e for e in self.bucket_edges)
        return self.thresholds[b]

    def transform(self, col_selector: ColumnSelector, df):
        frac = _fraction(df)
        bucket = _bucket(df["duration_seconds"], self.bucket_edges)
        threshold = frac * 0.0
        for b, value in enumerate(self.thresholds):
            threshold = threshold + (bucket == b).astype("float64") * value
        out = type(df)()
        out[self.name] = ((df["click"] > 0) & (frac >= threshold)).astype("int64")
        return out

    transform.__doc__ = "Label rows: clicked and watch fraction >= the bucket's learned threshold."


class WatchedAtLeast(_BinaryLabel, nvt.ops.Operator):
    """``watched``: watch_seconds >= ``threshold`` x duration (a plain, fixed-threshold label)."""

    def __init__(self, threshold: float = 0.75, name: str = "watched"):
        super().__init__()
        self.threshold, self.name = float(threshold), name

    def transform(self, col_selector: ColumnSelector, df):
        out = type(df)()
        out[self.name] = (df["watch_seconds"] >= self.threshold * df["duration_seconds"]).astype("int64")
        return out


class AtLeastThreshold(_BinaryLabel, nvt.ops.Operator):
    """A continuous signal's binary label, ``value >= threshold``, under the signal's own name."""

    def __init__(self, threshold: float, name: str):
        super().__init__()
        self.threshold, self.name = float(threshold), name

    def transform(self, col_selector: ColumnSelector, df):
        out = type(df)()
        out[self.name] = (df[self.name] >= self.threshold).astype("int64")
        return out


def label_graph(config: WorkflowConfig, layout: Layout = RAW_LAYOUT):
    """The label columns, tagged TARGET + BINARY_CLASSIFICATION so models find them by tag.

    ``layout`` (``workflows/spec.py``) says which exist: every binary signal as it is; ``watched`` and
    ``duration_watch`` only with a watch-time signal and item durations; a continuous signal with a
    threshold as its 0/1 label. The default is the raw schema's five labels.
    """
    binary = list(layout.binary_labels)
    graph = binary[:1]
    if layout.watch_labels:
        watched = ["watch_seconds", "duration_seconds"] >> WatchedAtLeast(config.watch_threshold)
        duration_watch = ["click", "watch_seconds", "duration_seconds"] >> DurationAwareWatch(
            config.labels.duration_buckets, config.labels.duration_watch_quantile
        )
        graph = graph + watched + duration_watch
    graph = graph + binary[1:]
    for name, threshold in layout.thresholds:
        graph = graph + ([name] >> AtLeastThreshold(threshold, name))
    return graph >> nvt.ops.AddTags([Tags.BINARY_CLASSIFICATION, Tags.TARGET])
