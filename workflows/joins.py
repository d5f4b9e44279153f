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


def attribute_join(users, items, event_columns: list[str]) -> nvt.Workflow:
    """An (unfitted) workflow adding user and item attribute columns to events (left joins)."""
    joined = (
        list(event_columns)
        >> nvt.ops.JoinExternal(users, on="user_id", columns_ext=USER_COLUMNS, how="left")
        >> nvt.ops.JoinExternal(items, on="item_id", columns_ext=JOINED_ITEM_COLUMNS, how="left")
    )
    return nvt.Workflow(joined)


def join_attributes(events: Dataset, users: Dataset, items: Dataset) -> Dataset:
    """Return ``events`` with the user and item attribute columns added (left joins)."""
    workflow = attribute_join(users, items, events.to_ddf().columns)
    return workflow.fit_transform(events)
