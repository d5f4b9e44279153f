"""Read the files a dataset spec names (CSV, parquet, JSON lines; a file, a glob or a folder), check
them (``workflows/validate.py``) and map their roles to the pipeline's columns (``workflows/spec.py``).

``load_inputs(spec)`` returns the event log as a persisted dask collection (cudf partitions on a GPU
machine, pandas otherwise) in the pipeline's columns, and the user and item tables as computed frames
(small: read in memory, checked, then moved to cudf when the events are cudf). It raises
``DatasetError`` listing every defect before returning anything, and it writes nothing.

The event log is read through dask (``dask_cudf`` when cudf is installed): parquet with Merlin's
``Dataset`` on GPU and dask's own reader on CPU (which keeps pandas' nullable columns, nulls and all,
for the checks), CSV with every spec column read as text (so a column mixing numbers and text is
reported, not guessed), JSON lines as parsed. Parquet in the pipeline's own columns and types (the raw schema)
is passed through without any conversion.
"""

from __future__ import annotations

import datetime
import glob
from dataclasses import dataclass, field
from pathlib import Path

import dask
import numpy as np
import pandas as pd

from workflows.local_parquet import read_parquet
from workflows.spec import DatasetSpec, Layout, ListSpec, TableSpec, list_feature_names
from workflows.validate import (
    DatasetError,
    Defect,
    IdSpellings,
    Membership,
    ParseColumns,
    Rule,
    defects_of,
    duplicate_keys,
    merge_profiles,
    parsed_values,
    profile_frame,
    spelling_clash,
    unknown_references,
    valid_ids,
)

EXTENSIONS = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}


PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


def epoch_seconds(stamps):
    """Datetimes (pandas, cudf or numpy; naive ones as UTC) -> int64 whole seconds since 1970, in the
    unit the column holds: cudf (and pandas 2) keep a parquet file's own unit, ms or us, where pandas
    1.5 always converts to ns, and dividing every unit's integers by 1e9 made millisecond timestamps
    a million times too small, silently."""
    unit = getattr(stamps.dtype, "unit", None) or np.datetime_data(stamps.dtype)[0]
    if unit not in PER_SECOND:
        raise ValueError(f"timestamps in unit {unit!r}: expected one of {sorted(PER_SECOND)}")
    return (stamps.astype("int64") // PER_SECOND[unit]).astype("int64")


@dataclass
class Inputs:
    """What ``load_inputs`` read: the pipeline's event collection and attribute tables."""

    events: object  # dask collection in ``layout.event_columns``, persisted
    users: object  # frame in ``layout.user_columns`` (ids from the events when the spec has no table)
    items: object  # frame in ``layout.item_columns``
    layout: Layout
    warnings: list[Defect] = field(default_factory=list)  # counted, not fatal (checks: warn / drop)
    missing_users: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # policy warn
    missing_items: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    dropped: dict = field(default_factory=dict)  # policy drop: {"item": rows removed, ...}


def _collection_module():
    """dask_cudf on a machine with cudf, dask.dataframe otherwise (Merlin's own rule)."""
    from merlin.core.compat import dask_cudf

    if dask_cudf is not None:
        return dask_cudf
    import dask.dataframe as dd

    return dd


def find_files(spec: DatasetSpec, path: str) -> list[str]:
    """The files ``path`` names: a file, a glob or a folder (its files of known formats), sorted."""
    resolved = spec.resolve(path)
    if any(ch in resolved for ch in "*?["):
        return sorted(f for f in glob.glob(resolved) if Path(f).is_file())
    p = Path(resolved)
    if p.is_dir():
        return sorted(str(f) for f in p.iterdir() if f.is_file() and f.suffix.lower() in EXTENSIONS)
    return [str(p)] if p.exists() else []


def file_format(declared: str, file: str) -> str | None:
    return declared or EXTENSIONS.get(Path(file).suffix.lower())


def columns_of(file: str, fmt: str) -> list[str]:
    """Column names from the file's header (parquet schema, CSV header, the first JSON lines), a name the
    header repeats as often as it does (pandas renames a CSV's second ``ts`` to ``ts.1``)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(file).names)
    if fmt == "csv":
        header = pd.read_csv(file, header=None, nrows=1, dtype=str, keep_default_na=False)
        return [str(name) for name in header.iloc[0]] if len(header) else []
    return list(pd.read_json(file, lines=True, nrows=1000, dtype=False, convert_dates=False).columns)


# pandas holds a point in time as int64 nanoseconds since 1970: 1677-09-21 to 2262-04-11. A parquet timestamp
# in s, ms or us, or a date, may lie outside (9999-12-31, a warehouse's "no end"; 0001-01-01), and pyarrow's
# cast to pandas' nanoseconds raised on it, a traceback, before any check ran.
# Row groups whose statistics lie between these need no scan (a margin inside the bounds above).
_STATS_SAFE = (datetime.datetime(1678, 1, 1), datetime.datetime(2262, 1, 1))


def _ns_per_value(kind) -> int | None:
    """Nanoseconds per stored integer of a parquet column of arrow type ``kind``: None where the column
    holds no point in time pandas' nanoseconds could not (ns timestamps, or not a timestamp or date)."""
    import pyarrow as pa

    per_second = PER_SECOND["ns"]
    if pa.types.is_timestamp(kind):
        return per_second // PER_SECOND[kind.unit] if kind.unit != "ns" else None
    if pa.types.is_date32(kind):
        return 86_400 * per_second  # days
    if pa.types.is_date64(kind):
        return per_second // PER_SECOND["ms"]  # milliseconds
    return None


def _statistics_safe(statistics) -> bool:
    """A row group's min / max of a timestamp or date column lie inside pandas' nanoseconds (metadata only)."""
    if statistics is None or not statistics.has_min_max:
        return False
    try:
        low, high = statistics.min, statistics.max  # datetime / date; a year past 9999 does not convert
    except (ValueError, OverflowError):
        return False
    out = []
    for value in (low, high):
        if isinstance(value, datetime.datetime):
            if value.tzinfo is not None:
                value = value.astimezone(datetime.timezone.utc).replace(tzinfo=None)
        elif isinstance(value, datetime.date):
            value = datetime.datetime(value.year, value.month, value.day)
        else:
            return False
        out.append(value)
    return _STATS_SAFE[0] <= out[0] and out[1] <= _STATS_SAFE[1]


def instants_out_of_bounds(file: str, column: str) -> tuple[int, str] | None:
    """Rows of a parquet file's timestamp (s, ms, us) or date ``column`` before 1677-09-21 or after 2262-04-11
    (pandas' nanoseconds cannot hold them), and the first as ISO text; None when there are none. Row groups
    whose statistics lie inside are not read (the usual file: its footer only); others are read one at a
    time, that column alone, and compared in pyarrow, whichever backend then reads the file."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(file)
    per = _ns_per_value(parquet.schema_arrow.field(column).type)
    if per is None:
        return None
    meta = parquet.metadata
    leaf = next((j for j in range(meta.num_columns) if meta.schema.column(j).path == column), None)
    limit = (2**63 - 1) // per  # stored integers beyond +-limit overflow int64 nanoseconds
    rows, example = 0, None
    for group in range(meta.num_row_groups):
        if leaf is not None and _statistics_safe(meta.row_group(group).column(leaf).statistics):
            continue
        values = parquet.read_row_group(group, columns=[column]).column(0)
        numbers = values.cast(pa.int32() if pa.types.is_date32(values.type) else pa.int64()).cast(pa.int64())
        beyond = pc.or_(pc.greater(numbers, limit), pc.less(numbers, -limit))
        found = pc.sum(beyond).as_py() or 0
        if found and example is None:
            first = values.filter(beyond)[0]
            try:
                example = first.as_py().isoformat()
            except (ValueError, OverflowError):  # beyond Python's year 9999
                example = f"{numbers.filter(beyond)[0].as_py()} ({values.type})"
        rows += found
    return (rows, example) if rows else None


def _instants_in_bounds(df, columns: dict):
    """Per partition: ``columns`` (``{column: the parquet column's time zone, None where naive or a date}``),
    which pandas holds as Python objects (``datetime.date`` for a parquet date; every timestamp of a file
    ``instants_out_of_bounds`` found values in), as the datetimes the usual read gives (in that zone, else
    naive UTC; a date at its midnight). Each value pandas cannot hold is taken as 1970-01-01, so the other
    checks run on the rest (that defect is already reported, and nothing is written). The same dtype as the
    log's other files: a zoned column made naive here mixed zoned and naive datetimes in their
    concatenation, and every row of every file became "not a timestamp"."""
    df = df.copy()
    for column, zone in columns.items():
        values = df[column]
        stamps = pd.to_datetime(values, errors="coerce", utc=True)
        stamps = stamps.dt.tz_convert(zone) if zone else stamps.dt.tz_localize(None)
        epoch = pd.Timestamp(0, tz="UTC").tz_convert(zone) if zone else pd.Timestamp(0)
        df[column] = stamps.where(~(values.notna() & stamps.isna()), epoch)
    return df


def read_collection(file: str, fmt: str, columns: list[str], instants=(), out_of_bounds=False):
    """One file as a dask collection of ``columns`` (text for CSV, as parsed for JSON lines). ``instants``:
    columns read as points in time (the timestamp), where a parquet date column is midnight UTC of its day.
    ``out_of_bounds``: ``instants_out_of_bounds`` found some in the file (read on CPU without pandas' cast)."""
    module = _collection_module()
    if fmt == "parquet" and module.__name__ == "dask.dataframe":
        # Merlin's CPU engine casts pandas' nullable columns (Int64, a parquet written from them) to
        # numpy ones while reading, and a null among them crashed there ("cannot convert NA to
        # integer") before the checks could name it: the same reader without that cast.
        import pyarrow as pa
        import pyarrow.parquet as pq

        # ``out_of_bounds``: pyarrow's cast to nanoseconds raises on them, so every timestamp is read as
        # Python objects, then made datetimes. A parquet date (date32 / date64: a day, no time) reaches
        # pandas as objects too, ``datetime.date``, which the checks refused as "not a timestamp": it is
        # the day's midnight UTC, as ISO text "2026-03-01" is. cudf has no date type and reads it as
        # datetimes already, at the file's own unit.
        objects = {"arrow_to_pandas": {"timestamp_as_object": True}} if out_of_bounds else {}
        ddf = module.read_parquet(file, columns=columns, engine="pyarrow", **objects)[columns]
        schema = pq.read_schema(file)
        stamps = {
            c: getattr(schema.field(c).type, "tz", None)
            for c in dict.fromkeys(instants)
            if c in columns and (out_of_bounds or pa.types.is_date(schema.field(c).type))
        }
        if stamps:
            ddf = ddf.map_partitions(_instants_in_bounds, stamps, meta=_instants_in_bounds(ddf._meta, stamps))
        return ddf
    if fmt == "parquet":
        from merlin.io import Dataset

        return Dataset(file, engine="parquet").to_ddf()[columns]
    if fmt == "csv":
        return module.read_csv(file, dtype=str, usecols=columns)[columns]
    return module.read_json(file, lines=True, orient="records", dtype=False, convert_dates=False)[columns]


# pandas' default missing-value spellings ("NA", "null", "nan", ...): a CSV cell holding one is a missing
# value in a numeric column only. In an id, categorical, list or text column it is a value like any
# other ("NA" is Namibia, North America or an item's name): only an empty cell is missing there.
CSV_NA_SPELLINGS = (
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
    "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
)  # fmt: skip


def read_frame(file: str, fmt: str, columns: list[str], numbers=()) -> pd.DataFrame:
    """One (small) attribute-table file in memory; ``numbers``: its numeric columns (CSV: the only ones
    where "NA", "null", "nan" and the like are missing values)."""
    if fmt == "parquet":
        return read_parquet(file, columns=columns)
    if fmt == "csv":
        na = {c: list(CSV_NA_SPELLINGS) if c in numbers else [""] for c in columns}
        return pd.read_csv(file, dtype=str, usecols=columns, keep_default_na=False, na_values=na)[columns]
    return pd.read_json(file, lines=True, dtype=False, convert_dates=False)[columns]


def _structure(spec: DatasetSpec, table: str, path: str, fmt: str, wanted: dict[str, str], defects: list):
    """Files of one table and their formats; a defect for a glob matching nothing, an unknown format,
    an unreadable header or a spec column the file lacks. Returns ``[(file, format)]`` or None."""
    files = find_files(spec, path)
    if not files:
        defects.append(Defect(spec.resolve(path), "", f"no file matches {table}.path {path!r}"))
        return None
    out, ok = [], True
    for file in files:
        kind = file_format(fmt, file)
        if kind is None:
            defects.append(Defect(file, "", f"unknown file format; set {table}.format (csv, parquet or jsonl)"))
            ok = False
            continue
        try:
            header = columns_of(file, kind)
        except Exception as exc:  # an empty or unreadable file: name it and go on checking the rest
            defects.append(Defect(file, "", f"cannot be read as {kind}: {type(exc).__name__}: {exc}"))
            ok = False
            continue
        if kind == "jsonl" and not header and not Path(file).read_text().strip():
            continue  # no record at all: the file dask writes for an empty partition
        # A CSV read the first of two columns of one name, silently (pandas renames the second ``ts.1``);
        # the event log's parquet reader (dask) refused any repeated name with a traceback, whichever columns
        # were read. An attribute table's (pyarrow's read_table) reads the others: only a name read is refused.
        every = kind == "parquet" and table == "events"
        repeated = sorted({c for c in header if header.count(c) > 1 and (every or c in wanted)})
        for column in repeated:
            role = f" ({wanted[column]})" if column in wanted else ""
            message = f"appears {header.count(column)} times in the file's header{role}: give each column its own name"
            defects.append(Defect(file, column, message))
            ok = False
        for column, role in wanted.items():
            if column not in header:
                defects.append(
                    Defect(file, column, f"named in the spec ({role}) but not in the file; its columns: {header}")
                )
                ok = False
        out.append((file, kind))
    if ok and not out:
        what = "the event log" if table == "events" else f"the {table} table"
        defects.append(Defect(spec.resolve(path), "", f"{what} is empty (no rows)"))
        return None
    return out if ok else None


def _table_columns(table: TableSpec, name: str, id_column: str) -> dict[str, str]:
    wanted = {table.id or id_column: f"{name}.id"}
    for c in table.categorical:
        wanted.setdefault(c, f"{name}.categorical")
    for c in table.continuous:
        wanted.setdefault(c.column, f"{name}.continuous")
    for c in table.lists:
        wanted.setdefault(c.column, f"{name}.lists")
    for c in table.text:
        wanted.setdefault(c, f"{name}.text")
    if table.duration:
        wanted.setdefault(table.duration, f"{name}.duration")
    return wanted


def _table_rules(table: TableSpec, name: str, id_column: str) -> list[Rule]:
    rules = [Rule(table.id or id_column, "id", f"{name}.id")]
    numbers = [c.column for c in table.continuous] + ([table.duration] if table.duration else [])
    # A duration cannot be negative, nor can a log: true quantity: log1p of a value <= -1 is -inf / NaN,
    # and one such value made the normalised feature inf for every row.
    nonnegative = {c.column for c in table.continuous if c.log} | ({table.duration} if table.duration else set())
    for column in dict.fromkeys(numbers):
        role = f"{name}.duration" if column == table.duration else f"{name} continuous"
        rules.append(Rule(column, "number", role, low=0 if column in nonnegative else None))
    return rules


def _as_text(col: pd.Series) -> pd.Series:
    """A categorical / text column as strings, nulls kept (numbers without a spurious ``.0``)."""
    if col.dtype == object:
        if col.map(lambda v: isinstance(v, str) or v is None or v != v).all():
            return col
        return col.map(lambda v: None if v is None or v != v else _number_text(v))
    if col.dtype.kind == "f":
        return col.map(lambda v: None if v != v else _number_text(v))
    return col.astype(str)


def _number_text(v) -> str:
    if isinstance(v, float | np.floating) and float(v).is_integer():
        return str(int(v))
    return str(v)


def _elements(value, separator: str) -> list[str]:
    if value is None or (isinstance(value, float) and value != value):
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(separator) if part.strip()]
    return [str(v) for v in value if v is not None]


def list_positions(col: pd.Series, lst: ListSpec) -> pd.DataFrame:
    """A list column as ``max_length`` categorical columns (position k, or the path's first k levels)."""
    elements = col.map(lambda v: _elements(v, lst.separator))
    out = {}
    for k, name in enumerate(list_feature_names(lst)):
        if lst.prefix:
            out[name] = elements.map(lambda e, k=k: lst.separator.join(e[: k + 1]) if len(e) > k else None)
        else:
            out[name] = elements.map(lambda e, k=k: e[k] if len(e) > k else None)
    return pd.DataFrame(out, index=col.index)


def normalise_table(frame: pd.DataFrame, table: TableSpec, key: str, id_column: str, layout: Layout) -> pd.DataFrame:
    """An attribute table in the pipeline's columns (``layout.user_columns`` / ``item_columns``). Its ids and
    numbers are the values ``ParseColumns`` kept in ``frame`` for the checks where it did (else parsed now)."""
    out = pd.DataFrame({key: parsed_values(frame, table.id or id_column, "number").astype("int64")})
    for c in table.categorical:
        out[c] = _as_text(frame[c])
    for lst in table.lists:
        out = out.join(list_positions(frame[lst.column], lst))
    numbers = [c.column for c in table.continuous] + ([table.duration] if table.duration else [])
    for c in dict.fromkeys(numbers):
        values = frame[c] if frame[c].dtype.kind in "iu" else parsed_values(frame, c, "number").astype("float64")
        out["duration_seconds" if c == table.duration else c] = values
    for c in table.text:
        out[c] = _as_text(frame[c])
    columns = layout.user_columns if key == "user_id" else layout.item_columns
    return out[columns].reset_index(drop=True)


def _read_table(spec: DatasetSpec, name: str, key: str, id_column: str, defects: list):
    """Read, check and map one attribute table: ``(frame, file label, ids)``; on defects ``frame`` is None
    and ``ids`` the table's ids when its id column itself is sound (a bad cell of another column), so
    that its duplicate keys and the events' missing ids are reported in the same run, else None."""
    table: TableSpec = getattr(spec, name)
    label = spec.resolve(table.path)
    found = _structure(spec, name, table.path, table.format, _table_columns(table, name, id_column), defects)
    if found is None:
        return None, label, None
    columns = list(_table_columns(table, name, id_column))
    rules = _table_rules(table, name, id_column)
    frames, before = [], len(defects)
    parse = ParseColumns(rules)  # each text column parsed once: the checks, the duplicate ids and the mapping
    for file, kind in found:
        numbers = {rule.column for rule in rules if rule.kind == "number"}
        frame = parse(read_frame(file, kind, columns, numbers))
        defects.extend(defects_of(profile_frame(frame, rules), rules, file))
        frames.append(frame)
    if not sum(len(frame) for frame in frames):  # an empty file among others (an empty partition) is no defect
        defects.append(Defect(found[0][0] if len(found) == 1 else label, "", f"the {name} table is empty (no rows)"))
        return None, label, None
    id_col = table.id or id_column
    if any(d.column == id_col for d in defects[before:]):  # ids unreadable: no duplicate or membership check
        return None, label, None
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    # Files parsed differently (an integer column in one, text in another): a parsed column some file
    # lacks would be null for its rows; the whole column is parsed again instead, as it was before.
    lacking = [c for c in frame.columns if c not in columns and any(c not in f.columns for f in frames)]
    frame = frame.drop(columns=lacking) if lacking else frame
    ids = parsed_values(frame, id_col, "number")
    # checked even when another column has a bad cell: every defect is reported at once
    defects.extend(
        duplicate_keys(
            pd.DataFrame({id_col: ids}), id_col, found[0][0] if len(found) == 1 else label, written=frame[id_col]
        )
    )
    if len(defects) > before:
        return None, label, ids.astype("int64").to_numpy()
    return normalise_table(frame, table, key, id_column, spec.layout), label, None


class ToInternal:
    """Per-partition mapping of an event frame's source columns to the pipeline's (picklable)."""

    def __init__(self, plan: list[tuple[str, str, str]], positive: tuple[str, str, float | None], order: list[str]):
        self.plan, self.positive, self.order = plan, positive, list(order)

    def __call__(self, df):
        out = type(df)()
        for source, target, conversion in self.plan:
            col = df[source]  # its type decides; its values parsed are the checks' (``ParseColumns``)
            if conversion == "id" or conversion == "binary":
                number = (
                    col
                    if col.dtype.kind in "iub"
                    else parsed_values(df, source, "binary" if conversion == "binary" else "number")
                )
                out[target] = number.astype("int64")
            elif conversion == "continuous" and col.dtype.kind in "iu":
                # pandas' nullable Int64 (checked free of nulls) as the numpy integers the pipeline takes
                out[target] = col if isinstance(col.dtype, np.dtype) else col.astype(col.dtype.numpy_dtype)
            elif conversion == "continuous":
                out[target] = parsed_values(df, source, "number").astype("float64")
            elif conversion == "ts:iso":
                out[target] = epoch_seconds(parsed_values(df, source, "iso"))
            else:  # ts:<unit>
                factor = PER_SECOND[conversion.removeprefix("ts:")]
                if col.dtype.kind == "M":
                    out[target] = epoch_seconds(col)
                elif col.dtype.kind in "iu" and factor == 1:
                    out[target] = col.astype("int64")
                else:
                    out[target] = (parsed_values(df, source, "number") // factor).astype("int64")
        kind, name, threshold = self.positive
        if kind == "ones":
            out["click"] = out["timestamp"] * 0 + 1
        elif kind == "copy":
            out["click"] = (out[name] > 0).astype("int64")
        elif kind == "threshold":
            out["click"] = (out[name] >= threshold).astype("int64")
        return out[["user_id", "item_id", "timestamp", *self.order]]


def _event_plan(spec: DatasetSpec, layout: Layout):
    ev = spec.events
    plan = [
        (ev.user_id, "user_id", "id"),
        (ev.item_id, "item_id", "id"),
        (ev.timestamp, "timestamp", f"ts:{ev.timestamp_unit}"),
    ]
    for s in ev.signals:
        target = "watch_seconds" if s.name == ev.watch_time else s.name
        plan.append((s.source, target, s.kind))
    positive = ("none", "", None)
    if not layout.positive:  # no signal with a binary label: every event is an interaction
        positive = ("ones", "", None)
    elif layout.positive != "click":
        signal = next(s for s in ev.signals if s.name == layout.positive)
        positive = (
            ("copy", signal.name, None) if signal.kind == "binary" else ("threshold", signal.name, signal.threshold)
        )
    return plan, positive


def _is_identity(raw, plan, positive) -> bool:
    """True when the files already hold the pipeline's columns and types (the raw schema in parquet)."""
    if positive[0] != "none":
        return False
    for source, target, conversion in plan:
        dtype = raw.dtypes[source]
        if source != target or dtype != np.dtype("int64"):
            numpy = isinstance(dtype, np.dtype)  # not pandas' nullable Int64 / Float64
            if not (conversion == "continuous" and source == target and numpy and dtype.kind in "iuf"):
                return False
        if conversion.startswith("ts:") and conversion != "ts:s":
            return False
    return True


def _event_rules(spec: DatasetSpec) -> list[Rule]:
    ev = spec.events
    rules = [
        Rule(ev.user_id, "id", "events.user_id"),
        Rule(ev.item_id, "id", "events.item_id"),
        Rule(ev.timestamp, "timestamp", "events.timestamp", unit=ev.timestamp_unit),
    ]
    for s in ev.signals:
        low, high = s.min, s.max
        if s.name == ev.watch_time and low is None:
            low = 0  # seconds watched cannot be negative (the raw schema declares min: 0)
        rules.append(Rule(s.source, s.kind, f"signal {s.name!r}", low=low, high=high))
    return rules


def _spelling_clashes(raw, rule: Rule, file: str) -> list[Defect]:
    """Ids of the event log written two ways that read as one number ("7" and "007"): as integers they
    would be one id, merging two users (items). Distinct (number, text) pairs are reduced in dask, so
    a log of consistently zero-padded ids costs one pass and finds nothing."""
    pairs = raw.map_partitions(IdSpellings(rule.column), meta=IdSpellings(rule.column)(raw._meta)).drop_duplicates()
    pairs = pairs.persist()
    counts = pairs["number"].value_counts()
    clashing = counts[counts > 1].compute()
    if not len(clashing):
        return []
    numbers = np.sort(
        np.asarray(clashing.index.values_host if hasattr(clashing.index, "values_host") else clashing.index)
    )
    texts = pairs[pairs["number"] == int(numbers[0])]["text"].compute()
    texts = texts.to_pandas() if hasattr(texts, "to_pandas") else texts
    rows_task = dask.delayed(_rows_of, pure=True)
    rows = sum(dask.compute(*[rows_task(p, rule.column, numbers) for p in raw.to_delayed()]))
    role = f" ({rule.role})" if rule.role else ""
    return [spelling_clash(rule.column, role, file, rows, list(texts), int(numbers[0]), len(numbers))]


def _rows_of(df, column: str, numbers: np.ndarray) -> int:
    """Events of one partition (pandas or cudf) whose id reads as one of ``numbers``."""
    num = parsed_values(df, column, "number")
    return int((valid_ids(num) & num.isin(numbers)).sum())


def _like_events(frame, events):
    """An attribute frame in the events' backend (cudf when the events are cudf)."""
    if frame is None or isinstance(events._meta, pd.DataFrame):
        return frame
    import cudf

    return cudf.from_pandas(frame)


def load_inputs(spec: DatasetSpec) -> Inputs:
    """Read and check everything the spec names; raise ``DatasetError`` with every defect found."""
    layout = spec.layout
    ev = spec.events
    defects: list[Defect] = []
    users = items = None
    labels, known = {}, {}  # known: the ids of a table with defects whose id column is sound
    if spec.users is not None:
        users, labels["user"], known["user"] = _read_table(spec, "users", "user_id", ev.user_id, defects)
    if spec.items is not None:
        items, labels["item"], known["item"] = _read_table(spec, "items", "item_id", ev.item_id, defects)

    wanted = {ev.user_id: "events.user_id", ev.item_id: "events.item_id", ev.timestamp: "events.timestamp"}
    for s in ev.signals:
        wanted.setdefault(s.source, f"events.signals {s.name!r}")
    found = _structure(spec, "events", ev.path, ev.format, wanted, defects)
    if found is None:
        raise DatasetError(defects)

    columns = list(wanted)
    # Before the read: a parquet timestamp past 2262 (9999-12-31) made pandas' reader raise, naming nothing.
    beyond = {file: instants_out_of_bounds(file, ev.timestamp) for file, kind in found if kind == "parquet"}
    beyond = {file: found_rows for file, found_rows in beyond.items() if found_rows}
    parts = [
        read_collection(file, kind, columns, instants=[ev.timestamp], out_of_bounds=file in beyond)
        for file, kind in found
    ]
    raw = parts[0] if len(parts) == 1 else _collection_module().concat(parts)
    rules = _event_rules(spec)
    # Read once and each text column parsed once: the checks and the mapping below both read the parsed
    # values (the mapping parsed every column a second time: 27-35% of the time at 3.8M events).
    raw = raw.map_partitions(ParseColumns(rules), meta=ParseColumns(rules)(raw._meta)).persist()
    memberships = []
    for table, key, column, frame in (("user", "user_id", ev.user_id, users), ("item", "item_id", ev.item_id, items)):
        ids = np.asarray(frame[key]) if frame is not None else known.get(table)
        if ids is not None:
            memberships.append(Membership(column, ids, table))
    profile_task = dask.delayed(profile_frame, pure=True)
    profiles = dask.compute(*[profile_task(p, rules, memberships) for p in raw.to_delayed()])
    start, per_file = 0, []
    for (file, _), part in zip(found, parts):
        merged = merge_profiles(list(profiles[start : start + part.npartitions]))
        start += part.npartitions
        per_file.append((file, merged))
        defects.extend(defects_of(merged, rules, file))
        if file in beyond:
            rows, example = beyond[file]
            message = (
                "is before 1677-09-21 or after 2262-04-11, beyond the points in time the pipeline holds (nanoseconds"
                " since 1970 in int64), such as a placeholder date (9999-12-31 for 'no end'): drop or null those"
                " events (events.timestamp)"
            )
            defects.append(Defect(file, ev.timestamp, message, rows, example))
    total = merge_profiles([p for _, p in per_file])
    if total["rows"] == 0:
        defects.append(Defect(spec.resolve(ev.path), "", "the event log is empty (no rows)"))
    label = found[0][0] if len(found) == 1 else spec.resolve(ev.path)
    for rule in rules[:2]:  # the id columns; a second pass only where some id is not written plainly
        if (rule.column, "spelling") in total["issues"]:
            defects.extend(_spelling_clashes(raw, rule, label))

    warnings: list[Defect] = []
    policies = {"user": spec.checks.missing_users, "item": spec.checks.missing_items}
    missing = set()
    for file, merged in per_file:
        for table, defect in unknown_references(merged, memberships, file, labels):
            missing.add(table)
            if policies[table] == "error":
                defect.message += f" (checks.missing_{table}s: error; warn or drop to go on)"
                defects.append(defect)
            else:
                warnings.append(defect)
    if defects:
        raise DatasetError(defects)

    plan, positive = _event_plan(spec, layout)
    if _is_identity(raw, plan, positive):
        events = raw[layout.event_columns]
    else:
        convert = ToInternal(plan, positive, layout.signals)
        meta = convert(raw._meta)
        events = raw.map_partitions(convert, meta=meta).persist()

    out = Inputs(events, users, items, layout, warnings)
    for table, key, frame in (("user", "user_id", users), ("item", "item_id", items)):
        if frame is None or table not in missing:
            continue
        known = np.asarray(frame[key])
        if policies[table] == "drop":
            from workflows.rows import IsIn, filter_rows

            before = int(events.shape[0].compute())
            events = filter_rows(events, IsIn(key, known)).persist()
            out.dropped[table] = before - int(events.shape[0].compute())
            if out.dropped[table] == before:  # the pipeline's next step failed on the empty log, naming nothing
                column = ev.user_id if table == "user" else ev.item_id
                message = f"checks.missing_{table}s: drop removes every event: none of their {table}s is in the "
                message += f"{table} table {labels[table]} (is {table}s.id the right column?)"
                raise DatasetError([Defect(spec.resolve(ev.path), column, message, before)])
        else:
            ids = events[key][~events[key].isin(known)].unique().compute()
            ids = ids.values_host if hasattr(ids, "values_host") else np.asarray(ids)
            setattr(out, f"missing_{table}s", np.sort(ids.astype(np.int64)))
    out.events = events
    if users is None:
        users = events[["user_id"]].drop_duplicates().compute().sort_values("user_id").reset_index(drop=True)
    if items is None:
        items = events[["item_id"]].drop_duplicates().compute().sort_values("item_id").reset_index(drop=True)
    out.users, out.items = _like_events(users, events), _like_events(items, events)
    return out


def with_placeholders(table, ids: np.ndarray, key: str):
    """``table`` plus one row per id in ``ids`` with every attribute null (policy ``warn``)."""
    if len(ids) == 0:
        return table
    from merlin.core.dispatch import concat

    extra = type(table)({key: ids.astype("int64")})
    return concat([table, extra], ignore_index=True)
