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

import nvtabular as nvt
from merlin.dag.ops.stat_operator import StatOperator
from merlin.dag.selector import ColumnSelector
from merlin.schema import Tags

from configs import WorkflowConfig
from workflows.spec import RAW_LAYOUT, Layout

LABELS = ["click", "watched", "duration_watch", "like", "share"]
LABEL_INPUTS = ["click", "watch_seconds", "duration_seconds", "like", "share"]


def _bucket(duration, edges):
    """Index of the duration bucket (0 .. len(edges)) using only arithmetic both cudf and pandas have.
    A missing duration (an item the item table lacks, kept under ``checks.missing_items: warn``) is in
    bucket 0; its watch fraction is missing, so neither watch label is positive."""
    duration = duration.fillna(0)
    out = duration * 0
    for edge in edges:
        out = out + (duration >= edge).astype("int64")
    return out.astype("int64")


def _fraction(df):
    return df["watch_seconds"] / df["duration_seconds"].clip(lower=1)


def _weighted_quantile(counts, q: float) -> float:
    """The ``q`` quantile of the values a count series (pandas, indexed by value) holds, as pandas'
    ``Series.quantile`` gives it on the values themselves (linear between ranks); NaN when empty."""
    values = counts.index.get_level_values(-1).to_numpy(dtype="float64")
    order = values.argsort()
    values, cumulative = values[order], counts.to_numpy()[order].cumsum()
    if len(values) == 0 or cumulative[-1] == 0:
        return float("nan")
    position = q * (cumulative[-1] - 1)
    low, high = (values[cumulative.searchsorted(k, side="right")] for k in (math.floor(position), math.ceil(position)))
    return float(low + (high - low) * (position - math.floor(position)))


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
        # Exact counts of each (bucket, fraction), not dask's quantile: that one is approximate and, on
        # a time-sorted log whose partitions cover disjoint ranges, far off (a median of 1/6 for 1/3).
        clicked = ddf[ddf["click"] > 0]
        bucket = _bucket(clicked["duration_seconds"], self.bucket_edges)
        pairs = clicked.assign(_bucket=bucket, _fraction=_fraction(clicked))
        return pairs.groupby(["_bucket", "_fraction"]).size()  # a null fraction (no duration) is left out

    def fit_finalize(self, stats):
        counts = stats.to_pandas() if hasattr(stats, "to_pandas") else stats
        buckets = counts.index.get_level_values("_bucket")
        n_buckets = len(self.bucket_edges) + 1
        per_bucket = [_weighted_quantile(counts[buckets == b], self.quantile) for b in range(n_buckets)]
        overall = _weighted_quantile(counts.groupby(level="_fraction").sum(), self.quantile)
        overall = 1.0 if math.isnan(overall) else overall
        # A bucket with no clicked training event uses the overall quantile.
        self.thresholds = [overall if math.isnan(v) else v for v in per_bucket]

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
        out[self.name] = ((df["click"] > 0) & (frac >= threshold).fillna(False)).astype("int64")  # cudf: null
        return out

    transform.__doc__ = "Label rows: clicked and watch fraction >= the bucket's learned threshold."


class WatchedAtLeast(_BinaryLabel, nvt.ops.Operator):
    """``watched``: watch_seconds / duration >= ``threshold`` (a plain, fixed-threshold label); a
    duration under 1 s counts as 1 s, as in ``duration_watch``'s fraction. Compared as a fraction, not
    as ``watch_seconds >= threshold * duration``: the product rounds up past the boundary for some
    thresholds (0.55 * 100 is 55.000000000000007), so 55 s of 100 s was not "watched >= 55%"; the
    quotient of two whole numbers rounds to the same double as the threshold written as a decimal."""

    def __init__(self, threshold: float = 0.75, name: str = "watched"):
        super().__init__()
        self.threshold, self.name = float(threshold), name

    def transform(self, col_selector: ColumnSelector, df):
        out = type(df)()
        # 0 s >= 75% of a 0 s item would label every unwatched impression (and sampled negative) watched:
        # _fraction takes a duration under 1 s as 1 s.
        out[self.name] = (_fraction(df) >= self.threshold).fillna(False).astype("int64")
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
