"""Validation before any work: every defect of an input, collected first, raised as one error.

Each ``Defect`` names the file, the column, how many rows and an example value; ``DatasetError``
carries all of them, so one run shows everything to fix, and the pipeline raises it before it writes
anything (``scripts/prepare_data.py`` exits with code 2). What is checked:

    structure   a file or glob that matches nothing, a column the spec names that the file lacks or
                names twice, an empty table
    ids         null, negative, not an integer, beyond int64, 2**53 or more in a column read as floats (inexact),
                ids of mixed types (numbers and text in one column),
                duplicate keys in an attribute table, two spellings of one id in the event log ("7" and "007",
                "1e3" and "1000": read as numbers they would become one id)
    timestamps  null or unparseable (for the declared unit), negative, values far beyond the unit's
                range (seconds that are really milliseconds), a whole log before 1990 that a coarser unit puts
                after it (milliseconds that are really seconds); a column of dates is taken as its instants, and
                a parquet one before 1677-09-21 or after 2262-04-11 is refused (reader.instants_out_of_bounds)
    signals     null or not a number (or infinite), a binary signal not 0/1 (text true / false is 1 / 0), a value
                outside the declared range
    attributes  a continuous column that is not a number (or infinite); a negative duration or log: true value
    references  events whose item (user) the item (user) table lacks: an error, or with
                ``checks.missing_items: warn`` / ``drop`` a counted warning

The checks on the event log run in one pass (``profile_frame`` per partition, on pandas or cudf
partitions alike, combined with ``merge_profiles``); attribute tables are small and checked in memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Ids from here on are not all exact as floats (2**53 + 1 reads as 2**53): refused in a float column.
EXACT_FLOAT = 2.0**53
# A timestamp beyond this many seconds (year ~5138) is in the wrong unit.
MAX_SECONDS = 100_000_000_000
# A log whose every event falls before 1990 in the declared unit, but between 1990 and a year from now
# in a coarser one, holds that coarser unit (seconds declared as ms put every event in January 1970).
PLAUSIBLE_FROM = 631_152_000  # 1990-01-01 in seconds

# ISO 8601 text: a date (2026, 2026-03, 2026-03-01 or 20260301), then optionally a time (T or a
# space, hours, minutes, seconds, a fraction) and a UTC offset (Z, +01, +0100, +01:00).
ISO_8601 = re.compile(
    r"\s*\d{4}(-?\d{2}(-?\d{2}([T ]\d{2}(:?\d{2}(:?\d{2}([.,]\d+)?)?)?(Z|[+-]\d{2}(:?\d{2})?)?)?)?)?\s*",
    re.I,
)


@dataclass
class Defect:
    """One problem with the input data."""

    file: str
    column: str
    message: str
    rows: int | None = None
    example: Any = None

    def __str__(self) -> str:
        where = f"{self.file}: column {self.column!r}" if self.column else self.file
        text = f"{where}: {self.message}"
        if self.rows is not None:
            text += f" ({self.rows} row{'s' if self.rows != 1 else ''}"
            text += f", e.g. {self.example!r})" if self.example is not None else ")"
        return text

    def to_dict(self) -> dict:
        example = self.example.item() if isinstance(self.example, np.generic) else self.example
        return {
            "file": self.file,
            "column": self.column,
            "message": self.message,
            "rows": self.rows,
            "example": example,
        }


class DatasetError(ValueError):
    """The input has defects; nothing was written. ``defects`` lists them all."""

    def __init__(self, defects: list[Defect]):
        self.defects = list(defects)
        lines = "\n".join(f"  - {d}" for d in self.defects)
        super().__init__(f"{len(self.defects)} defect(s) in the input data; nothing was written:\n{lines}")


@dataclass(frozen=True)
class Rule:
    """What to check in one source column. ``kind``: id | timestamp | binary | continuous (a signal)
    | number (a continuous attribute: may be missing, must be a number when present)."""

    column: str
    kind: str
    role: str = ""  # how the spec calls it, for messages (events.user_id, signal 'view', ...)
    unit: str = "s"  # timestamps
    low: float | None = None  # declared range (continuous signals)
    high: float | None = None


@dataclass
class Membership:
    """Event ids that must exist in an attribute table (``known``: its ids, int64)."""

    column: str
    known: np.ndarray
    table: str  # "item" / "user"
    code: str = field(default="unknown")


def _module(series):
    import pandas as pd

    if isinstance(series, pd.Series):
        return pd
    import cudf  # a cudf partition (GPU machine)

    return cudf


def _is_numeric(series) -> bool:
    return series.dtype.kind in "iufb"


def as_number(series):
    """The column as numbers; unparseable text becomes null (pandas or cudf alike)."""
    if _is_numeric(series):
        if series.dtype.kind != "b":
            return series
        # pandas' nullable boolean may hold NA, which int64 cannot: Int64 keeps it (a null, reported as such)
        return series.astype("int64" if isinstance(series.dtype, np.dtype) else "Int64")
    return _module(series).to_numeric(series, errors="coerce")


def as_binary(series):
    """A binary signal as numbers: ``as_number``, and text "true" / "false" (any case) as 1 / 0, as parquet and
    JSON booleans are read (pandas or cudf alike). Other words ("yes") stay unparseable."""
    number = as_number(series)
    if _is_numeric(series):
        return number
    word = series.astype("str").str.strip().str.lower()
    number = number.where(~(word == "true").fillna(False), 1)
    return number.where(~(word == "false").fillna(False), 0)


def parse_iso(series):
    """ISO 8601 text -> tz-naive UTC datetimes; anything else (numbers included) -> null."""
    mod = _module(series)
    if series.dtype.kind == "M":
        return series
    if _is_numeric(series):
        return mod.to_datetime(series.where(series != series), errors="coerce")  # all null
    if mod.__name__ == "pandas" and series.dtype.kind == "O":  # object, or pandas' string dtypes
        # pandas also reads "now", "today" and a bare time ("12:30") as the run's date, and "03/01/2026"
        # month first: only text in ISO 8601's shape is parsed.
        series = series.where(series.map(lambda v: isinstance(v, str) and ISO_8601.fullmatch(v) is not None))
    if mod.__name__ != "pandas":
        # cudf.to_datetime infers one format from the first row and casts every row with it: rows of another
        # shape get undefined values, not nulls; a null first row or the text "None" raises; its
        # errors="coerce" turns the whole column into one NaT and utc=True is not implemented.
        return parse_iso_parts(series, mod)
    out = mod.to_datetime(series, errors="coerce", utc=True)
    return out.dt.tz_localize(None) if getattr(out.dt, "tz", None) is not None else out


# ``ISO_8601`` flattened into capture groups, for a regex engine without backreferences or flags (cudf):
# year, date separator, month, date separator, day, hours, time separator, minutes, time separator,
# seconds, fraction, offset sign, offset hours, offset minutes. Non-capturing groups keep its nesting.
ISO_8601_PARTS = (
    r"^\s*([0-9]{4})(?:(-?)([0-9]{2})(?:(-?)([0-9]{2})(?:[Tt ]([0-9]{2})(?:(:?)([0-9]{2})(?:(:?)([0-9]{2})"
    r"(?:[.,]([0-9]+))?)?)?(?:[Zz]|([+-])([0-9]{2})(?::?([0-9]{2}))?)?)?)?)?\s*$"
)


def parse_iso_parts(series, mod):
    """ISO 8601 text -> tz-naive UTC datetimes[ns] with string operations only (pandas or cudf): each row is
    split by ``ISO_8601_PARTS``, rebuilt as "%Y-%m-%d %H:%M:%S", parsed with that one explicit format, checked
    by formatting it back (a 30 February or an hour 24 does not survive), then its fraction added and its
    offset taken off. Anything else -> null. The parse for cudf partitions (``parse_iso``)."""
    extracted = series.astype("str").str.extract(ISO_8601_PARTS, expand=True)
    names = ["y", "s1", "mo", "s2", "d", "h", "s3", "mi", "s4", "sec", "frac", "sign", "oh", "om"]
    separators = {"s1", "s2", "s3", "s4"}
    # cudf 23.08's extract gives "" for a group that took no part in the match, where pandas gives null (libcudf
    # regex.inl: regexec returns the unset range (-1, -1) as a match, extract.cu turns it into ""). Every group but
    # the separators matches at least one character, so "" there means absent; a separator takes part exactly
    # when the group after it does, and is judged only then.
    parts = {}
    for i, name in enumerate(names):
        col = extracted[extracted.columns[i]]
        parts[name] = col if name in separators else col.where(col != "")
    ok = parts["y"].notnull()
    # one date style (2026-03-01 or 20260301, not 2026-0301 nor 202603), one time style (10:00:05 or 100005)
    has_d = parts["d"].notnull()
    date_sep = (has_d & (parts["s1"] == parts["s2"]).fillna(False)) | (~has_d & (parts["s1"] == "-").fillna(False))
    ok &= parts["mo"].isnull() | date_sep
    ok &= parts["sec"].isnull() | (parts["s3"] == parts["s4"]).fillna(False)
    ok &= (parts["oh"].fillna("00") < "24") & (parts["om"].fillna("00") < "60")
    text = (
        parts["y"] + "-" + parts["mo"].fillna("01") + "-" + parts["d"].fillna("01") + " "
        + parts["h"].fillna("00") + ":" + parts["mi"].fillna("00") + ":" + parts["sec"].fillna("00")
    )  # fmt: skip
    text = text.where(ok)
    fmt = "%Y-%m-%d %H:%M:%S"
    stamps = mod.to_datetime(text, format=fmt, **({"errors": "coerce"} if mod.__name__ == "pandas" else {}))
    ok &= (stamps.dt.strftime(fmt) == text).fillna(False)  # values the cast made up fail to round-trip
    nanos = parts["frac"].fillna("").str.slice(0, 9).str.pad(9, side="right", fillchar="0").astype("int64")
    minutes = parts["oh"].fillna("00").astype("int64") * 60 + parts["om"].fillna("00").astype("int64")
    minutes = minutes.where(~(parts["sign"] == "-").fillna(False), -minutes)
    shift = (nanos - minutes * 60_000_000_000).astype("timedelta64[ns]")
    return (stamps.astype("datetime64[ns]") + shift).where(ok)


def parsed_name(column: str, kind: str) -> str:
    """The column in which ``ParseColumns`` keeps ``column`` parsed: ``kind`` "number" (``as_number``),
    "binary" (``as_binary``) or "iso" (``parse_iso``)."""
    return f"__parsed_{kind}__:{column}"


def _parse_kind(rule: Rule, col) -> str | None:
    """How the checks (and the mapping to the pipeline's columns) read ``col``: "iso", "binary", "number",
    or None where the column is taken as it is (dates, numbers: ``as_number`` returns them unchanged)."""
    if rule.kind == "timestamp" and rule.unit == "iso":
        return "iso"
    if (rule.kind == "timestamp" and col.dtype.kind == "M") or (_is_numeric(col) and col.dtype.kind != "b"):
        return None
    return "binary" if rule.kind == "binary" else "number"


class ParseColumns:
    """Per partition (picklable): the frame plus every rule's column parsed once (text ids, numbers and
    ISO dates), under ``parsed_name``. ``profile_frame`` checks these values and ``reader.ToInternal``
    maps them: parsing text is most of reading a spec's log, and it was done twice. pandas or cudf."""

    def __init__(self, rules: list[Rule]):
        self.rules = list(rules)

    def __call__(self, df):
        out = df.copy(deep=False)
        for rule in self.rules:
            col = df[rule.column]
            kind = _parse_kind(rule, col)
            if kind is not None and parsed_name(rule.column, kind) not in out.columns:
                out[parsed_name(rule.column, kind)] = _parse(col, kind)
        return out


def _parse(col, kind: str):
    return parse_iso(col) if kind == "iso" else as_binary(col) if kind == "binary" else as_number(col)


def parsed_values(df, column: str, kind: str):
    """``df[column]`` parsed (``kind``: "number", "binary" or "iso"): the values ``ParseColumns`` kept, or
    parsed now."""
    name = parsed_name(column, kind)
    if name in df.columns:
        return df[name]
    return _parse(df[column], kind)


def _first(values):
    """First element of a (pandas or cudf) series as a plain Python value."""
    value = values.iloc[0]
    return value.item() if hasattr(value, "item") else value


def _add(out: dict, column: str, code: str, mask, values=None) -> None:
    """Count the rows of ``mask``; keep the first offending value of ``values`` as the example."""
    n = int(mask.sum())
    if n:
        out[(column, code)] = [n, None if values is None else _first(values[mask])]


# ``infer_dtype`` results whose values are all of one kind for ``_mixed_types`` (ints and floats are both numbers).
_ONE_KIND = frozenset({"string", "integer", "floating", "mixed-integer-float", "empty"})


def _mixed_types(series) -> int:
    """Rows whose Python type differs from the column's most common type (pandas object columns)."""
    if series.dtype != object or _module(series).__name__ != "pandas":
        return 0
    import pandas as pd

    # One type for every value (a CSV column read as text is all str): nothing is mixed. Checked in C; the
    # per-value Python below cost ~1/6 of reading a million-event log through a spec.
    if pd.api.types.infer_dtype(series, skipna=True) in _ONE_KIND:
        return 0
    kinds = series.dropna().map(lambda v: "number" if isinstance(v, int | float | np.number) else type(v).__name__)
    if kinds.nunique() <= 1:
        return 0
    return int(len(kinds) - kinds.value_counts().iloc[0])


def profile_frame(df, rules: list[Rule], memberships: list[Membership] = ()) -> dict:
    """Counts (and a first example) of every defect in one frame: ``{"rows": n, "issues": {...}}``."""
    issues: dict = {}
    out = {"rows": int(len(df)), "issues": issues, "range": {}}
    numbers = {}  # each column parsed once: a membership check reads the id column its rule parsed
    for rule in rules:
        col = df[rule.column]
        # A numpy integer column holds no null; pandas' nullable Int64 (a parquet written from it) may.
        integer_dtype = col.dtype.kind in "iu" and isinstance(col.dtype, np.dtype)
        present = None if integer_dtype else col.notna()
        if present is not None and rule.kind != "number":  # an attribute may be missing; an id may not
            _add(issues, rule.column, "null", ~present)
        if rule.kind == "timestamp" and rule.unit == "iso":
            parsed = parsed_values(df, rule.column, "iso")
            _add(issues, rule.column, "timestamp", present & parsed.isna(), col)
            import pandas as pd

            _add(issues, rule.column, "negative", parsed < pd.Timestamp(0, tz=parsed.dt.tz), col)  # before 1970
            continue
        if rule.kind == "timestamp" and col.dtype.kind == "M":
            # A column of dates (a parquet timestamp column) holds instants whatever the declared
            # unit: the reader takes them as they are. As numbers they are nanoseconds, which the
            # unit's range check would refuse as "too large" for s, ms or us.
            import pandas as pd

            _add(issues, rule.column, "negative", col < pd.Timestamp(0, tz=col.dt.tz), col)  # before 1970
            continue
        num = col if integer_dtype else parsed_values(df, rule.column, "binary" if rule.kind == "binary" else "number")
        numbers[rule.column] = num
        if present is not None:
            _add(issues, rule.column, _not_number_code(rule), present & num.isna(), col)
        if rule.kind == "id":
            if not integer_dtype:
                parsed = num.notna()
                fractional = parsed & (num != num.round())
                _add(issues, rule.column, "fractional", fractional, col)
                issues.setdefault((rule.column, "parsed"), [int(parsed.sum()), None])
                mixed = _mixed_types(col)
                if mixed:
                    issues[(rule.column, "mixed_types")] = [mixed, _first(col[col.map(lambda v: isinstance(v, str))])]
                if not _is_numeric(col):
                    # Text that is not an integer's plain spelling ("007", "7.0", "1e3", " 7"): not a defect by
                    # itself (ids padded alike are fine), but the sign that two spellings may read as one
                    # id; ``reader._spelling_clashes`` looks for those, only when this count is not 0.
                    ok = valid_ids(num)
                    text = col[ok].astype(str)
                    _add(issues, rule.column, "spelling", text != num[ok].astype("int64").astype(str), text)
            _add(issues, rule.column, "negative", num < 0, col)
            # Beyond int64 an id would wrap on the way to int64 (2**64 - 1 became -1): refused.
            _add(issues, rule.column, "beyond_int64", (num > 0) & ~fits_int64(num), col)  # below 0: "negative"
            if num.dtype.kind == "f":
                # Floats hold every integer only below 2**53: one decimal, exponent or empty cell made a text
                # column float, and 9007199254740993 silently became id 9007199254740992 (another user's).
                _add(issues, rule.column, "inexact", (num >= EXACT_FLOAT) & fits_int64(num), col)
        elif rule.kind == "timestamp":
            _add(issues, rule.column, "negative", num < 0, col)
            _add(issues, rule.column, "too_large", num >= MAX_SECONDS * _unit_factor(rule.unit), col)
            # Of the present values only: an empty or all-null partition has no range (its min is NaN, or
            # pd.NA / cudf's NA for a nullable column, which no comparison can test).
            valid = num[num.notna()]
            if len(valid):
                out["range"][rule.column] = [float(valid.min()), float(valid.max())]
        elif rule.kind == "binary":
            _add(issues, rule.column, "not_binary", num.notna() & (num != 0) & (num != 1), col)
        if rule.kind in ("continuous", "number"):
            # "inf" parses as a number; one infinite value makes a normalised feature inf for every row.
            _add(issues, rule.column, "not_finite", (num == np.inf) | (num == -np.inf), col)
            if rule.low is not None:
                _add(issues, rule.column, "below", num < rule.low, col)
            if rule.high is not None:
                _add(issues, rule.column, "above", num > rule.high, col)
    for m in memberships:
        col = df[m.column]
        ids = col if col.dtype.kind in "iu" else numbers.get(m.column)
        ids = as_number(col) if ids is None else ids
        valid = ids.notna() & (ids >= 0)  # a null or negative id is its own defect, not an unknown one
        _add(issues, m.column, f"{m.code}_{m.table}", valid & ~ids.isin(m.known), col)
    return out


def valid_ids(num):
    """Which of the numbers ``num`` (an id column as numbers, pandas or cudf) are usable ids: present,
    whole, non-negative and within int64."""
    return num.notna() & (num >= 0) & fits_int64(num) & (num == num.round())


class IdSpellings:
    """Per partition (picklable): the text and the number of each usable id of ``column``, one row per
    distinct pair. Numbers are taken from the whole partition, as ``reader.ToInternal`` takes them."""

    def __init__(self, column: str):
        self.column = column

    def __call__(self, df):
        col = df[self.column]
        num = parsed_values(df, self.column, "number")
        ok = valid_ids(num)
        out = type(df)()
        out["number"] = num[ok].astype("int64")
        out["text"] = col[ok].astype(str)
        return out.drop_duplicates()


def two_spellings(texts: list, number: int) -> tuple[str, str]:
    """Two of ``texts``, spellings of the id ``number``, to name in a message: the plain one first."""
    first, second = sorted(texts, key=lambda t: (t != str(number), t))[:2]
    return first, second


def spelling_clash(column: str, role: str, file: str, rows: int, texts: list, number: int, numbers: int) -> Defect:
    """Two spellings of one id ("7" and "007") that would become one id: the defect naming them."""
    first, second = two_spellings(texts, number)
    message = (
        f"ids written differently that read as the same number{role}: {first!r} and {second!r} both become id"
        f" {number}, which would merge two ids into one ({numbers} id{'s' if numbers != 1 else ''} written more"
        " than one way). Write each id one way everywhere (all zero-padded or none), or map text ids to"
        " integers yourself before: the spec has no text-id type, ids are read as integers"
    )
    return Defect(file, column, message, rows, second)


def fits_int64(values):
    """Which of the numbers ``values`` (a pandas or cudf series) an int64 holds, compared without
    rounding (NaN: False). Beyond it an id wraps on the way to int64: 2**64 - 1 becomes -1."""
    kind = values.dtype.kind
    if kind == "u":
        return values <= np.iinfo(np.int64).max
    if kind == "i":
        return values >= np.iinfo(np.int64).min  # every value
    return (values >= -(2.0**63)) & (values < 2.0**63)  # floats: 2**63 - 1 rounds to 2**63


def _unit_factor(unit: str) -> int:
    return {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}.get(unit, 1)


def merge_profiles(profiles: list[dict]) -> dict:
    """Combine per-partition profiles: counts add up, the first example wins."""
    out = {"rows": 0, "issues": {}, "range": {}}
    for p in profiles:
        out["rows"] += p["rows"]
        for column, (low, high) in p.get("range", {}).items():
            was = out["range"].get(column, [low, high])
            out["range"][column] = [min(was[0], low), max(was[1], high)]
        for key, (n, example) in p["issues"].items():
            if key in out["issues"]:
                out["issues"][key][0] += n
                if out["issues"][key][1] is None:
                    out["issues"][key][1] = example
            else:
                out["issues"][key] = [n, example]
    return out


MESSAGES = {
    "null": "is empty (null)",
    "not_number": "is not a number",
    "fractional": "is not an integer id",
    "negative": "is negative",
    "not_binary": "is not 0 or 1 (a binary signal)",
    "beyond_int64": "is beyond int64 (ids must fit the INT64 that requests and responses carry)",
    "not_finite": "is not a finite number (inf)",
    "inexact": (
        "is 2**53 or more in a column read as floating point (a decimal, an exponent or an empty cell elsewhere in"
        " it, or a float column), where it cannot be read exactly and could become another id: write ids as"
        " plain integers"
    ),
}


# Issues are kept per (column, code), and signals may share a column (spec.py): a code only some kinds of rule
# record is reported only under a rule of those kinds, not under each signal reading the column.
_RECORDED_BY = {
    "not_binary": ("binary",),
    "not_finite": ("continuous", "number"),
    "below": ("continuous", "number"),
    "above": ("continuous", "number"),
}


def _not_number_code(rule: Rule) -> str:
    """The code of ``rule``'s unparseable values: a binary signal's own (it reads text true / false, which a
    continuous signal sharing its column refuses)."""
    return "binary_not_number" if rule.kind == "binary" else "not_number"


def defects_of(profile: dict, rules: list[Rule], file: str) -> list[Defect]:
    """The defects a merged profile shows, one per (column, kind)."""
    issues = profile["issues"]
    out = []
    for rule in rules:
        c = rule.column
        role = f" ({rule.role})" if rule.role else ""

        def defect(message, code, _c=c, _kind=rule.kind):
            if _kind not in _RECORDED_BY.get(code, (_kind,)):
                return  # another signal's issue in a shared column
            n, example = issues[(_c, code)]
            out.append(Defect(file, _c, message, n, example))

        for code in ("null", "negative", "fractional", "not_binary", "beyond_int64", "inexact", "not_finite"):
            if (c, code) in issues:
                defect(f"{MESSAGES[code]}{role}", code)
        if (c, _not_number_code(rule)) in issues:
            if rule.kind == "id":
                parsed = issues.get((c, "parsed"), [0, None])[0]
                if parsed:
                    defect(f"ids of mixed types{role}: numbers and text in one column", "not_number")
                else:
                    defect(f"is not an integer id{role}; ids must be integers (serving takes INT64 ids)", "not_number")
            elif rule.kind == "timestamp":
                defect(f"is not a timestamp in {rule.unit}{role}", "not_number")
            elif rule.kind == "binary":
                message = f"{MESSAGES['not_number']}{role}: a binary signal is 0 or 1 (or true / false)"
                defect(message, "binary_not_number")
            else:
                defect(f"{MESSAGES['not_number']}{role}", "not_number")
        if (c, "mixed_types") in issues:
            defect(f"ids of mixed types{role}: numbers and text values in one column", "mixed_types")
        if (c, "timestamp") in issues:
            defect(f"is not an ISO 8601 timestamp{role}", "timestamp")
        if (c, "too_large") in issues:
            defect(
                f"is too large for a timestamp in {rule.unit}{role}: is events.timestamp_unit right (s, ms, us, ns)?",
                "too_large",
            )
        if rule.kind == "timestamp" and c in profile.get("range", {}) and not out_of_range(out, c):
            wrong = _wrong_unit(*profile["range"][c], rule.unit)
            if wrong:
                latest = profile["range"][c][1]
                out.append(Defect(file, c, wrong, profile["rows"], int(latest) if latest.is_integer() else latest))
        if (c, "below") in issues:
            defect(f"is below the declared minimum {rule.low}{role}", "below")
        if (c, "above") in issues:
            defect(f"is above the declared maximum {rule.high}{role}", "above")
    return out


def out_of_range(defects: list[Defect], column: str) -> bool:
    """A defect already found for ``column`` (the unit check reads a range only of valid values)."""
    return any(d.column == column for d in defects)


def _wrong_unit(low: float, high: float, unit: str) -> str | None:
    """A message when every timestamp is before 1990 in ``unit`` but in [1990, a year from now] in a
    coarser unit (the one the column holds), else None."""
    import time

    factor = _unit_factor(unit)
    if unit not in ("s", "ms", "us", "ns") or high / factor >= PLAUSIBLE_FROM:
        return None
    latest = time.time() + 366 * 86_400
    for coarser in ("s", "ms", "us", "ns"):
        f = _unit_factor(coarser)
        if f < factor and low / f >= PLAUSIBLE_FROM and high / f <= latest:
            return (
                f"every timestamp is before 1990 read in {unit} (events.timestamp_unit); read in {coarser} they fall"
                f" between 1990 and now: is events.timestamp_unit {coarser}?"
            )
    return None


def unknown_references(profile: dict, memberships: list[Membership], file: str, tables: dict) -> list:
    """``[(table, Defect)]`` for events referring to ids an attribute table lacks (``tables``:
    "item" -> the table's file)."""
    out = []
    for m in memberships:
        key = (m.column, f"{m.code}_{m.table}")
        if key in profile["issues"]:
            n, example = profile["issues"][key]
            message = f"refers to {m.table}s missing from the {m.table} table {tables.get(m.table, '')}".rstrip()
            out.append((m.table, Defect(file, m.column, message, n, example)))
    return out


def duplicate_keys(frame, column: str, file: str, written=None) -> list[Defect]:
    """An attribute table must have one row per id. ``frame[column]``: the ids as numbers; ``written``: the
    column as the file holds it, to name two spellings of one id ("7" and "007") when that is what the
    duplicate is (the rows look different, and the event log refuses such a pair by that name)."""
    dup = frame[column].duplicated(keep=False) & frame[column].notna()
    n = int(dup.sum())
    if not n:
        return []
    message, example = "duplicate key: more than one row for the same id", _first(frame[column][dup])
    if written is not None:
        spellings = type(frame)({"number": frame[column][dup], "text": written[dup].astype(str)}).drop_duplicates()
        counts = spellings["number"].value_counts()
        clashing = sorted(int(number) for number in counts[counts > 1].index.to_numpy())
        if clashing:
            number = clashing[0]
            texts = spellings["text"][spellings["number"] == number].to_numpy().tolist()
            first, second = two_spellings(texts, number)
            message += (
                f": {first!r} and {second!r} both become id {number} ({len(clashing)} id"
                f"{'s' if len(clashing) != 1 else ''} written more than one way). Ids are read as integers:"
                " write each id of the table one way"
            )
            example = second
    return [Defect(file, column, message, n, example)]
