"""Train/validation splits of the event log.

Temporal split (the default): everything before a cutoff time trains, everything after validates, so
no model ever sees the future of the events it is evaluated on. The cutoff is the timestamp quantile
``1 - valid_fraction`` of the log.
"""
from __future__ import annotations

from dataclasses import dataclass

from merlin.io import Dataset

from configs import SplitConfig


@dataclass
class Split:
    train: Dataset
    valid: Dataset
    cutoff: int  # first timestamp of the validation period


def temporal_split(events: Dataset, config: SplitConfig) -> Split:
    """Split by time; works on dask-cudf and dask-pandas collections alike."""
    ddf = events.to_ddf()
    cutoff = int(ddf["timestamp"].quantile(1.0 - config.valid_fraction).compute())
    train = ddf[ddf["timestamp"] < cutoff]
    valid = ddf[ddf["timestamp"] >= cutoff]
    return Split(Dataset(train), Dataset(valid), cutoff)
