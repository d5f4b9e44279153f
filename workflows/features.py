"""The NVTabular feature workflow: categorical encodings, item duration, and the training labels.

The workflow has two named sub-workflows, ``user_features`` and ``item_features``. Serving applies
them alone to the user and item tables (``Workflow.get_subworkflow``), so the features a model is
trained on and the features it is served with come from the same fitted operators.

Labels (one per signal, because no single signal is relevance):
    click        the user clicked the impression
    watched      watched at least ``watch_threshold`` (default 75%) of the item's duration
    like, share  explicit positive feedback
"""
from __future__ import annotations

from pathlib import Path

import nvtabular as nvt
from merlin.dag.ops.subgraph import Subgraph
from merlin.schema import Tags

from configs import WorkflowConfig
from workflows.schema import ITEM_CATEGORICAL, ITEM_CONTINUOUS, USER_CATEGORICAL

LABELS = ["click", "watched", "like", "share"]


def build_feature_workflow(config: WorkflowConfig, categories_dir: str | Path) -> nvt.Workflow:
    """Build (unfitted) the workflow that turns the joined event log into model inputs."""
    out = str(categories_dir)  # Categorify writes its vocabularies here, never into the cwd

    user_id = ["user_id"] >> nvt.ops.Categorify(out_path=out) >> nvt.ops.TagAsUserID()
    user_attributes = (
        USER_CATEGORICAL >> nvt.ops.Categorify(out_path=out) >> nvt.ops.TagAsUserFeatures()
    )
    user_features = Subgraph("user_features", user_id + user_attributes)

    item_id = ["item_id"] >> nvt.ops.Categorify(out_path=out) >> nvt.ops.TagAsItemID()
    item_attributes = (
        ITEM_CATEGORICAL >> nvt.ops.Categorify(out_path=out) >> nvt.ops.TagAsItemFeatures()
    )
    item_continuous = (
        ITEM_CONTINUOUS
        >> nvt.ops.LogOp()
        >> nvt.ops.Normalize()
        >> nvt.ops.AddTags([Tags.ITEM, Tags.CONTINUOUS])
    )
    item_features = Subgraph("item_features", item_id + item_attributes + item_continuous)

    threshold = config.watch_threshold
    watched = (
        ["watch_seconds"]
        >> nvt.ops.LambdaOp(
            lambda col, df: (col >= threshold * df["duration_seconds"]).astype("int64"),
            dependency=["duration_seconds"],
        )
        >> nvt.ops.Rename(name="watched")
    )
    binary_labels = (["click", "like", "share"] + watched) >> nvt.ops.AddTags(
        [Tags.BINARY_CLASSIFICATION, Tags.TARGET]
    )
    return nvt.Workflow(user_features + item_features + binary_labels)
