"""Row filters as NVTabular ``Filter`` ops, so every step runs on cudf or pandas partitions alike."""

from __future__ import annotations

import nvtabular as nvt
from merlin.io import Dataset


def filter_rows(ddf, predicate):
    """Keep the rows where ``predicate(partition)`` is true, through an NVTabular ``Filter`` op.

    ``predicate`` gets one partition (a cudf or pandas frame) and returns a boolean series; it must
    be picklable (it is shipped to dask workers).
    """
    dataset = Dataset(ddf)
    workflow = nvt.Workflow(list(ddf.columns) >> nvt.ops.Filter(predicate))
    return workflow.fit_transform(dataset).to_ddf()


class IsIn:
    """Picklable predicate ``partition[column].isin(values)`` (negated with ``keep=False``)."""

    def __init__(self, column: str, values, keep: bool = True):
        self.column, self.values, self.keep = column, list(values), keep

    def __call__(self, df):
        mask = df[self.column].isin(self.values)
        return mask if self.keep else ~mask


class AtLeast:
    """Picklable predicate ``partition[column] >= value``."""

    def __init__(self, column: str, value):
        self.column, self.value = column, value

    def __call__(self, df):
        return df[self.column] >= self.value
