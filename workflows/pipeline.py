"""The dataset pipeline: raw tables -> cleaned, labelled, split and encoded model inputs.

The steps, in order (one module each; every step reports rows/users/items removed):

    dedup.drop_identical_rows        exact copies of an event
    dedup.canonical_items            one item under several ids -> one canonical id
    content_filter.content_filter    unsafe items: neither trained on nor served
    recency_window.recency_window    only the last W days
    point_in_time                    user/item counts from strictly earlier events
    activity                         the user's events/clicks in the last 1 h / 24 h / 7 d before each event
    splits.split_events              temporal (default) / random per user / explicit files; a random or
                                     explicit split comes before the two steps above, which then count
                                     training events only (``features_and_split``)
    active_users.active_users        training data: only users active lately (others: fallback)
    dedup.dedup_pairs                one row per (user, item) per part, signals combined
    negative_sampling                optional sampled negatives for rankers (training, optionally validation)
    joins + features + labels        the fitted NVTabular workflow
    checks                           correctness checks on the output (raise on failure)

``run_dataset_pipeline`` writes everything models and serving need under one folder:

    train/, valid/ (, test/)   transformed parquet (model inputs and labels)
    workflow/                  the fitted NVTabular workflow (with user/item sub-workflows)
    categories/                Categorify vocabularies
    user_features.parquet      encoded features of every user known at training time, plus raw id;
                               point-in-time counts and windowed activity as of the end of the training data
    item_features.parquet      the same for every safe, canonical item known at training time
    train_events.parquet       raw training-period events (history for filters and popularity)
    valid_events.parquet (, test_events.parquet)
                               the held-out parts' cleaned events in raw ids, before any sampled
                               negatives: what an offline evaluation scores on any split kind
    recent_events.parquet      each user's events (user_id, timestamp, click) in the longest activity
                               window before the end of the training data (serving counts from them)
    fallback_events.parquet    the training-period events (event columns, one row per user-item pair as
                               dedup_pairs combines them) of the users active_users
                               dropped: the history of users the fallback serves, which it must not
                               serve back to them (never trained on)
    item_id_map.parquet        raw item id -> canonical item id (duplicates), for every raw item
    summary.json               counts, the split cutoff, one report per step, the checks passed
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import dask.dataframe as dd
import numpy as np
import nvtabular as nvt
from merlin.io import Dataset

from configs import WorkflowConfig
from workflows import checks
from workflows.active_users import active_users
from workflows.activity import add_activity_counts, column_names, counts_as_of, recent_events
from workflows.adapt import adapt_workflow_config
from workflows.cluster import connect
from workflows.content_filter import content_filter
from workflows.dedup import canonical_items, dedup_pairs, drop_identical_rows
from workflows.features import build_feature_workflow
from workflows.joins import apply_join, attribute_join
from workflows.labels import DurationAwareWatch
from workflows.local_parquet import read_parquet_dispatched
from workflows.negative_sampling import sample_negatives
from workflows.point_in_time import (
    ITEM_COUNTS,
    POINT_IN_TIME_COLUMNS,
    USER_COUNTS,
    WEIGHT,
    add_point_in_time_counts,
    totals_as_of,
)
from workflows.reader import Inputs, load_inputs, with_placeholders
from workflows.recency_window import recency_window
from workflows.report import report
from workflows.rows import IsIn, filter_rows
from workflows.spec import DatasetSpec, Layout, raw_schema_spec
from workflows.splits import split_events
from workflows.validate import DatasetError, Defect


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
    def test_dir(self) -> Path:
        return self.root / "test"

    @property
    def item_id_map(self) -> Path:
        return self.root / "item_id_map.parquet"

    @property
    def train_events(self) -> Path:
        return self.root / "train_events.parquet"

    def held_out_events(self, part: str) -> Path:
        """``valid`` or ``test``: that part's cleaned events (raw ids, one row per user-item pair)."""
        return self.root / f"{part}_events.parquet"

    @property
    def recent_events(self) -> Path:
        return self.root / "recent_events.parquet"

    @property
    def fallback_events(self) -> Path:
        return self.root / "fallback_events.parquet"

    @property
    def summary(self) -> dict:
        return json.loads((self.root / "summary.json").read_text())

    def train(self) -> Dataset:
        return Dataset(str(self.train_dir), engine="parquet")

    def valid(self) -> Dataset:
        return Dataset(str(self.valid_dir), engine="parquet")

    def test(self) -> Dataset | None:
        """The test part (random split, or temporal with ``test_fraction``), else ``None``."""
        return Dataset(str(self.test_dir), engine="parquet") if self.test_dir.exists() else None

    def workflow(self) -> nvt.Workflow:
        return nvt.Workflow.load(str(self.workflow_dir))


def category_mapping(workflow: nvt.Workflow, column: str):
    """The fitted vocabulary of ``column``: a frame with ``raw`` values and their ``encoded`` index.

    Read from the parquet file Categorify wrote, with the same backend (cudf or pandas) Merlin uses.
    """
    path = workflow.output_schema[column].properties["cat_path"]
    vocab = read_parquet_dispatched(path)
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


def _duration_op(workflow: nvt.Workflow) -> DurationAwareWatch | None:
    """The fitted ``DurationAwareWatch`` operator of a workflow (its thresholds go into the summary)."""
    stack, seen = [workflow.output_node], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node.op, DurationAwareWatch):
            return node.op
        stack.extend(node.parents_with_dependencies)
    return None


def _with_totals(table, totals, columns):
    """Attach point-in-time totals to a user/item table; ids without events get 0."""
    key = totals.columns[0]
    merged = table.merge(totals, on=key, how="left")
    for column in columns:
        merged[column] = merged[column].fillna(0).astype("int64")
    return merged.sort_values(key).reset_index(drop=True)


def event_features(events, config: WorkflowConfig):
    """The event-level features computed from strictly earlier events: point-in-time counts (when
    ``features.point_in_time``) and windowed activity (``features.activity_windows``)."""
    if config.features.point_in_time:
        events = add_point_in_time_counts(events)
    return add_activity_counts(events, config.features.activity_window_seconds)


def event_feature_columns(config: WorkflowConfig) -> list[str]:
    """The columns ``event_features`` adds."""
    return (POINT_IN_TIME_COLUMNS if config.features.point_in_time else []) + column_names(
        config.features.activity_window_seconds
    )


_PART = "_part"  # features_and_split: the part (0 train, 1 valid, 2 test) of each row of the weighted log


def features_and_split(events, config: WorkflowConfig, item_map=None):
    """Steps 2 and 3: the event features (``event_features``) and the split. Returns ``(split, counted)``:
    the split, its parts with the feature columns, and the log the features counted from, which later
    steps count from too (sampled negatives, the point-in-time probe).

    ``temporal`` (or no event feature configured): features on the whole log, then the split (every
    held-out event is after every training one, so no training row counts one; held-out rows count the
    earlier held-out events, as serving counts live ones). ``counted``: the log with its features.

    ``random`` / ``explicit``: held-out events lie between training ones, so counted over the whole log a
    training row's ``user_clicks_before`` held the user's held-out clicks before it (their labels leaked
    into training features) and differed from the serving tables, counted over the training part only.
    The split comes first instead (it reads no feature), then the features on every part together, held-out
    rows weighted 0 (``WEIGHT``): each row of every part counts the strictly earlier training events
    only; the log's events in no part (an explicit split's) are not counted. ``counted``: every part's
    rows with their features and ``WEIGHT`` (1 training, 0 held out).
    """
    if config.split.kind == "temporal" or not event_feature_columns(config):
        # No feature to count (configs/movielens-recbole.yaml): the split alone, on the same partitions as
        # before, so the seeded per-partition draws downstream (sampled negatives) are what they were.
        events = event_features(events, config).persist()
        return split_events(events, config.split, item_map), events
    events = events.persist()
    split = split_events(events, config.split, item_map)
    parts = split.parts()
    tagged = []
    for i, (name, part) in enumerate(parts.items()):
        zero = part["timestamp"] * 0
        tagged.append(part.assign(**{_PART: zero + i, WEIGHT: zero + int(name == "train")}))
    both = dd.concat(tagged).repartition(npartitions=events.npartitions)
    both = event_features(both, config).persist()
    columns = [c for c in both.columns if c not in (_PART, WEIGHT)]
    featured = {name: both[both[_PART] == i][columns] for i, name in enumerate(parts)}
    split = replace(split, train=featured["train"], valid=featured["valid"], test=featured.get("test"))
    return split, both[[*columns, WEIGHT]]


def _negatives_with_features(
    part,
    events,
    items,
    config: WorkflowConfig,
    point_in_time: bool,
    popularity=None,
    seen=None,
    seed_offset: int = 0,
    event_columns: list[str] | None = None,
):
    """Sampled negatives for one split part, with point-in-time counts as of their timestamp.

    ``events``: the log the features counted (``features_and_split``); its rows with ``WEIGHT`` 0
    (held-out rows under a random or explicit split) are not counted for the negatives either."""
    ns = config.negative_sampling
    event_columns = event_columns or Layout().event_columns
    raw = part[event_columns]
    negatives = sample_negatives(raw, items, ns.ratio, ns.kind, ns.seed + seed_offset, popularity, seen)
    negatives = negatives.drop_duplicates(subset=["user_id", "item_id"], split_out=negatives.npartitions)
    if point_in_time:
        # Negatives get the counts of real events before them, and are not counted themselves. The real
        # events are the ones the features counted (``features_and_split``): held-out rows weighted 0 are not.
        if WEIGHT in events.columns:
            events = events[events[WEIGHT] > 0]
        real = events[event_columns].assign(**{WEIGHT: events["timestamp"] * 0 + 1})
        fake = negatives.assign(**{WEIGHT: negatives["timestamp"] * 0})
        both = event_features(dd.concat([real, fake]), config)
        negatives = both[both[WEIGHT] == 0][list(part.columns)]
    return negatives[list(part.columns)]


def run_dataset_pipeline(
    events_path: str | Path,
    users_path: str | Path | None,
    items_path: str | Path | None,
    out_dir: str | Path,
    config: WorkflowConfig,
    scheduler=None,
) -> ProcessedData:
    """Run the whole dataset pipeline on the raw schema's parquet tables (``workflows/schema.py``).

    The same as ``prepare_dataset`` with the raw schema's spec (``workflows/spec.py``
    ``raw_schema_spec``); ``users_path`` / ``items_path`` may be ``None`` (no such table).
    """
    return prepare_dataset(raw_schema_spec(events_path, users_path, items_path), out_dir, config, scheduler)


def prepare_dataset(
    spec: DatasetSpec, out_dir: str | Path, config: WorkflowConfig, scheduler=None, inputs: Inputs | None = None
) -> ProcessedData:
    """Check the files ``spec`` names, then run the whole dataset pipeline and write to ``out_dir``.

    Raises ``workflows.validate.DatasetError`` (every defect of the input) before anything is
    written. ``scheduler``: where dask runs (see ``workflows/cluster.py``): ``None`` (in process), a
    ``distributed.Client``, a scheduler address, ``"local-cuda"`` or ``"auto"``. ``inputs``: what
    ``load_inputs(spec)`` returned, where the caller has read and checked the files already (the
    offline evaluation reads the log for its own figures too), so they are not read twice.
    """
    with connect(scheduler):
        return _run(spec, out_dir, config, inputs)


def _some_left(rep, why: str):
    """``rep``, or a named error when its step left no event: the next step failed on the empty log
    with whatever it tripped on first (``int(NaN)`` in the recency window after a content filter that
    took every item)."""
    if rep.rows_before > 0 and rep.rows_after == 0:
        message = f"no event is left after {rep.step} ({rep.rows_before:,} before it): {why}"
        raise DatasetError([Defect("events", "", message)])
    return rep


def _run(spec: DatasetSpec, out_dir, config: WorkflowConfig, inputs: Inputs | None) -> ProcessedData:
    if inputs is None:
        inputs = load_inputs(spec)  # raises DatasetError before anything is written
    layout = inputs.layout
    config, adaptations = adapt_workflow_config(config, layout, list(inputs.items.columns))
    events, users, items = inputs.events, inputs.users, inputs.items
    out = ProcessedData(Path(out_dir))
    out.root.mkdir(parents=True, exist_ok=True)
    # summary.json, written last, marks a complete output (scripts/train.py refuses a folder without
    # it). A rerun over an earlier output removes it first: interrupted, it would have left the old
    # summary beside new, half-written parts, and training would have read them as one dataset.
    (out.root / "summary.json").unlink(missing_ok=True)
    # What only some runs write (a test part, the activity windows' events) goes too: left from an
    # earlier run, it read as this run's (an old test part scored, old recent events shipped).
    shutil.rmtree(out.test_dir, ignore_errors=True)
    out.held_out_events("test").unlink(missing_ok=True)
    out.recent_events.unlink(missing_ok=True)
    out.fallback_events.unlink(missing_ok=True)
    steps, passed = [], []
    signals = list(layout.signals)

    # 1. Cleaning on the whole log.
    if config.dedup.identical_rows:
        events, rep = drop_identical_rows(events)
        steps.append(rep)
    raw_items = items
    events, items, item_map, rep = canonical_items(events, items, config.dedup, layout.item_text)
    steps.append(rep)
    events, items, unsafe, rep = content_filter(events, items, config.content_filter, item_map, raw_items)
    steps.append(_some_left(rep, "every event's item is unsafe or taken down"))
    events, rep = recency_window(events, config.recency_window)
    steps.append(rep)
    # Ids the attribute tables lack (checks.missing_*: warn) are kept, with null attributes; not an
    # unsafe one (a takedown of an id the table lacks): sampled as a negative, it was trained on and served.
    users = with_placeholders(users, inputs.missing_users, "user_id")
    items = with_placeholders(items, np.setdiff1d(inputs.missing_items, unsafe), "item_id")
    # What the summary needs of the inputs; then let go of them: ``inputs.events`` is the raw log,
    # persisted, and held it in memory beside the cleaned one through every later step.
    dataset_notes = {
        "warnings": [w.to_dict() for w in inputs.warnings],
        "dropped_rows": inputs.dropped,
        "placeholder_users": int(len(inputs.missing_users)),
        "placeholder_items": int(len(inputs.missing_items)),
    }
    del inputs, raw_items

    # 2-3. Point-in-time features (every event sees only earlier events; under a random or explicit
    # split only earlier training events) and the split.
    windows = config.features.activity_window_seconds
    feature_columns = event_feature_columns(config)
    point_in_time = bool(feature_columns)  # some feature reads earlier events (negatives need them too)
    split, events = features_and_split(events, config, item_map)

    # 3. Active users on the training part; one row per (user, item) in each part.
    if config.checks.enabled and config.split.kind == "temporal":
        passed.append(checks.check_temporal_split(split))
    train, rep = active_users(split.train, config.active_users, as_of=split.cutoff)
    steps.append(_some_left(rep, "no user of the training part is active enough (workflow.active_users)"))
    parts = {**split.parts(), "train": train}
    first_columns = feature_columns
    for name in list(parts):
        parts[name], rep = dedup_pairs(
            parts[name], config.dedup, first_columns, step=f"dedup_pairs_{name}", signals=signals
        )
        steps.append(rep)
        # An empty held-out part failed later with a KeyError at the attribute join, naming nothing
        # (a random split of users with 2 items each: RecBole's rounding gives them no validation item).
        if rep.rows_after == 0:
            message = f"the {config.split.kind} split leaves the {name} part empty"
            if config.split.kind == "random":
                message += f" (each user's items are cut at split.ratios {list(config.split.ratios)}: too few per user)"
            raise DatasetError([Defect("events", "", message)])
    train_events = parts["train"]
    # The training-period events of the users active_users dropped: never trained on, but their
    # history, which the fallback that serves them must skip (as a known user's seen items).
    dropped_events = None
    if config.active_users.enabled:
        kept_users = train["user_id"].unique().compute()
        kept_users = kept_users.values_host if hasattr(kept_users, "values_host") else kept_users.values
        dropped_events = filter_rows(split.train, IsIn("user_id", kept_users, keep=False))
        # One row per (user, item), as the training part's: inactive users can be most of a log, and
        # only their history is kept, so it is deduplicated before it is computed into memory.
        dropped_events, _ = dedup_pairs(dropped_events, config.dedup, first_columns, signals=signals)
    held_out = {name: ddf for name, ddf in parts.items() if name != "train"}  # before sampled negatives

    ns = config.negative_sampling
    event_columns = layout.event_columns
    if ns.kind != "none":
        negatives = _negatives_with_features(
            parts["train"], events, items, config, point_in_time, event_columns=event_columns
        )
        before = parts["train"]
        parts["train"] = dd.concat([before, negatives]).persist()
        steps.append(report("negative_sampling", before, parts["train"], kind=ns.kind, ratio=ns.ratio))
        if ns.valid and "valid" in parts:
            # The same kind of negatives in validation, so early stopping and the validation AUC judge
            # the question the rankers are trained on (where every validation row is a positive, as
            # in MovieLens with every rating a click, they are the only validation negatives). Drawn
            # by training popularity; never an item the user has in training or validation. The training
            # pairs are the split's, before active_users: validation keeps the users that filter dropped,
            # and their own training-period items must not come back as their negatives.
            valid = parts["valid"]
            popularity = train_events.groupby("item_id").size().compute().reset_index()
            popularity.columns = ["item_id", "count"]
            seen = dd.concat([split.train[["user_id", "item_id"]], valid[["user_id", "item_id"]]])
            extra = _negatives_with_features(
                valid, events, items, config, point_in_time, popularity, seen, 1, event_columns=event_columns
            )
            parts["valid"] = dd.concat([valid, extra]).persist()
            steps.append(report("negative_sampling_valid", valid, parts["valid"], kind=ns.kind, ratio=ns.ratio))

    # 4. Attributes, then the fitted feature workflow (features + labels) on the training part.
    join = attribute_join(
        users, items, list(parts["train"].columns), layout.joined_user_columns, layout.joined_item_columns
    )
    joined = {name: apply_join(join, ddf).to_ddf().persist() for name, ddf in parts.items()}
    workflow = build_feature_workflow(config, out.root, layout)
    workflow.fit(Dataset(joined["train"]))
    transformed = {}
    for name, ddf in joined.items():
        transformed[name] = workflow.transform(Dataset(ddf))
        transformed[name].to_parquet(str(out.root / name), output_files=1)
    workflow.save(str(out.workflow_dir))
    duration_op = _duration_op(workflow)

    # 5. Serving tables: features as of the end of the training data, counted over the training part
    # only. Under a temporal split that is every event before the cutoff; under a random or explicit
    # one, held-out events lie before it too, and counting them would put a held-out item's own
    # click into the popularity the funnel scores it with.
    as_of = int(split.cutoff)
    user_table, item_table = users, items
    if config.features.point_in_time:
        user_totals, item_totals = totals_as_of(split.train, as_of)
        user_table = _with_totals(users, user_totals, USER_COUNTS)
        item_table = _with_totals(items, item_totals, ITEM_COUNTS)
    if windows:
        recent = recent_events(split.train, as_of, windows)
        user_table = _with_totals(user_table, counts_as_of(recent, as_of, windows), column_names(windows))
        recent.to_parquet(out.recent_events, index=False)
    user_table = _encode_table(workflow, "user_features", Dataset(user_table), "user_id")
    item_table = _encode_table(workflow, "item_features", Dataset(item_table), "item_id")
    user_table.to_parquet(out.user_features, index=False)
    item_table.to_parquet(out.item_features, index=False)
    item_map.to_parquet(out.item_id_map, index=False)
    train_raw = joined["train"] if config.negative_sampling.kind == "none" else None
    train_frame = (train_raw if train_raw is not None else train_events)[event_columns].compute()
    train_frame.to_parquet(out.train_events, index=False)
    for name, ddf in held_out.items():
        ddf[event_columns].compute().to_parquet(out.held_out_events(name), index=False)
    if dropped_events is not None:
        dropped_events[event_columns].compute().to_parquet(out.fallback_events, index=False)

    # 6. Correctness checks on what was written.
    if config.checks.enabled:
        if config.dedup.aggregate_pairs:
            # On the raw ids (the workflow maps rows one to one): encoded, two rare ids that
            # id_freq_threshold sends to the one OOV index read as a duplicate pair.
            passed.append(checks.check_no_duplicate_pairs(joined["train"]))
        for name in joined:
            record = checks.check_labels_agree(
                joined[name], transformed[name].to_ddf(), config.watch_threshold, duration_op, layout
            )
            passed.append({**record, "part": name})
        if point_in_time and config.checks.point_in_time_probe:
            passed.append(
                checks.check_point_in_time(
                    events, compute=lambda ddf: event_features(ddf, config), columns=feature_columns
                )
            )

    rows = {name: int(ddf.shape[0].compute()) for name, ddf in joined.items()}
    summary = {
        "cutoff": int(split.cutoff),
        "split": split.details,
        # The event-level features the data carries (read from earlier events): the checklist's data_checks
        # requires the point-in-time probe where there are any, whatever config the training run reads.
        "event_features": list(feature_columns),
        "train_rows": rows["train"],
        "valid_rows": rows["valid"],
        **({"test_rows": rows["test"]} if "test" in rows else {}),
        "known_users": int(len(user_table)),
        "known_items": int(len(item_table)),
        "unsafe_items": sorted(int(i) for i in unsafe),
        "duplicate_items": int((item_map["item_id"] != item_map["canonical_item_id"]).sum()),
        "duration_watch_thresholds": (
            {"bucket_edges": duration_op.bucket_edges, "thresholds": duration_op.thresholds} if duration_op else None
        ),
        "dataset": {
            "name": spec.name,
            "spec": spec.to_dict(),
            "layout": layout.to_dict(),
            "labels": layout.labels,
            "objective": [{"name": t.name, "weight": t.weight} for t in spec.objective],
            "adaptations": adaptations,
            **dataset_notes,
        },
        "steps": [s.to_dict() for s in steps],
        "checks": passed,
    }
    (out.root / "summary.json").write_text(json.dumps(summary, indent=2))
    return out
