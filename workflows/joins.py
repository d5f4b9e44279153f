"""Join user and item attributes onto the event log, on GPU (cudf) or CPU (pandas) alike.

NVTabular's ``JoinExternal`` does a partition-wise left join against a small table, which is what
attribute tables are. The joined log is what the feature workflow reads, so the feature workflow's
user and item sub-workflows can later be applied to the user and item tables on their own.
"""

from __future__ import annotations

import nvtabular as nvt
from merlin.io import Dataset

from workflows.schema import ITEM_COLUMNS, USER_COLUMNS

JOINED_ITEM_COLUMNS = [c for c in ITEM_COLUMNS if c != "title"]


def same_name(column: str) -> str:
    return column


def attribute_join(
    users,
    items,
    event_columns: list[str],
    user_columns: list[str] = USER_COLUMNS,
    item_columns: list[str] = JOINED_ITEM_COLUMNS,
) -> nvt.Workflow:
    """An (unfitted) workflow adding user and item attribute columns to events (left joins).

    ``user_columns`` / ``item_columns`` (with the id) are what is joined: by default the raw schema's
    (``title`` is not joined: it is not a feature); a dataset spec's layout gives its own. A table
    with no attribute but its id is not joined at all.
    """
    joined = list(event_columns)
    if len(user_columns) > 1:
        joined = joined >> nvt.ops.JoinExternal(users, on="user_id", columns_ext=list(user_columns), how="left")
    if len(item_columns) > 1:
        joined = joined >> nvt.ops.JoinExternal(items, on="item_id", columns_ext=list(item_columns), how="left")
    if isinstance(joined, list):
        joined = joined >> nvt.ops.Rename(f=same_name)  # nothing to join: the events as they are
    return nvt.Workflow(joined)


def apply_join(workflow: nvt.Workflow, events) -> Dataset:
    """``workflow`` (``attribute_join``) applied to the dask collection ``events``.

    Empty partitions are left out first (one is kept if all are): Merlin's executor drops an empty
    upstream output and then looks for the joined columns among the event columns, a ``KeyError``
    (a part whose filter or shuffle left a partition without rows). The rows are the same.
    """
    sizes = events.map_partitions(len).compute()
    sizes = sizes.to_pandas() if hasattr(sizes, "to_pandas") else sizes  # cudf series do not iterate
    keep = [i for i, n in enumerate(sizes) if n] or [0]
    if len(keep) < events.npartitions:
        events = events.partitions[keep]
    return workflow.fit_transform(Dataset(events))


def join_attributes(events: Dataset, users: Dataset, items: Dataset) -> Dataset:
    """Return ``events`` with the user and item attribute columns added (left joins)."""
    workflow = attribute_join(users, items, events.to_ddf().columns)
    return apply_join(workflow, events.to_ddf())
