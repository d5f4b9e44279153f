"""The dataset spec: one YAML file that says where an event log's files are and what each column is.

Only the user id, the item id and the timestamp are required; everything else is optional and the
pipeline adapts to what exists (``Layout``)::

    name: shop
    events:
      path: events-*.csv          # a file or a glob, relative to this file; csv, parquet or jsonl
      user_id: customer
      item_id: sku
      timestamp: ts
      timestamp_unit: ms          # s | ms | us | ns | iso (ISO 8601 text)
      signals:                    # outcome columns; binary (0/1) or continuous (with a range)
        - {name: view}
        - {name: add_to_cart}
        - {name: purchase}
      positive: view              # the signal retrieval, the light ranker and the fallback learn
    items:                        # optional: without it items have id-only features
      path: items.csv
      id: sku
      categorical: [brand]
      continuous: [{column: price, log: true}]
      lists: [{column: category_path, separator: ">", max_length: 3, prefix: true}]
      text: [title]               # content filter and duplicate signature; not a model feature
      duration: length_seconds    # with a watch-time signal: the watched / duration-aware labels
    users:                        # optional: without it users have id and history features only
      path: customers.jsonl
      id: customer
      categorical: [segment]
    objective:                    # the heavy ranker's heads and weights, in the spec's signals
      - {name: view, weight: 0.2}
      - {name: purchase, weight: 0.8}
    checks:
      missing_items: error        # events of items the item table lacks: error | warn | drop
      missing_users: error

How the roles become the columns the pipeline works with (``Layout``): ``user_id``, ``item_id``,
``timestamp`` (int64 unix seconds); every signal under its ``name``; ``click`` is the ``positive``
signal (a copy when the positive has another name; every event when the spec has no signal at all,
i.e. an implicit log of purchases or plays); the ``watch_time`` signal becomes ``watch_seconds`` and
the item ``duration`` column ``duration_seconds`` (they are what the watched and duration-aware
labels read); a list column ``c`` becomes ``c_1 .. c_<max_length>``, one categorical feature per
position (with ``prefix: true`` level k is the path's first k elements, so "audio" under two parents
stays two values). Attribute columns keep their names: they are the feature names the models and the
serving tables carry. Text columns are kept for the content filter and the duplicate signature but
are not model features (a bag of words would need an encoder this funnel does not have).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from configs import DEFAULT_CONFIG_PATH, TargetConfig, build_typed, load_yaml

DATASET_SPECS = DEFAULT_CONFIG_PATH.parent / "datasets"  # the specs the project ships
RAW_SCHEMA_SPEC = DATASET_SPECS / "raw-schema.yaml"

FORMATS = ("csv", "parquet", "jsonl")
TIMESTAMP_UNITS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000, "iso": 0}
MISSING_POLICIES = ("error", "warn", "drop")
# Columns the pipeline writes itself: a signal or attribute of the same name would be overwritten.
RESERVED = {
    "user_id",
    "item_id",
    "timestamp",
    "watched",
    "duration_watch",
    "hour_of_day",
    "day_of_week",
    "user_events_before",
    "user_clicks_before",
    "item_events_before",
    "item_clicks_before",
    "user_click_rate_before",
    "item_click_rate_before",
}
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SpecError(ValueError):
    """The spec file itself is wrong (unknown key, wrong type, a role that names nothing)."""


@dataclass
class SignalSpec:
    """An outcome column of the event log."""

    name: str = ""  # the signal's name in the pipeline (a label column, a heavy-ranker head)
    column: str = ""  # the source column ("" = ``name``)
    kind: str = "binary"  # binary (0/1) | continuous
    min: float | None = None  # declared range; a value outside it is a defect
    max: float | None = None
    threshold: float | None = None  # continuous: ``value >= threshold`` is the signal's binary label

    @property
    def source(self) -> str:
        return self.column or self.name


@dataclass
class ContinuousSpec:
    column: str = ""
    log: bool = False  # log1p before normalising (prices, durations, counts)


@dataclass
class ListSpec:
    column: str = ""
    separator: str = "|"  # for text cells ("a|b|c"); parquet / JSON lists are read as lists
    max_length: int = 3  # positions kept, one categorical feature each
    prefix: bool = False  # hierarchical path: level k is the first k elements joined


@dataclass
class TableSpec:
    """An attribute table: one row per user (or item)."""

    path: str = ""
    format: str = ""  # csv | parquet | jsonl; "" = from the file extension
    id: str = ""  # the id column ("" = the events' id column name)
    categorical: list[str] = field(default_factory=list)
    continuous: list[ContinuousSpec] = field(default_factory=list)
    lists: list[ListSpec] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    duration: str = ""  # items: the item's length in seconds (the watch labels' denominator)

    def source_columns(self) -> list[str]:
        cols = [self.id, *self.categorical, *(c.column for c in self.continuous)]
        cols += [c.column for c in self.lists] + list(self.text)
        if self.duration and self.duration not in cols:
            cols.append(self.duration)
        return list(dict.fromkeys(cols))


@dataclass
class EventSpec:
    path: str = ""
    format: str = ""
    user_id: str = "user_id"
    item_id: str = "item_id"
    timestamp: str = "timestamp"
    timestamp_unit: str = "s"
    signals: list[SignalSpec] = field(default_factory=list)
    positive: str = ""  # "" = the signal named click, else the first signal with a binary label
    watch_time: str = ""  # a continuous signal holding seconds watched


@dataclass
class ChecksSpec:
    missing_items: str = "error"  # events whose item the item table lacks
    missing_users: str = "error"


@dataclass
class DatasetSpec:
    name: str = "dataset"
    events: EventSpec = field(default_factory=EventSpec)
    users: TableSpec | None = None
    items: TableSpec | None = None
    objective: list[TargetConfig] = field(default_factory=list)
    checks: ChecksSpec = field(default_factory=ChecksSpec)
    root: str = ""  # folder the paths are relative to (the spec file's folder when loaded)

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise SpecError("dataset spec: " + "; ".join(problems))

    def resolve(self, path: str) -> str:
        p = Path(path).expanduser()
        return str(p if p.is_absolute() or not self.root else Path(self.root) / p)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("root")
        return out

    def write(self, path: str | Path) -> Path:
        """Write the spec as YAML (paths as given, so a spec beside its files stays relocatable)."""
        path = Path(path)
        path.write_text(yaml.safe_dump(_compact(self.to_dict()), sort_keys=False))
        return path

    @property
    def layout(self) -> Layout:
        return layout_of(self)


def _compact(value):
    """Drop empty / default-None entries so a written spec reads like a hand-written one."""
    if isinstance(value, dict):
        return {k: _compact(v) for k, v in value.items() if v not in (None, "", [], {})}
    if isinstance(value, list):
        return [_compact(v) for v in value]
    return value


def _normalise(values: dict) -> dict:
    """Accept the short forms: ``continuous: [price]``, ``lists: [tags]``, ``signals: [click]``."""
    values = dict(values)
    for table in ("users", "items"):
        spec = values.get(table)
        if isinstance(spec, dict):
            spec = dict(spec)
            for key in ("continuous", "lists"):
                if isinstance(spec.get(key), list):
                    spec[key] = [{"column": v} if isinstance(v, str) else v for v in spec[key]]
            values[table] = spec
    events = values.get("events")
    if isinstance(events, dict) and isinstance(events.get("signals"), list):
        events = dict(events)
        events["signals"] = [{"name": v} if isinstance(v, str) else v for v in events["signals"]]
        values["events"] = events
    return values


def load_spec(path: str | Path) -> DatasetSpec:
    """Read and check a dataset spec; relative paths in it are relative to the spec file."""
    path = Path(path)
    if not path.exists():
        raise SpecError(f"dataset spec {str(path)!r} does not exist")
    if path.is_dir():  # read_text's IsADirectoryError was a traceback, exit 1
        raise SpecError(f"dataset spec {str(path)!r} is a folder, not a YAML file")
    try:
        values = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:  # a syntax error: the file and the line, not a traceback
        raise SpecError(f"dataset spec {str(path)!r} is not valid YAML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"dataset spec {str(path)!r} cannot be read: {exc}") from None
    return spec_from_dict(values, root=str(path.resolve().parent), where=path.name)


def spec_from_dict(values: dict, root: str = "", where: str = "spec") -> DatasetSpec:
    if not isinstance(values, dict):
        raise SpecError(f"{where}: expected a mapping, got {type(values).__name__}")
    values = _normalise(values)
    values.pop("root", None)
    try:
        spec = build_typed(DatasetSpec, values, where)
    except SpecError:
        raise
    except (TypeError, ValueError) as exc:
        raise SpecError(str(exc)) from exc
    spec.root = root
    return spec


def _problems(spec: DatasetSpec) -> list[str]:
    """Everything wrong with the spec itself (not the data), as messages naming the key."""
    out = []
    ev = spec.events
    if not ev.path:
        out.append("events.path is required")
    for key in ("user_id", "item_id", "timestamp"):
        if not getattr(ev, key):
            out.append(f"events.{key} must name a column")
    # One source column in two key roles (user_id and item_id both "customer", a signal reading the
    # timestamp column) loaded silently: the item ids were the user ids, the signal the timestamps.
    # Signals may share a column with each other (a rating and its thresholded label), not with a key.
    keys = {"events.user_id": ev.user_id, "events.item_id": ev.item_id, "events.timestamp": ev.timestamp}
    keys |= {f"events.signals {s.name!r}": s.source for s in ev.signals if s.source in keys.values()}
    for column in dict.fromkeys(c for c in keys.values() if c):
        roles = [role for role, c in keys.items() if c == column]
        if len(roles) > 1:
            out.append(f"{' and '.join(roles)} name the same column {column!r}: each role needs its own column")
    if ev.timestamp_unit not in TIMESTAMP_UNITS:
        out.append(f"events.timestamp_unit must be one of {list(TIMESTAMP_UNITS)}, got {ev.timestamp_unit!r}")
    for name, part in (("events", ev), ("users", spec.users), ("items", spec.items)):
        if part is not None and part.format and part.format not in FORMATS:
            out.append(f"{name}.format must be one of {list(FORMATS)}, got {part.format!r}")
    names = [s.name for s in ev.signals]
    for i, s in enumerate(ev.signals):
        where = f"events.signals[{i}]"
        if not s.name or not NAME.match(s.name):
            out.append(f"{where}.name must be an identifier, got {s.name!r}")
        if s.kind not in ("binary", "continuous"):
            out.append(f"{where}.kind must be binary or continuous, got {s.kind!r}")
        if s.name in RESERVED or s.name == "watch_seconds" and ev.watch_time != s.name:
            out.append(f"{where}.name {s.name!r} is a column the pipeline writes itself; choose another")
        if s.kind == "binary" and s.threshold is not None:
            out.append(f"{where}: threshold applies to continuous signals only")
        # A NaN bound made every comparison False: the range check and the label silently did nothing
        # (a threshold of +-inf labels every value one way; a bound of +-inf is only no bound).
        for key in ("min", "max", "threshold"):
            value = getattr(s, key)
            if value is not None and (math.isnan(value) or key == "threshold" and math.isinf(value)):
                out.append(f"{where}.{key} must be a {'finite ' if key == 'threshold' else ''}number, got {value}")
        if s.min is not None and s.max is not None and s.min > s.max:
            out.append(f"{where}: min {s.min} > max {s.max}")
    if len(set(names)) != len(names):
        out.append(f"events.signals has duplicate names {names}")
    labelled = [s.name for s in ev.signals if s.kind == "binary" or s.threshold is not None]
    if ev.positive and ev.positive not in labelled:
        out.append(
            f"events.positive {ev.positive!r} must be a binary signal (or continuous with a threshold): {labelled}"
        )
    if any(s.name == "click" and s.kind != "binary" for s in ev.signals):
        out.append("a signal named 'click' must be binary (it is the positive's 0/1 column)")
    if "click" in names and ev.positive and ev.positive != "click":
        out.append("a signal named 'click' must be the positive (click is the positive's column)")
    if ev.watch_time:
        kinds = {s.name: s.kind for s in ev.signals}
        if kinds.get(ev.watch_time) != "continuous":
            out.append(f"events.watch_time {ev.watch_time!r} must name a continuous signal")
        elif any(s.name == ev.watch_time and s.threshold is not None for s in ev.signals):
            out.append("events.watch_time: its labels are watched / duration_watch; it takes no threshold")
    for key in ("missing_items", "missing_users"):
        if getattr(spec.checks, key) not in MISSING_POLICIES:
            out.append(f"checks.{key} must be one of {list(MISSING_POLICIES)}, got {getattr(spec.checks, key)!r}")
    for table_name in ("users", "items"):
        table = getattr(spec, table_name)
        if table is None:
            continue
        if not table.path:
            out.append(f"{table_name}.path is required when {table_name} is given")
        if table_name == "users" and table.duration:
            out.append("users.duration: only items have a duration")
        features = table.categorical + [c.column for c in table.continuous] + [c.column for c in table.lists]
        for column in features:
            if not column or not NAME.match(column):
                out.append(f"{table_name}: feature column {column!r} must be an identifier (it names a model input)")
            elif column in RESERVED or column in names or column == "click":
                out.append(f"{table_name}: column {column!r} clashes with a column the pipeline writes")
        for lst in table.lists:
            if lst.max_length < 1:
                out.append(f"{table_name}.lists {lst.column!r}: max_length must be >= 1")
            if not lst.separator:  # str.split("") raises: the table's reading crashed on it
                out.append(f"{table_name}.lists {lst.column!r}: separator must not be empty")
        every = features + table.text
        dupes = sorted({c for c in every if every.count(c) > 1})
        if dupes:
            out.append(f"{table_name}: column(s) {dupes} have more than one role")
    # The joined events carry one column per name: a user and an item attribute of one name, or an
    # attribute named like an event column, were accepted and failed late in the attribute join.
    if not out:  # (the layout of a spec with other problems may not exist)
        layout = layout_of(spec)
        joined = [*layout.event_columns, *layout.joined_user_columns[1:], *layout.joined_item_columns[1:]]
        twice = sorted({c for c in joined if joined.count(c) > 1})
        if twice:
            out.append(
                f"column(s) {twice} would be joined onto the events twice (events, users and items share one "
                f"namespace of columns): rename one (a signal in the spec, an attribute in its file)"
            )
    if not spec.objective:
        return out
    labels = set(spec_labels(spec))
    for target in spec.objective:
        if target.name not in labels:
            out.append(f"objective names {target.name!r}, not a label of this spec ({sorted(labels)})")
    # What heavy_ranker.targets refuses (configs): found here, not in training after the data is written.
    heads = [t.name for t in spec.objective]
    if len(set(heads)) != len(heads):
        out.append(f"objective has duplicate names {heads}")
    weights = [t.weight for t in spec.objective]
    if not all(0 <= w < float("inf") for w in weights):  # NaN too
        out.append(f"objective weights must be finite and >= 0, got {weights}")
    elif sum(weights) <= 0:
        out.append("objective weights must not all be 0")
    return out


def spec_labels(spec: DatasetSpec) -> list[str]:
    """Every label the pipeline will write for this spec (what ``objective`` may name)."""
    return list(layout_of(spec).labels)


@dataclass(frozen=True)
class Layout:
    """The columns the pipeline works with once a spec's roles are mapped (see the module docstring)."""

    signals: tuple[str, ...] = ("click", "watch_seconds", "like", "share")  # event columns after the keys
    binary_labels: tuple[str, ...] = ("click", "like", "share")  # signals whose value is a 0/1 label
    thresholds: tuple[tuple[str, float], ...] = ()  # continuous signals with a label: (name, threshold)
    watch: bool = True  # events have watch_seconds
    duration: bool = True  # items have duration_seconds
    user_categorical: tuple[str, ...] = ("age_band", "gender", "location")
    user_continuous: tuple[tuple[str, bool], ...] = ()  # (column, log)
    item_categorical: tuple[str, ...] = ("category",)
    item_continuous: tuple[tuple[str, bool], ...] = (("duration_seconds", True),)
    item_text: tuple[str, ...] = ("title",)
    user_text: tuple[str, ...] = ()
    has_users: bool = True
    has_items: bool = True
    positive: str = "click"  # the spec signal ``click`` copies

    @property
    def event_columns(self) -> list[str]:
        return ["user_id", "item_id", "timestamp", *self.signals]

    @property
    def user_columns(self) -> list[str]:
        return ["user_id", *self.user_categorical, *(c for c, _ in self.user_continuous), *self.user_text]

    @property
    def item_columns(self) -> list[str]:
        cols = ["item_id", *self.item_categorical, *(c for c, _ in self.item_continuous), *self.item_text]
        if self.duration and "duration_seconds" not in cols:
            cols.append("duration_seconds")
        return cols

    @property
    def joined_item_columns(self) -> list[str]:
        """Item columns joined onto events: features and what labels read, not text."""
        return [c for c in self.item_columns if c not in self.item_text]

    @property
    def joined_user_columns(self) -> list[str]:
        return [c for c in self.user_columns if c not in self.user_text]

    @property
    def watch_labels(self) -> bool:
        """watched / duration_watch exist only with a watch-time signal and item durations."""
        return self.watch and self.duration

    @property
    def labels(self) -> list[str]:
        out = list(self.binary_labels)
        if self.watch_labels:
            out[1:1] = ["watched", "duration_watch"]
        out += [name for name, _ in self.thresholds]
        return out

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items()} | {
            "labels": self.labels,
            "event_columns": self.event_columns,
        }


RAW_LAYOUT = Layout()  # the raw schema of workflows/schema.py (the synthetic world, MovieLens)


def list_feature_names(lst: ListSpec) -> list[str]:
    return [f"{lst.column}_{i + 1}" for i in range(lst.max_length)]


def layout_of(spec: DatasetSpec) -> Layout:
    ev = spec.events
    watch = ev.watch_time
    signals = []
    for s in ev.signals:
        signals.append("watch_seconds" if s.name == watch else s.name)
    positive = ev.positive or _default_positive(ev)
    if "click" not in signals:
        signals.insert(0, "click")
    binary = ["click"] + [s.name for s in ev.signals if s.kind == "binary" and s.name != "click"]
    thresholds = tuple(
        (s.name, float(s.threshold)) for s in ev.signals if s.kind == "continuous" and s.threshold is not None
    )
    thresholds = tuple((n, t) for n, t in thresholds if n != "click")
    items, users = spec.items, spec.users

    def categorical(table: TableSpec | None) -> tuple[str, ...]:
        if table is None:
            return ()
        out = list(table.categorical)
        for lst in table.lists:
            out += list_feature_names(lst)
        return tuple(out)

    def continuous(table: TableSpec | None) -> tuple[tuple[str, bool], ...]:
        if table is None:
            return ()
        return tuple(("duration_seconds" if c.column == table.duration else c.column, c.log) for c in table.continuous)

    duration = bool(items and items.duration)
    item_continuous = continuous(items)
    if duration and "duration_seconds" not in [c for c, _ in item_continuous]:
        item_continuous = item_continuous + (("duration_seconds", True),)
    return Layout(
        signals=tuple(signals),
        binary_labels=tuple(binary),
        thresholds=thresholds,
        watch=bool(watch),
        duration=duration,
        user_categorical=categorical(users),
        user_continuous=continuous(users),
        item_categorical=categorical(items),
        item_continuous=item_continuous,
        item_text=tuple(items.text) if items else (),
        user_text=tuple(users.text) if users else (),
        has_users=users is not None,
        has_items=items is not None,
        positive=positive or "",
    )


def _default_positive(ev: EventSpec) -> str:
    for s in ev.signals:
        if s.name == "click":
            return "click"
    for s in ev.signals:
        if s.kind == "binary" or s.threshold is not None:
            return s.name
    return ""


def raw_schema_spec(
    events: str | Path, users: str | Path | None, items: str | Path | None, name: str = "raw-schema"
) -> DatasetSpec:
    """The spec of the project's raw schema (``configs/datasets/raw-schema.yaml``, see
    ``workflows/schema.py``) for three parquet paths: what the synthetic world and the MovieLens
    mapping write. ``users`` / ``items`` may be ``None`` (no such table)."""
    values = load_yaml(RAW_SCHEMA_SPEC.read_text())
    values["name"] = name
    values["events"]["path"] = str(events)
    for table, path in (("users", users), ("items", items)):
        if path is None:
            values.pop(table)
        else:
            values[table]["path"] = str(path)
    return spec_from_dict(values, where=RAW_SCHEMA_SPEC.name)
