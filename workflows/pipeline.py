"""The dataset pipeline: raw tables -> joined log -> temporal split -> fitted feature workflow.

``run_dataset_pipeline`` writes everything models and serving need under one folder:

    train/, valid/             transformed parquet (model inputs and labels)
    workflow/                  the fitted NVTabular workflow (with user/item sub-workflows)
    categories/                Categorify vocabularies
    user_features.parquet      encoded features of every user known at training time, plus raw id
    item_features.parquet      encoded features of every item known at training time, plus raw id
    train_events.parquet       raw training-period events (history for filters and popularity)
    summary.json               counts and the split cutoff
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nvtabular as nvt
from merlin.io import Dataset

from configs import WorkflowConfig
from workflows.features import build_feature_workflow
from workflows.joins import join_attributes
from workflows.schema import EVENT_COLUMNS, ITEM_COLUMNS, USER_COLUMNS, check_columns
from workflows.splits import temporal_split


@dataclass
class ProcessedData:
    """Paths to what ``run_dataset_pipeline`` wrote."""

    root: Path

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def valid_dir(self) -> Path:
        return self.root / "valid"

    @property
    def workflow_dir(self) -> Path:
        return self.root / "workflow"

    @property
    def user_features(self) -> Path:
        return self.root / "user_features.parquet"

    @property
    def item_features(self) -> Path:
        return self.root / "item_features.parquet"

    @property
    def train_events(self) -> Path:
        return self.root / "train_events.parquet"

    @property
    def summary(self) -> dict:
        return json.loads((self.root / "summary.json").read_text())

    def train(self) -> Dataset:
        return Dataset(str(self.train_dir), engine="parquet")

    def valid(self) -> Dataset:
        return Dataset(str(self.valid_dir), engine="parquet")

    def workflow(self) -> nvt.Workflow:
        return nvt.Workflow.load(str(self.workflow_dir))


def category_mapping(workflow: nvt.Workflow, column: str):
    """The fitted vocabulary of ``column``: a frame with ``raw`` values and their ``encoded`` index.

    Read from the parquet file Categorify wrote, with the same backend (cudf or pandas) Merlin uses.
    """
    from merlin.core.dispatch import read_dispatch

    path = workflow.output_schema[column].properties["cat_path"]
    vocab = read_dispatch(fmt="parquet")(path)
    out = vocab[[column]].rename(columns={column: "raw"})
    out["encoded"] = vocab.index.values
    return out.reset_index(drop=True)


def _encode_table(workflow: nvt.Workflow, subgraph: str, table: Dataset, id_col: str):
    """Apply a sub-workflow to a user/item table; keep rows whose id is in the vocabulary."""
    encoded = workflow.get_subworkflow(subgraph).transform(table).to_ddf().compute()
    mapping = category_mapping(workflow, id_col)
    encoded = encoded.merge(mapping, left_on=id_col, right_on="encoded", how="inner")
    encoded = encoded.drop(columns=["encoded"]).rename(columns={"raw": f"{id_col}_raw"})
    return encoded.sort_values(id_col).reset_index(drop=True)


def run_dataset_pipeline(
    events_path: str | Path,
    users_path: str | Path,
    items_path: str | Path,
    out_dir: str | Path,
    config: WorkflowConfig,
) -> ProcessedData:
    """Run the whole dataset pipeline on raw parquet tables and write its outputs to ``out_dir``."""
    out = ProcessedData(Path(out_dir))
    out.root.mkdir(parents=True, exist_ok=True)
    events, users, items = (Dataset(str(p), engine="parquet") for p in (events_path, users_path, items_path))
    for ds, cols, name in ((events, EVENT_COLUMNS, "events"), (users, USER_COLUMNS, "users"), (items, ITEM_COLUMNS, "items")):
        check_columns(ds.to_ddf(), cols, name)

    joined = join_attributes(events, users, items)
    split = temporal_split(joined, config.split)

    workflow = build_feature_workflow(config, out.root)
    workflow.fit(split.train)
    workflow.transform(split.train).to_parquet(str(out.train_dir), output_files=1)
    workflow.transform(split.valid).to_parquet(str(out.valid_dir), output_files=1)
    workflow.save(str(out.workflow_dir))

    user_table = _encode_table(workflow, "user_features", users, "user_id")
    item_table = _encode_table(workflow, "item_features", items, "item_id")
    user_table.to_parquet(out.user_features, index=False)
    item_table.to_parquet(out.item_features, index=False)

    train_events = split.train.to_ddf()[EVENT_COLUMNS].compute()
    train_events.to_parquet(out.train_events, index=False)

    summary = {
        "cutoff": split.cutoff,
        "train_rows": int(len(train_events)),
        "valid_rows": int(split.valid.to_ddf().shape[0].compute()),
        "known_users": int(len(user_table)),
        "known_items": int(len(item_table)),
    }
    (out.root / "summary.json").write_text(json.dumps(summary, indent=2))
    return out
