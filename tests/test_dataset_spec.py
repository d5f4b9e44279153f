"""Dataset specs: the spec file, every planted defect reported before anything is written, and the
pipeline adapting to what a log has (workflows/spec.py, workflows/validate.py, workflows/reader.py)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from workflows.reader import list_positions, load_inputs
from workflows.spec import RAW_LAYOUT, ListSpec, SpecError, layout_of, load_spec, raw_schema_spec, spec_from_dict
from workflows.validate import DatasetError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shop_files(tmp_path_factory):
    """A tiny shop log (CSV events in two files, items CSV, customers JSON lines) and its spec."""
    from workflows.sources.shop import generate

    folder = tmp_path_factory.mktemp("shop_tiny")
    generate(customers=40, skus=30, events_per_customer=8, seed=11).write(folder)
    return folder


@pytest.fixture
def shop(shop_files, tmp_path):
    """A fresh copy a test may plant a defect in."""
    folder = tmp_path / "shop"
    shutil.copytree(shop_files, folder)
    return folder


def defects_of(spec_path):
    with pytest.raises(DatasetError) as info:
        load_inputs(load_spec(spec_path))
    return info.value.defects


def only(defects, column):
    found = [d for d in defects if d.column == column]
    assert len(found) == 1, [str(d) for d in defects]
    return found[0]


def edit_csv(path: Path, change):
    frame = pd.read_csv(path, dtype=str)
    change(frame)
    frame.to_csv(path, index=False)


def set_cells(path: Path, column: str, rows: list[int], values: list[str]):
    def change(frame):
        frame.loc[rows, column] = values

    edit_csv(path, change)


def edit_spec(folder: Path, change) -> Path:
    path = folder / "dataset.yaml"
    values = yaml.safe_load(path.read_text())
    change(values)
    path.write_text(yaml.safe_dump(values))
    return path


# --- the spec ---------------------------------------------------------------------------------------


def test_the_raw_schema_is_a_spec_and_sources_write_it(tmp_path, small_data):
    assert layout_of(raw_schema_spec("e", "u", "i")) == RAW_LAYOUT
    assert RAW_LAYOUT.labels == ["click", "watched", "duration_watch", "like", "share"]
    paths = small_data.write_parquet(tmp_path)
    spec = load_spec(paths["spec"])
    assert spec.name == "synthetic" and spec.layout == RAW_LAYOUT
    assert Path(spec.resolve(spec.events.path)) == Path(paths["events"])


def test_shop_spec_maps_roles_to_columns():
    spec = load_spec(ROOT / "configs" / "datasets" / "shop.yaml")
    layout = spec.layout
    assert layout.event_columns == ["user_id", "item_id", "timestamp", "click", "view", "add_to_cart", "purchase"]
    assert layout.labels == ["click", "view", "add_to_cart", "purchase"]  # no watch time: no watch labels
    assert layout.item_categorical == ("brand", "category_path_1", "category_path_2", "category_path_3")
    assert layout.item_continuous == (("price", True),)
    assert layout.user_categorical == ("segment", "region")
    assert [t.name for t in spec.objective] == ["view", "add_to_cart", "purchase"]


def test_spec_mistakes_are_named():
    base = {"events": {"path": "e.csv", "signals": ["click"]}}
    with pytest.raises(SpecError, match="unknown key"):
        spec_from_dict({**base, "evnts": {}})
    with pytest.raises(SpecError, match="timestamp_unit"):
        spec_from_dict({"events": {"path": "e.csv", "timestamp_unit": "minutes"}})
    with pytest.raises(SpecError, match="objective names 'purchase'"):
        spec_from_dict({**base, "objective": [{"name": "purchase", "weight": 1.0}]})
    with pytest.raises(SpecError, match="watched"):
        spec_from_dict({"events": {"path": "e.csv", "signals": ["watched"]}})
    with pytest.raises(SpecError, match="positive"):
        spec_from_dict({"events": {"path": "e.csv", "signals": [{"name": "r", "kind": "continuous"}], "positive": "r"}})
    with pytest.raises(SpecError, match="does not exist"):
        load_spec("no/such/spec.yaml")


def test_a_spec_that_is_no_yaml_file_is_a_spec_mistake_not_a_traceback(tmp_path):
    # prepare_data.py / evaluate.py --spec catch SpecError (exit 2, one line); broken YAML or a folder
    # raised yaml's ScannerError / IsADirectoryError, a traceback with exit 1.
    broken = tmp_path / "dataset.yaml"
    broken.write_text("events: {path: e.csv\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(broken)
    with pytest.raises(SpecError, match="is a folder"):
        load_spec(tmp_path)


def test_a_column_joined_twice_onto_the_events_is_a_spec_mistake():
    # The joined events carry one column per name. A user and an item attribute of one name (country),
    # a signal named like the item duration's column, or an item attribute named like the watch time's
    # were accepted, and the pipeline failed late in the attribute join (KeyError: 'country').
    events = {"path": "e.csv", "signals": [{"name": "wt", "kind": "continuous"}], "watch_time": "wt"}
    duration = {"name": "duration_seconds", "kind": "continuous"}
    clashes = {
        "country": {"events": {"path": "e.csv"}, "users": {"path": "u.csv", "categorical": ["country"]},
                    "items": {"path": "i.csv", "categorical": ["brand", "country"]}},
        "duration_seconds": {"events": {"path": "e.csv", "signals": [duration]},
                             "items": {"path": "i.csv", "duration": "length"}},
        "watch_seconds": {"events": events, "items": {"path": "i.csv", "categorical": ["watch_seconds"]}},
    }  # fmt: skip
    for column, values in clashes.items():
        with pytest.raises(SpecError, match=f"'{column}'"):
            spec_from_dict(values)


def test_an_objective_the_heavy_ranker_refuses_is_a_spec_mistake():
    # An objective with a head twice, a negative, infinite or NaN weight, or only zero weights was
    # accepted: the data was prepared and written, and training then refused heavy_ranker.targets.
    base = {"events": {"path": "e.csv", "signals": ["click", "buy"]}}
    bad = {
        "duplicate": [{"name": "click", "weight": 1.0}, {"name": "click", "weight": 1.0}],
        "finite and >= 0": [{"name": "click", "weight": -1.0}, {"name": "buy", "weight": float("nan")}],
        "not all be 0": [{"name": "click", "weight": 0.0}],
    }
    for message, objective in bad.items():
        with pytest.raises(SpecError, match=message):
            spec_from_dict({**base, "objective": objective})
    assert spec_from_dict({**base, "objective": [{"name": "buy", "weight": 2.0}]}).objective[0].weight == 2.0


def test_an_empty_list_separator_is_a_spec_mistake():
    # separator: "" was accepted, and reading the item table crashed on str.split("") (ValueError:
    # empty separator, a traceback) instead of the spec error naming the key.
    items = {"path": "i.csv", "lists": [{"column": "tags", "separator": ""}]}
    with pytest.raises(SpecError, match="items.lists 'tags': separator"):
        spec_from_dict({"events": {"path": "e.csv"}, "items": items})


@pytest.mark.parametrize("key", ["min", "max", "threshold"])
def test_a_nan_signal_bound_or_threshold_is_a_spec_mistake(tmp_path, key):
    # YAML's .nan was accepted as a bound or a threshold: every comparison with NaN is False, so the
    # range check passed every value and the label `value >= threshold` was 0 for every event.
    path = tmp_path / "dataset.yaml"
    path.write_text(
        "events:\n  path: e.csv\n  signals:\n    - {name: click}\n"
        f"    - {{name: dwell, kind: continuous, {key}: .nan}}\n"
    )
    with pytest.raises(SpecError, match=rf"events\.signals\[1\]\.{key} must be a"):
        load_spec(path)
    if key == "threshold":  # +-inf labels every value one way: refused too; an infinite bound is no bound
        for value in (".inf", "-.inf"):
            path.write_text(
                "events:\n  path: e.csv\n  signals:\n    - {name: click}\n"
                f"    - {{name: dwell, kind: continuous, threshold: {value}}}\n"
            )
            with pytest.raises(SpecError, match=r"threshold must be a finite number"):
                load_spec(path)
    else:
        path.write_text(path.read_text().replace(".nan", ".inf" if key == "max" else "-.inf"))
        assert getattr(load_spec(path).events.signals[1], key) in (float("inf"), float("-inf"))


def test_list_columns_become_positions_or_path_prefixes():
    col = pd.Series(["home>kitchen>knives", "fashion>shoes", None])
    prefix = list_positions(col, ListSpec("category_path", ">", 3, prefix=True))
    assert list(prefix.columns) == ["category_path_1", "category_path_2", "category_path_3"]
    assert prefix.iloc[0].tolist() == ["home", "home>kitchen", "home>kitchen>knives"]
    assert prefix.iloc[1].tolist() == ["fashion", "fashion>shoes", None]
    assert prefix.iloc[2].tolist() == [None, None, None]
    tags = list_positions(pd.Series([["a", "b"], "c|d|e"]), ListSpec("tags", "|", 2))
    assert tags.values.tolist() == [["a", "b"], ["c", "d"]]


def test_the_clean_shop_log_loads(shop_files):
    inputs = load_inputs(load_spec(shop_files / "dataset.yaml"))
    events = inputs.events.compute()
    raw = pd.concat([pd.read_csv(p) for p in sorted(shop_files.glob("events-*.csv"))])
    assert len(events) == len(raw) and not inputs.warnings
    assert list(events.columns) == inputs.layout.event_columns
    assert (events["click"] == events["view"]).all()
    assert events["timestamp"].min() == raw["ts"].min() // 1000  # milliseconds -> seconds
    assert set(inputs.items.columns) >= {"brand", "price", "category_path_1"}


# --- planted defects: each one named, with its file, column, rows and an example ---------------------


def test_missing_required_column(shop):
    pd.read_csv(shop / "events-001.csv").drop(columns=["ts"]).to_csv(shop / "events-001.csv", index=False)
    d = only(defects_of(shop / "dataset.yaml"), "ts")
    assert d.file.endswith("events-001.csv") and "events.timestamp" in d.message and "not in the file" in d.message


def test_column_named_in_the_spec_that_does_not_exist(shop):
    spec = edit_spec(shop, lambda v: v["items"]["categorical"].append("colour"))
    d = only(defects_of(spec), "colour")
    assert d.file.endswith("items.csv") and "items.categorical" in d.message


def test_unparseable_timestamps(shop):
    def plant(frame):
        frame.loc[[3, 7], "ts"] = ["yesterday", "soon"]

    edit_csv(shop / "events-000.csv", plant)
    d = only(defects_of(shop / "dataset.yaml"), "ts")
    assert (d.rows, d.example) == (2, "yesterday") and "timestamp in ms" in d.message


def test_unparseable_iso_timestamps(shop):
    def to_iso(frame, bad=()):
        ts = pd.to_datetime(frame["ts"].astype("int64"), unit="ms").dt.strftime("%Y-%m-%dT%H:%M:%SZ")
        frame["ts"] = ts.where(~frame.index.isin(bad), "31/02/2026 noon")

    edit_csv(shop / "events-000.csv", lambda f: to_iso(f, bad=[4, 5]))
    edit_csv(shop / "events-001.csv", to_iso)
    spec = edit_spec(shop, lambda v: v["events"].update(timestamp_unit="iso"))
    d = only(defects_of(spec), "ts")
    assert (d.rows, d.example) == (2, "31/02/2026 noon") and "ISO 8601" in d.message
    assert d.file.endswith("events-000.csv")


def test_timestamps_in_the_wrong_unit(shop):
    spec = edit_spec(shop, lambda v: v["events"].update(timestamp_unit="s"))  # the files hold milliseconds
    defects = defects_of(spec)
    assert len(defects) == 2  # one per file
    assert all(d.column == "ts" and "timestamp_unit" in d.message and d.rows > 0 for d in defects)


def test_null_and_negative_ids(shop):
    def plant(frame):
        frame.loc[2, "customer"] = None
        frame.loc[[5, 6], "sku"] = "-50001"

    edit_csv(shop / "events-000.csv", plant)
    defects = defects_of(shop / "dataset.yaml")
    null = only(defects, "customer")
    assert null.rows == 1 and "null" in null.message
    negative = only(defects, "sku")  # reported as negative only, not also as an unknown item
    assert (negative.rows, negative.example) == (2, "-50001") and negative.message.startswith("is negative")


def test_ids_of_mixed_types(shop):
    set_cells(shop / "events-001.csv", "sku", [0, 1, 2], ["SKU-1", "SKU-2", "x"])
    d = only([d for d in defects_of(shop / "dataset.yaml") if "mixed" in d.message], "sku")
    assert (d.rows, d.example) == (3, "SKU-1") and d.file.endswith("events-001.csv")


def test_ids_of_mixed_types_in_json_lines(shop):
    lines = (shop / "customers.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["customer"] = str(first["customer"])  # "1001" among numbers
    (shop / "customers.jsonl").write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    d = only(defects_of(shop / "dataset.yaml"), "customer")
    assert "mixed types" in d.message and d.rows == 1 and d.file.endswith("customers.jsonl")


def test_the_mixed_types_check_runs_no_python_per_value_on_a_column_of_one_type(monkeypatch):
    """A CSV column read as text holds only str: the check is one C pass, not a Python call per value
    (that cost ~1/6 of reading a million-event log through a spec). Mixed columns are still counted."""
    from workflows import validate

    mixed = pd.Series([1, "a", None, 2.5, "b", 3], dtype=object)
    assert validate._mixed_types(mixed) == 2

    def per_value(self, *args, **kwargs):
        raise AssertionError("Series.map: a Python call per value")

    monkeypatch.setattr(pd.Series, "map", per_value)
    for values in (["7", "8", None, "007"], [1, 2, np.int64(3), None], [1, 2.5, np.nan], [None, None]):
        assert validate._mixed_types(pd.Series(values * 1000, dtype=object)) == 0


def test_the_event_checks_parse_each_id_column_once(monkeypatch):
    """The membership check (events of unknown items / users) reads the numbers the id rule parsed
    instead of parsing the text column again (to_numeric is most of a spec's validation time)."""
    from workflows import validate
    from workflows.validate import Membership, Rule, profile_frame

    parsed = []
    real = validate.as_number
    monkeypatch.setattr(validate, "as_number", lambda col: parsed.append(col.name) or real(col))
    frame = pd.DataFrame({"u": ["1", "2", "3", "9"], "i": ["5", "6", "7", "8"], "t": ["1770000000"] * 4})
    rules = [Rule("u", "id", "events.user_id"), Rule("i", "id", "events.item_id"), Rule("t", "timestamp")]
    known = [Membership("u", np.array([1, 2, 3]), "user"), Membership("i", np.array([5, 6, 7, 8]), "item")]
    profile = profile_frame(frame, rules, known)
    assert sorted(parsed) == ["i", "t", "u"]
    assert profile["issues"][("u", "unknown_user")] == [1, "9"] and ("i", "unknown_item") not in profile["issues"]


def count_parses(monkeypatch) -> list[str]:
    """The names of the columns ``as_number`` and ``parse_iso`` parse from now on (validate's and the
    reader's), one entry per parse of a non-empty column."""
    from workflows import reader, validate

    parsed = []

    def counted(real):
        def parse(col):
            if len(col):  # not dask's empty meta
                parsed.append(col.name)
            return real(col)

        return parse

    for module in (validate, reader):
        for name in ("as_number", "parse_iso"):
            monkeypatch.setattr(module, name, counted(getattr(validate, name)), raising=False)
    return parsed


def test_the_checks_and_the_mapping_parse_each_text_column_once(tmp_path, monkeypatch):
    """Mapping a spec's log to the pipeline's columns reads the values the checks parsed (ids and
    signals as numbers, ISO timestamps as dates) instead of parsing the text a second time; what it
    maps is what parsing the text gives."""

    frame = pd.DataFrame(
        {
            "u": ["1", "22", "0003", "9007199254740993"],  # zero-padded and beyond float64's integers
            "i": ["5", "6", "7", "5"],
            "t": ["2026-03-01T00:00:00Z", "2026-03-01T10:00:05Z", "2026-03-02T00:00:00+02:00", "1970-01-01T00:00:01Z"],
            "seen": ["1", "0", "1", "1"],
            "secs": ["2.5", "7", "0", "1e2"],
        }
    )
    frame.to_csv(tmp_path / "events.csv", index=False)
    values = {"name": "once", "events": {"path": "events.csv", "user_id": "u", "item_id": "i", "timestamp": "t",
                                         "timestamp_unit": "iso", "positive": "seen",
                                         "signals": ["seen", {"name": "secs", "kind": "continuous"}]}}  # fmt: skip
    parsed = count_parses(monkeypatch)
    events = load_inputs(spec_from_dict(values, root=str(tmp_path))).events.compute()
    assert sorted(parsed) == ["i", "secs", "seen", "t", "u"]  # each once: the checks' parse, the mapping reuses it
    assert events["user_id"].tolist() == [1, 22, 3, 9007199254740993]
    assert events["item_id"].tolist() == [5, 6, 7, 5]
    assert events["timestamp"].tolist() == [1772323200, 1772359205, 1772402400, 1]
    assert events["seen"].tolist() == events["click"].tolist() == [1, 0, 1, 1]
    assert events["secs"].tolist() == [2.5, 7.0, 0.0, 100.0] and events["secs"].dtype == np.float64


def test_an_attribute_table_parses_each_text_column_once(tmp_path, monkeypatch):
    """An attribute table's checks, its duplicate-id check and its mapping read one parse of each text
    column (the id was parsed three times, each number twice); what it maps is what parsing gives, files
    parsed differently (integers in a parquet file, text in a CSV file) included."""

    pd.DataFrame({"u": ["1"], "i": ["5"], "t": ["1770000000"]}).to_csv(tmp_path / "events.csv", index=False)
    (tmp_path / "items").mkdir()
    items = {"sku": ["5", "0006", "9007199254740993"], "price": ["2.5", "", "1e2"], "len": ["7", "8", "9"]}
    pd.DataFrame(items).to_csv(tmp_path / "items" / "b.csv", index=False)
    values = {"name": "once", "events": {"path": "events.csv", "user_id": "u", "item_id": "i", "timestamp": "t"},
              "items": {"path": "items/*", "id": "sku", "continuous": ["price"], "duration": "len"}}  # fmt: skip
    parsed = count_parses(monkeypatch)
    out = load_inputs(spec_from_dict(values, root=str(tmp_path))).items
    assert sorted(c for c in parsed if c in items) == ["len", "price", "sku"]  # each once
    assert out["item_id"].tolist() == [5, 6, 9007199254740993]
    assert out["price"].tolist()[::2] == [2.5, 100.0] and np.isnan(out["price"][1])
    assert out["duration_seconds"].tolist() == [7.0, 8.0, 9.0]

    pd.DataFrame({"sku": [1, 2], "price": [3, 4], "len": [1.5, 2.0]}).to_parquet(tmp_path / "items" / "a.parquet")
    out = load_inputs(spec_from_dict(values, root=str(tmp_path))).items
    assert out["item_id"].tolist() == [1, 2, 5, 6, 9007199254740993] and out["item_id"].dtype == np.int64
    assert out["duration_seconds"].tolist() == [1.5, 2.0, 7.0, 8.0, 9.0]
    assert out["price"].tolist()[:2] == [3.0, 4.0] and out["price"].dtype == np.float64


def test_ids_beyond_int64_are_refused_not_wrapped(shop):
    # 2**64 - 1 became user -1 and 2**63 the most negative id, silently: every later step took them.
    set_cells(shop / "events-000.csv", "customer", [0, 1], ["18446744073709551615", "9223372036854775808"])
    lines = (shop / "customers.jsonl").read_text().splitlines()
    first = {**json.loads(lines[0]), "customer": 2**64 - 1}
    (shop / "customers.jsonl").write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    defects = defects_of(shop / "dataset.yaml")
    events = only([d for d in defects if d.file.endswith("events-000.csv")], "customer")
    assert "beyond int64" in events.message and (events.rows, events.example) == (2, "18446744073709551615")
    users = only([d for d in defects if d.file.endswith("customers.jsonl")], "customer")
    assert "beyond int64" in users.message and users.example == 2**64 - 1


def test_ids_a_float_column_cannot_hold_exactly_are_refused_not_changed(tmp_path):
    # One decimal id ("5.0") made the whole CSV column float: 9007199254740993 (2**53 + 1) became id
    # 9007199254740992, silently; in JSON lines with a 9007199254740992.0 beside it, two users became one.
    values = {"name": "f", "events": {"path": "events.csv", "user_id": "u", "item_id": "i", "timestamp": "t"}}
    (tmp_path / "events.csv").write_text("u,i,t\n9007199254740993,2,1700000000\n5.0,3,1700000000\n")
    with pytest.raises(DatasetError) as info:
        load_inputs(spec_from_dict(values, root=str(tmp_path)))
    d = only(info.value.defects, "u")
    assert "2**53 or more in a column read as floating point" in d.message
    assert (d.rows, d.example) == (1, "9007199254740993")
    lines = ['{"u": 9007199254740993, "i": 2, "t": 1700000000}', '{"u": 9007199254740992.0, "i": 2, "t": 1700000000}']
    (tmp_path / "events.jsonl").write_text("\n".join(lines) + "\n")
    values["events"]["path"] = "events.jsonl"
    with pytest.raises(DatasetError) as info:
        load_inputs(spec_from_dict(values, root=str(tmp_path)))
    assert only(info.value.defects, "u").rows == 2
    # integers, even int64's largest, are read exactly: no defect
    (tmp_path / "events.csv").write_text("u,i,t\n9223372036854775807,2,1700000000\n9007199254740993,3,1700000000\n")
    values["events"]["path"] = "events.csv"
    events = load_inputs(spec_from_dict(values, root=str(tmp_path))).events.compute()
    assert events["user_id"].tolist() == [9223372036854775807, 9007199254740993]


@pytest.mark.parametrize("unit", ["s", "ms", "iso"])
def test_a_parquet_column_of_dates_is_read_as_its_instants_whatever_the_unit(tmp_path, unit):
    # The docs: "parquet timestamp columns are read as they are". The checks compared their
    # nanoseconds with the unit's range and refused every row as "too large" unless the unit was iso.
    when = pd.to_datetime(["2026-01-01 00:00:00", "2026-01-02 12:00:00"])
    frames = {
        "naive": when,
        "utc": when.tz_localize("UTC"),
        "berlin": when.tz_localize("Europe/Berlin"),  # 1 hour ahead of UTC in winter
    }
    expected = {
        "naive": [1767225600, 1767355200],
        "utc": [1767225600, 1767355200],
        "berlin": [1767222000, 1767351600],
    }
    for name, ts in frames.items():
        path = tmp_path / f"{name}.parquet"
        pd.DataFrame({"u": [1, 2], "i": [3, 4], "t": ts}).to_parquet(path)
        events = {"path": str(path), "user_id": "u", "item_id": "i", "timestamp": "t", "timestamp_unit": unit}
        read = load_inputs(spec_from_dict({"name": name, "events": events})).events.compute()
        assert read["timestamp"].tolist() == expected[name], name
    if unit == "iso":
        return
    before_1970 = tmp_path / "old.parquet"  # negative seconds, refused as numbers are
    pd.DataFrame({"u": [1], "i": [3], "t": pd.to_datetime(["1969-12-31 23:00:00"])}).to_parquet(before_1970)
    events = {"path": str(before_1970), "user_id": "u", "item_id": "i", "timestamp": "t", "timestamp_unit": unit}
    with pytest.raises(DatasetError) as info:
        load_inputs(spec_from_dict({"name": "old", "events": events}))
    assert [d.column for d in info.value.defects] == ["t"] and "negative" in info.value.defects[0].message


@pytest.mark.parametrize("unit", ["s", "ms", "iso"])
def test_a_parquet_column_of_dates_is_midnight_utc_of_each_day(tmp_path, unit):
    # A parquet date (pyarrow date32 / date64, no time of day) reached the checks as Python dates and
    # was refused as "not a timestamp in s" ("not an ISO 8601 timestamp" with iso); ISO text
    # "2026-01-01" is that day's midnight UTC, and so is the date.
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    days = [datetime.date(2026, 1, 1), datetime.date(2026, 1, 2)]
    for name, kind in (("date32", pa.date32()), ("date64", pa.date64())):
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({"u": [1, 2], "i": [3, 4], "t": pa.array(days, kind)}), path)
        events = {"path": str(path), "user_id": "u", "item_id": "i", "timestamp": "t", "timestamp_unit": unit}
        read = load_inputs(spec_from_dict({"name": "days", "events": events})).events.compute()
        assert read["timestamp"].tolist() == [1767225600, 1767312000], name
    # a missing date is a null timestamp, a date before 1970 a negative one, as for any timestamp
    path = tmp_path / "bad.parquet"
    bad = [datetime.date(2026, 1, 1), None, datetime.date(1969, 12, 31)]
    pq.write_table(pa.table({"u": [1, 2, 3], "i": [3, 4, 5], "t": pa.array(bad, pa.date32())}), path)
    events = {"path": str(path), "user_id": "u", "item_id": "i", "timestamp": "t", "timestamp_unit": unit}
    with pytest.raises(DatasetError) as info:
        load_inputs(spec_from_dict({"name": "bad", "events": events}))
    messages = sorted(d.message for d in info.value.defects)
    assert messages == ["is empty (null) (events.timestamp)", "is negative (events.timestamp)"], messages


def test_a_parquet_timestamp_pandas_cannot_hold_is_a_defect_not_a_traceback(tmp_path, monkeypatch):
    # pandas holds instants as int64 nanoseconds (1677-09-21 to 2262-04-11): a parquet timestamp in s / ms / us
    # or a date past that (9999-12-31, a warehouse's "no end") made the CPU reader raise pyarrow's "would result
    # in out of bounds timestamp" (pandas' OutOfBoundsDatetime for a date), a traceback naming no column.
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    import workflows.reader as reader

    day, end, start = datetime.datetime(2026, 1, 1), datetime.datetime(9999, 12, 31), datetime.datetime(1, 1, 1)
    kinds = {
        "ms": pa.timestamp("ms"),
        "us_utc": pa.timestamp("us", tz="UTC"),
        "s_berlin": pa.timestamp("s", tz="Europe/Berlin"),
        "date32": pa.date32(),
    }
    for name, kind in kinds.items():
        stamps = [day, day, end, None, end, start]
        if pa.types.is_date(kind):
            stamps = [None if s is None else s.date() for s in stamps]
        table = pa.table({"u": [1, 2, 3, -4, 5, 6], "i": [3, 4, 5, 6, 7, 8], "t": pa.array(stamps, kind)})
        path = tmp_path / f"{name}.parquet"
        pq.write_table(table, path, row_group_size=2)  # the first row group's statistics need no scan
        events = {"path": str(path), "user_id": "u", "item_id": "i", "timestamp": "t", "timestamp_unit": "s"}
        with pytest.raises(DatasetError) as info:
            load_inputs(spec_from_dict({"name": name, "events": events}))
        found = sorted((d.column, d.rows, "2262-04-11" in d.message) for d in info.value.defects)
        # the other rows are still checked: the null timestamp and the negative id, each once
        assert found == [("t", 1, False), ("t", 3, True), ("u", 1, False)], (name, [str(d) for d in info.value.defects])
        beyond = next(d for d in info.value.defects if "2262-04-11" in d.message)
        assert str(beyond.example).startswith("9999-12-31"), (name, beyond.example)
    # a file without statistics is scanned; one whose statistics lie inside is not read again
    path = tmp_path / "nostats.parquet"
    one = pa.table({"u": [1], "i": [3], "t": pa.array([end], pa.timestamp("ms"))})
    pq.write_table(one, path, write_statistics=False)
    assert reader.instants_out_of_bounds(str(path), "t") == (1, "9999-12-31T00:00:00")
    path = tmp_path / "fine.parquet"
    pq.write_table(pa.table({"u": [1, 2], "i": [3, 4], "t": pa.array([day, day], pa.timestamp("ms"))}), path)

    def no_scan(*args, **kwargs):
        raise AssertionError("a row group read although its statistics lie inside")

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", no_scan)
    events = {"path": str(path), "user_id": "u", "item_id": "i", "timestamp": "t", "timestamp_unit": "ms"}
    read = load_inputs(spec_from_dict({"name": "fine", "events": events})).events.compute()
    assert read["timestamp"].tolist() == [1767225600, 1767225600]


def test_a_log_of_several_parquet_files_with_time_zones_reports_only_the_out_of_bounds_instants(tmp_path):
    # One file of a time-zoned log with a 9999-12-31 is read apart (timestamps as objects): its column must
    # keep the zone the other files' read gives it, or the concatenation mixed zoned and naive datetimes and
    # every row of every file, the clean one too, became "not a timestamp".
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    day, end = datetime.datetime(2026, 1, 1), datetime.datetime(9999, 12, 31)
    for zone in ("UTC", "Europe/Berlin"):
        folder = tmp_path / zone.replace("/", "_")
        folder.mkdir()
        kind = pa.timestamp("us", tz=zone)
        pq.write_table(pa.table({"u": [1, 2], "i": [3, 4], "t": pa.array([day, day], kind)}), folder / "a.parquet")
        pq.write_table(pa.table({"u": [5, 6], "i": [7, 8], "t": pa.array([day, end], kind)}), folder / "b.parquet")
        events = {"path": str(folder), "user_id": "u", "item_id": "i", "timestamp": "t", "timestamp_unit": "s"}
        with pytest.raises(DatasetError) as info:
            load_inputs(spec_from_dict({"name": "zoned", "events": events}))
        found = [(Path(d.file).name, d.column, d.rows) for d in info.value.defects]
        assert found == [("b.parquet", "t", 1)], (zone, [str(d) for d in info.value.defects])


def test_events_of_items_missing_from_the_item_table(shop):
    items = pd.read_csv(shop / "items.csv")
    used = pd.concat([pd.read_csv(p) for p in sorted(shop.glob("events-*.csv"))])["sku"]
    gone = int(used.value_counts().index[0])
    items[items["sku"] != gone].to_csv(shop / "items.csv", index=False)
    defects = defects_of(shop / "dataset.yaml")  # one per events file
    assert {d.column for d in defects} == {"sku"} and {d.example for d in defects} == {str(gone)}
    assert all("missing from the item table" in d.message and "items.csv" in d.message for d in defects)
    assert sum(d.rows for d in defects) == int((used == gone).sum())

    # checks.missing_items: warn -> a counted warning, the item is kept (attribute-less); drop -> removed.
    spec = load_spec(edit_spec(shop, lambda v: v["checks"].update(missing_items="warn")))
    inputs = load_inputs(spec)
    assert {w.column for w in inputs.warnings} == {"sku"}
    assert sum(w.rows for w in inputs.warnings) == int((used == gone).sum())
    assert inputs.missing_items.tolist() == [gone]
    spec = load_spec(edit_spec(shop, lambda v: v["checks"].update(missing_items="drop")))
    inputs = load_inputs(spec)
    assert inputs.dropped == {"item": int((used == gone).sum())}
    assert gone not in set(inputs.events["item_id"].compute())


def test_a_drop_policy_that_removes_every_event_is_a_defect(tmp_path):
    # An item table keyed by other ids than the log's (a typo'd id column, another catalog): drop
    # removed every event and the pipeline failed later on the empty log ("cannot convert float NaN
    # to integer"), after creating the output folder.
    from configs import load_config
    from workflows.pipeline import prepare_dataset

    values = _tiny(tmp_path, {}, {"brand": ["a", "b", "c"]})
    pd.DataFrame({"i": ["7", "8", "9"], "brand": ["a", "b", "c"]}).to_csv(tmp_path / "items.csv", index=False)
    values["checks"] = {"missing_items": "drop"}
    with pytest.raises(DatasetError) as info:
        load_inputs(spec_from_dict(values, root=str(tmp_path)))
    (d,) = info.value.defects
    assert d.column == "i" and d.rows == 3 and "missing_items: drop" in d.message, str(d)
    with pytest.raises(DatasetError):
        prepare_dataset(spec_from_dict(values, root=str(tmp_path)), tmp_path / "out", load_config().workflow)
    assert not (tmp_path / "out").exists()


def test_duplicate_keys_in_an_attribute_table(shop):
    items = pd.read_csv(shop / "items.csv")
    pd.concat([items, items.iloc[[4]].assign(brand="other")]).to_csv(shop / "items.csv", index=False)
    d = only(defects_of(shop / "dataset.yaml"), "sku")
    assert "duplicate key" in d.message and d.rows == 2 and d.example == items["sku"].iloc[4]


def test_a_bad_cell_beside_a_duplicate_key_and_a_missing_item_reports_all_three(shop):
    # A bad price cell in items.csv stopped that table's checks: its duplicate key and the events of a
    # sku it lacks were reported only on the next run, after the price was fixed.
    items = pd.read_csv(shop / "items.csv", dtype=str)
    gone = items["sku"].iloc[0]
    items = pd.concat([items.iloc[1:], items.iloc[[4]].assign(brand="other")], ignore_index=True)
    items.loc[2, "price"] = "cheap"
    items.to_csv(shop / "items.csv", index=False)
    defects = defects_of(shop / "dataset.yaml")
    assert "is not a number" in only(defects, "price").message
    sku = [d for d in defects if d.column == "sku"]
    assert [d.message for d in sku if "duplicate key" in d.message], [str(d) for d in defects]
    missing = [d for d in sku if d.message.startswith("refers to items missing from the item table")]
    assert missing and {d.example for d in missing} == {gone}, [str(d) for d in defects]


def test_a_bad_id_cell_skips_the_tables_key_checks(shop):
    # ids that are not numbers are reported once; no duplicate or missing-id report built on them
    items = pd.read_csv(shop / "items.csv", dtype=str)
    items.loc[3, "sku"] = "SKU-x"
    items.to_csv(shop / "items.csv", index=False)
    d = only(defects_of(shop / "dataset.yaml"), "sku")
    assert "integer" in d.message or "number" in d.message, str(d)


def test_empty_input(shop):
    for path in shop.glob("events-*.csv"):
        pd.read_csv(path).iloc[:0].to_csv(path, index=False)
    defects = defects_of(shop / "dataset.yaml")
    assert any("empty" in d.message for d in defects)
    spec = edit_spec(shop, lambda v: v["events"].update(path="nothing-*.csv"))
    assert "no file matches" in str(defects_of(spec)[0])


def test_an_empty_file_among_an_attribute_tables_files_is_not_an_empty_table(tmp_path):
    # Spark and dask write an empty part file for an empty partition: the event log took it, but an
    # attribute table refused the whole folder as "the items table is empty".
    values = _tiny(tmp_path, {})
    (tmp_path / "items").mkdir()
    pd.DataFrame({"i": [1, 2, 3], "brand": ["a", "b", "c"]}).to_parquet(tmp_path / "items" / "part-0.parquet")
    pd.DataFrame({"i": [], "brand": []}).astype({"i": "int64"}).to_parquet(tmp_path / "items" / "part-1.parquet")
    values["items"] = {"path": "items", "id": "i", "categorical": ["brand"]}
    items = load_inputs(spec_from_dict(values, root=str(tmp_path))).items
    assert items["item_id"].tolist() == [1, 2, 3] and items["brand"].tolist() == ["a", "b", "c"]
    (tmp_path / "items" / "part-0.parquet").unlink()  # every file empty: an empty table
    with pytest.raises(DatasetError) as info:
        load_inputs(spec_from_dict(values, root=str(tmp_path)))
    assert ["no rows" in d.message for d in info.value.defects] == [True]


def test_an_empty_json_lines_file_is_a_file_of_no_events(tmp_path):
    # dask's to_json writes a 0-byte file for an empty partition: a JSON lines file of no record,
    # refused as lacking every column ("its columns: []").
    (tmp_path / "ev").mkdir()
    pd.DataFrame({"u": [1, 2], "i": [3, 4], "t": [10, 20]}).to_json(
        tmp_path / "ev" / "part-0.jsonl", orient="records", lines=True
    )
    (tmp_path / "ev" / "part-1.jsonl").write_text("")
    values = {"name": "j", "events": {"path": "ev", "user_id": "u", "item_id": "i", "timestamp": "t"}}
    events = load_inputs(spec_from_dict(values, root=str(tmp_path))).events.compute()
    assert events["item_id"].tolist() == [3, 4]
    (tmp_path / "ev" / "part-0.jsonl").unlink()  # no record in any file: an empty log
    with pytest.raises(DatasetError) as info:
        load_inputs(spec_from_dict(values, root=str(tmp_path)))
    assert [d.message for d in info.value.defects] == ["the event log is empty (no rows)"]


def test_a_column_named_twice_in_a_files_header_is_a_defect_not_the_first_one_silently(tmp_path):
    # A CSV header "u,i,t,t": pandas renamed the second "t" to "t.1" and the log was read from the first,
    # silently; a parquet file with a repeated name (any column) failed in pyarrow with a traceback.
    (tmp_path / "events.csv").write_text("u,i,t,t,x,x\n1,2,1700000000,5,a,b\n")
    values = {"name": "d", "events": {"path": "events.csv", "user_id": "u", "item_id": "i", "timestamp": "t"}}
    with pytest.raises(DatasetError) as info:
        load_inputs(spec_from_dict(values, root=str(tmp_path)))
    assert [(d.column, d.message) for d in info.value.defects] == [
        ("t", "appears 2 times in the file's header (events.timestamp): give each column its own name")
    ]  # x is not read from a CSV: no defect
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = [pa.array([1]), pa.array([2]), pa.array([1700000000]), pa.array([5]), pa.array([6])]
    pq.write_table(pa.table(columns, names=["u", "i", "t", "x", "x"]), tmp_path / "events.parquet")
    values["events"]["path"] = "events.parquet"
    with pytest.raises(DatasetError) as info:
        load_inputs(spec_from_dict(values, root=str(tmp_path)))
    assert [(d.column, d.message) for d in info.value.defects] == [
        ("x", "appears 2 times in the file's header: give each column its own name")
    ]
    # an attribute table's parquet file is read by pyarrow, which reads the named columns beside a repeated
    # one: that file was read before and still is; a repeated name the spec reads is refused there too
    (tmp_path / "events.csv").write_text("u,i,t\n1,3,1700000000\n2,4,1700000000\n")
    items = [pa.array([3, 4]), pa.array([1.0, 2.0]), pa.array(["a", "b"]), pa.array(["c", "d"])]
    pq.write_table(pa.table(items, names=["i", "price", "note", "note"]), tmp_path / "items.parquet")
    values["events"]["path"] = "events.csv"
    values["items"] = {"path": "items.parquet", "continuous": ["price"]}
    read = load_inputs(spec_from_dict(values, root=str(tmp_path)))
    assert read.items["price"].tolist() == [1.0, 2.0]
    values["items"]["categorical"] = ["note"]
    with pytest.raises(DatasetError) as info:
        load_inputs(spec_from_dict(values, root=str(tmp_path)))
    assert [(d.column, d.message) for d in info.value.defects] == [
        ("note", "appears 2 times in the file's header (items.categorical): give each column its own name")
    ]


def test_signal_outside_its_declared_range(shop):
    set_cells(shop / "events-000.csv", "purchase", [1, 9], ["2", "2"])
    d = only(defects_of(shop / "dataset.yaml"), "purchase")
    assert (d.rows, d.example) == (2, "2") and "not 0 or 1" in d.message

    def continuous(v):
        v["events"]["signals"].append({"name": "basket_value", "kind": "continuous", "min": 0, "max": 1000})

    spec = edit_spec(shop, continuous)
    set_cells(shop / "events-000.csv", "purchase", [1, 9], ["0", "0"])
    edit_csv(shop / "events-000.csv", lambda f: f.insert(3, "basket_value", ["12.5"] * (len(f) - 1) + ["1e6"]))
    edit_csv(shop / "events-001.csv", lambda f: f.insert(3, "basket_value", "-1"))
    defects = defects_of(spec)
    assert {(d.file.rsplit("/", 1)[-1], d.column, "maximum" in d.message) for d in defects} == {
        ("events-000.csv", "basket_value", True),
        ("events-001.csv", "basket_value", False),
    }


def _tiny(tmp_path, events: dict, items: dict | None = None, **spec_events):
    """A two-file spec in ``tmp_path``: events.csv (u, i, t and ``events``) and items.csv (``items``)."""
    pd.DataFrame({"u": ["1", "2", "3"], "i": ["1", "2", "3"], "t": ["10", "20", "30"], **events}).to_csv(
        tmp_path / "events.csv", index=False
    )
    values = {"name": "tiny", "events": {"path": "events.csv", "user_id": "u", "item_id": "i", "timestamp": "t"}}
    values["events"].update(spec_events)
    if items is not None:
        pd.DataFrame({"i": ["1", "2", "3"], **items}).to_csv(tmp_path / "items.csv", index=False)
        values["items"] = {"path": "items.csv", "id": "i"}
    return values


def test_a_csv_binary_signal_written_true_false_is_read_as_parquet_booleans_are(tmp_path):
    # parquet and JSON booleans were read as 1 / 0, a CSV's true / false was refused as "not a number"
    (tmp_path / "events.csv").write_text(
        "u,i,t,like\n1,3,1767225600,true\n2,4,1767225600, FALSE\n3,4,1767225600,True\n"
    )
    pd.DataFrame({"u": [1, 2, 3], "i": [3, 4, 4], "t": [1767225600] * 3, "like": [True, False, True]}).to_parquet(
        tmp_path / "events.parquet"
    )
    for name in ("events.csv", "events.parquet"):
        events = {"path": name, "user_id": "u", "item_id": "i", "timestamp": "t", "signals": ["like"]}
        read = load_inputs(spec_from_dict({"name": "likes", "events": events}, root=str(tmp_path))).events.compute()
        assert read["like"].tolist() == read["click"].tolist() == [1, 0, 1], name
        assert read["like"].dtype == np.int64, name
    # other words stay refused, saying what a binary signal holds; a continuous signal is a number
    (tmp_path / "events.csv").write_text("u,i,t,like,stars\n1,3,1767225600,yes,true\n2,4,1767225600,0,4\n")
    events = {"path": "events.csv", "user_id": "u", "item_id": "i", "timestamp": "t",
              "signals": ["like", {"name": "stars", "kind": "continuous"}]}  # fmt: skip
    with pytest.raises(DatasetError) as info:
        load_inputs(spec_from_dict({"name": "words", "events": events}, root=str(tmp_path)))
    like, stars = only(info.value.defects, "like"), only(info.value.defects, "stars")
    assert "a binary signal is 0 or 1 (or true / false)" in like.message and like.example == "yes"
    assert stars.message == "is not a number (signal 'stars')" and stars.example == "true"


def test_a_column_a_binary_and_a_continuous_signal_share_reports_each_signals_defects_under_it(tmp_path):
    # Signals may share a column. The binary one reads "true" as 1, the continuous one refuses it: only the
    # continuous one is "not a number" (the binary one was blamed too, with its example "true"); a 5 is not 0 / 1
    # for the binary signal only (the continuous one was called "not 0 or 1 (a binary signal)" as well).
    events = {"path": "events.csv", "user_id": "u", "item_id": "i", "timestamp": "t",
              "signals": ["x", {"name": "s", "column": "x", "kind": "continuous", "max": 4}]}  # fmt: skip
    (tmp_path / "events.csv").write_text("u,i,t,x\n1,3,1767225600,true\n2,4,1767225600,0\n")
    with pytest.raises(DatasetError) as info:
        load_inputs(spec_from_dict({"name": "shared", "events": events}, root=str(tmp_path)))
    assert [(d.message, d.example) for d in info.value.defects] == [("is not a number (signal 's')", "true")]
    (tmp_path / "events.csv").write_text("u,i,t,x\n1,3,1767225600,5\n2,4,1767225600,0\n")
    with pytest.raises(DatasetError) as info:
        load_inputs(spec_from_dict({"name": "shared", "events": events}, root=str(tmp_path)))
    assert sorted(d.message for d in info.value.defects) == [
        "is above the declared maximum 4.0 (signal 's')",
        "is not 0 or 1 (a binary signal) (signal 'x')",
    ]


def test_infinite_signals_and_attributes_are_refused(tmp_path):
    # "inf" parses as a number; one infinite price made log1p + Normalize turn every item's price into
    # inf (the mean is inf), silently: the models then trained on infinite inputs.
    values = _tiny(tmp_path, {"basket": ["1.5", "inf", "2"]}, {"price": ["3", "-inf", "inf"]})
    values["events"]["signals"] = [{"name": "buy", "column": "basket", "kind": "continuous", "threshold": 1}]
    values["items"]["continuous"] = [{"column": "price", "log": True}]
    with pytest.raises(DatasetError) as info:
        load_inputs(spec_from_dict(values, root=str(tmp_path)))
    found = {(d.column, d.rows, d.example) for d in info.value.defects if "finite" in d.message}
    assert found == {("basket", 1, "inf"), ("price", 2, "-inf")}, [str(d) for d in info.value.defects]


def test_negative_durations_and_log_attributes_are_refused(tmp_path):
    # A duration (seconds watched, an item's length) cannot be negative, and log1p of a value <= -1 is
    # -inf / NaN: one item of duration -1 made the normalised duration feature inf for every item.
    values = _tiny(
        tmp_path,
        {"watched_s": ["-3", "4", "5"]},
        {"length": ["10", "-1", "20"], "price": ["-2", "1", "2"], "score": ["-2", "1", "2"]},
    )
    values["events"].update(signals=[{"name": "watched_s", "kind": "continuous"}], watch_time="watched_s")
    values["items"].update(continuous=[{"column": "price", "log": True}, "score"], duration="length")
    with pytest.raises(DatasetError) as info:
        load_inputs(spec_from_dict(values, root=str(tmp_path)))
    found = {(d.column, d.rows, d.example) for d in info.value.defects}
    assert found == {("watched_s", 1, "-3"), ("length", 1, "-1"), ("price", 1, "-2")}, found  # score: no log


def test_iso_timestamps_before_1970_are_refused_as_numbers_are(tmp_path):
    # Negative seconds are refused whatever the unit (numbers, parquet dates); ISO text skipped the check.
    when = ["2026-01-01T00:00:00Z", "1969-12-31T23:00:00Z", "2026-01-02T00:00:00+01:00"]
    values = _tiny(tmp_path, {"t": when}, timestamp_unit="iso")
    with pytest.raises(DatasetError) as info:
        load_inputs(spec_from_dict(values, root=str(tmp_path)))
    assert [(d.column, d.rows, d.example) for d in info.value.defects] == [("t", 1, "1969-12-31T23:00:00Z")]
    assert "negative" in info.value.defects[0].message


def test_text_that_is_not_iso_8601_is_refused_not_read_as_the_run_date(tmp_path):
    # pandas reads "now", "today" and a bare time as the run's own date, and "03/01/2026" as March 1
    # (month first): such rows went through as events of the day of the run, or of the wrong month.
    when = ["2026-01-01T00:00:00Z", "now", "12:30", "03/01/2026", "2026-01-02 10:00:00.5+01:00", "2026-03"]
    values = _tiny(tmp_path, {}, timestamp_unit="iso")
    pd.DataFrame({"u": ["1"] * 6, "i": ["1"] * 6, "t": when}).to_csv(tmp_path / "events.csv", index=False)
    with pytest.raises(DatasetError) as info:
        load_inputs(spec_from_dict(values, root=str(tmp_path)))
    found = [(d.column, d.rows, d.example) for d in info.value.defects]
    assert found == [("t", 3, "now")] and "ISO 8601" in info.value.defects[0].message, found


def test_every_defect_at_once_and_nothing_written(shop, tmp_path):
    """One run reports every defect; the pipeline and the script write nothing and exit with 2."""
    from configs import load_config
    from workflows.pipeline import prepare_dataset

    set_cells(shop / "events-000.csv", "ts", [0], ["later"])
    set_cells(shop / "items.csv", "price", [0], ["cheap"])
    out = tmp_path / "processed"
    with pytest.raises(DatasetError) as info:
        prepare_dataset(load_spec(shop / "dataset.yaml"), out, load_config().workflow)
    assert {d.column for d in info.value.defects} == {"ts", "price"}
    assert not out.exists()

    proc = subprocess.run(
        [sys.executable, "scripts/prepare_data.py", "--spec", str(shop / "dataset.yaml"), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "events-000.csv: column 'ts'" in proc.stderr and "items.csv: column 'price'" in proc.stderr
    assert "'later'" in proc.stderr and "'cheap'" in proc.stderr
    assert not out.exists()


# --- adapting to what exists ---------------------------------------------------------------------------


def test_a_log_with_only_ids_and_iso_timestamps_goes_through(tmp_path):
    """No signal, no user or item table, JSON lines with ISO timestamps: every event is a positive,
    sampled negatives are added, and users and items have id and history features only."""
    from merlin.schema import Tags

    from configs import load_config
    from workflows.pipeline import prepare_dataset

    rng = np.random.default_rng(0)
    n = 3000
    start = pd.Timestamp("2026-03-01T00:00:00Z")
    frame = pd.DataFrame(
        {
            "uid": rng.integers(1, 80, n),
            "iid": rng.zipf(1.5, n) % 60 + 1,
            "when": (start + pd.to_timedelta(rng.integers(0, 20 * 86400, n), unit="s")).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    )
    frame.to_json(tmp_path / "plays.jsonl", orient="records", lines=True)
    spec = spec_from_dict(
        {"name": "plays", "events": {"path": "plays.jsonl", "user_id": "uid", "item_id": "iid", "timestamp": "when",
                                     "timestamp_unit": "iso"}},
        root=str(tmp_path),
    )  # fmt: skip
    config = load_config(overrides={"workflow": {"checks": {"point_in_time_probe": False}}}).workflow
    out = prepare_dataset(spec, tmp_path / "processed", config)
    summary = out.summary
    assert summary["dataset"]["labels"] == ["click"]
    assert any("negative_sampling" in note for note in summary["dataset"]["adaptations"])
    schema = out.train().schema
    assert schema.select_by_tag(Tags.TARGET).column_names == ["click"]
    assert set(schema.select_by_tag(Tags.ITEM).column_names) == {"item_id", "item_click_rate_before"}
    assert set(schema.select_by_tag(Tags.USER).column_names) == {"user_id", "user_click_rate_before"}
    train = out.train().to_ddf().compute()
    assert 0 < train["click"].mean() < 1  # positives and sampled negatives
    events = pd.read_parquet(out.train_events)
    assert events["timestamp"].min() >= start.timestamp()


def test_inputs_read_once_go_through_the_pipeline_unread_again(tmp_path, monkeypatch):
    """``prepare_dataset(inputs=load_inputs(spec))`` (the offline evaluation's way: it reads the log
    for its own figures too) writes what reading the files itself writes, and does not read them."""
    from configs import load_config
    from workflows import pipeline

    rng = np.random.default_rng(1)
    n = 2000
    log = {"u": rng.integers(1, 60, n), "i": rng.integers(1, 40, n), "t": 1_770_000_000 + rng.integers(0, 10**6, n)}
    pd.DataFrame(log).to_parquet(tmp_path / "log.parquet")
    spec = spec_from_dict(
        {"name": "log", "events": {"path": "log.parquet", "user_id": "u", "item_id": "i", "timestamp": "t"}},
        root=str(tmp_path),
    )
    config = load_config(overrides={"workflow": {"checks": {"point_in_time_probe": False}}}).workflow
    read = pipeline.prepare_dataset(spec, tmp_path / "read", config)
    inputs = load_inputs(spec)

    def read_again(_spec):
        raise AssertionError("the files were read again")

    monkeypatch.setattr(pipeline, "load_inputs", read_again)
    given = pipeline.prepare_dataset(spec, tmp_path / "given", config, inputs=inputs)
    pd.testing.assert_frame_equal(pd.read_parquet(given.train_events), pd.read_parquet(read.train_events))
    with pytest.raises(AssertionError, match="read again"):
        pipeline.prepare_dataset(spec, tmp_path / "unread", config)


def test_the_objective_taken_from_a_spec_is_logged_as_heads_and_weights():
    """docs/own-data.md quotes the training log's line for a spec's objective as
    ``view 0.2, add_to_cart 0.3, purchase 0.5``; it printed the list of dicts."""
    from configs import load_config
    from workflows.adapt import config_for_dataset

    objective = [{"name": "view", "weight": 0.2}, {"name": "add_to_cart", "weight": 0.3}]
    layout = {"item_categorical": ["category"]}
    config, notes = config_for_dataset(load_config(), {"dataset": {"layout": layout, "objective": objective}})
    assert [t.name for t in config.heavy_ranker.targets] == ["view", "add_to_cart"]
    assert "heavy_ranker.targets from the spec's objective: view 0.2, add_to_cart 0.3" in notes


def test_nulls_in_nullable_parquet_columns_are_defects_not_crashes(tmp_path):
    # A parquet file written from pandas' nullable Int64 / boolean columns is read back with them.
    # Int64 (kind "i") was taken for a numpy integer column, which holds no null: a null item id went
    # unreported and crashed the table's mapping ("cannot convert NA to integer"); a boolean signal
    # with a null crashed the checks themselves the same way.
    events = pd.DataFrame({"u": [1, 2, 3], "i": [1, 2, 3], "t": [10, 20, 30]})
    events["c"] = pd.array([True, None, False], dtype="boolean")
    events.to_parquet(tmp_path / "events.parquet")
    pd.DataFrame({"i": pd.array([1, None, 3], dtype="Int64")}).to_parquet(tmp_path / "items.parquet")
    values = {
        "name": "nullable",
        "events": {"path": "events.parquet", "user_id": "u", "item_id": "i", "timestamp": "t", "signals": ["c"]},
        "items": {"path": "items.parquet", "id": "i"},
    }
    with pytest.raises(DatasetError) as info:
        load_inputs(spec_from_dict(values, root=str(tmp_path)))
    found = {(d.column, d.rows, d.message.split(" (")[0]) for d in info.value.defects}
    assert found == {("c", 1, "is empty"), ("i", 1, "is empty")}, [str(d) for d in info.value.defects]


def test_a_parquet_event_log_of_nullable_columns_is_checked_and_read(tmp_path):
    # On CPU Merlin's parquet engine cast nullable Int64 columns to int64 while reading: one null id
    # crashed the read ("cannot convert NA to integer") before the checks could name it.
    nullable = {"u": pd.array([1, None, 3], dtype="Int64"), "i": pd.array([5, 6, 7], dtype="Int64")}
    pd.DataFrame({**nullable, "t": [10, 20, 30], "r": pd.array([1, 2, 3], dtype="Int64")}).to_parquet(
        tmp_path / "events.parquet"
    )
    events = {"path": "events.parquet", "user_id": "u", "item_id": "i", "timestamp": "t"}
    events["signals"] = [{"name": "r", "kind": "continuous", "threshold": 2}]
    with pytest.raises(DatasetError) as info:
        load_inputs(spec_from_dict({"name": "nullable", "events": events}, root=str(tmp_path)))
    assert [(d.column, d.rows) for d in info.value.defects] == [("u", 1)], [str(d) for d in info.value.defects]
    clean = {"u": pd.array([1, 2, 3], dtype="Int64"), "i": nullable["i"], "t": [10, 20, 30]}
    pd.DataFrame({**clean, "r": pd.array([1, 2, 3], dtype="Int64")}).to_parquet(tmp_path / "events.parquet")
    read = load_inputs(spec_from_dict({"name": "nullable", "events": events}, root=str(tmp_path))).events.compute()
    assert read.to_dict("list") == {
        "user_id": [1, 2, 3],
        "item_id": [5, 6, 7],
        "timestamp": [10, 20, 30],
        "click": [0, 1, 1],
        "r": [1, 2, 3],
    }
    assert all(isinstance(t, np.dtype) for t in read.dtypes), read.dtypes  # numpy columns, as the pipeline takes
    # Text a parquet file holds as pandas' string dtype is ISO 8601-checked as object text is.
    text = pd.array(["2026-01-01T00:00:00Z", "03/01/2026", "now"], dtype="string")
    pd.DataFrame({**clean, "t": text}).to_parquet(tmp_path / "events.parquet")
    events = {**events, "signals": [], "timestamp_unit": "iso"}
    with pytest.raises(DatasetError) as info:
        load_inputs(spec_from_dict({"name": "nullable", "events": events}, root=str(tmp_path)))
    assert [(d.column, d.rows, d.example) for d in info.value.defects] == [("t", 2, "03/01/2026")]


def test_a_nullable_timestamp_column_without_a_value_is_a_defect_not_a_crash(tmp_path):
    # The timestamp-unit check took min() and max() of each partition's timestamps and tested them with
    # ``low == low``; for pandas' nullable Int64 (a parquet written from it) with no value present, min()
    # is pd.NA and the test raised "TypeError: boolean value of NA is ambiguous" before the null defect
    # could be named.
    timestamps = pd.array([None, None], dtype="Int64")
    pd.DataFrame({"u": [1, 2], "i": [5, 6], "t": timestamps}).to_parquet(tmp_path / "events.parquet")
    events = {"path": "events.parquet", "user_id": "u", "item_id": "i", "timestamp": "t"}
    with pytest.raises(DatasetError) as info:
        load_inputs(spec_from_dict({"name": "nullable", "events": events}, root=str(tmp_path)))
    assert [(d.column, d.rows) for d in info.value.defects] == [("t", 2)], [str(d) for d in info.value.defects]


def test_csv_text_na_is_a_value_in_categorical_columns_and_missing_in_numeric_ones(tmp_path):
    # pandas reads "NA", "null", "nan" ... as missing values by default: an item table's region "NA"
    # (North America, Namibia) became null silently in CSV, though JSON lines and parquet kept it.
    items = {"region": ["NA", "null", ""], "price": ["NA", "2", ""]}
    values = _tiny(tmp_path, {}, items)
    values["items"].update(categorical=["region"], continuous=["price"])
    read = load_inputs(spec_from_dict(values, root=str(tmp_path))).items
    assert read["region"].tolist()[:2] == ["NA", "null"] and pd.isna(read["region"].iloc[2]), read
    assert pd.isna(read["price"].iloc[0]) and read["price"].iloc[1] == 2 and pd.isna(read["price"].iloc[2]), read
    # An id "NA" is reported as the text it is, not as an empty cell.
    pd.DataFrame({"i": ["1", "NA", "3"]}).to_csv(tmp_path / "items.csv", index=False)
    values["items"].update(categorical=[], continuous=[])
    with pytest.raises(DatasetError) as info:
        load_inputs(spec_from_dict(values, root=str(tmp_path)))
    assert [(d.column, d.example) for d in info.value.defects] == [("i", "NA")], [str(d) for d in info.value.defects]


def test_seconds_declared_as_milliseconds_are_refused(tmp_path):
    # Unix seconds declared as ms (or any unit finer than the column's) put every event in January 1970:
    # no check caught it, and the log went through with its hours, days and windows all wrong.
    seconds = ["1700000000", "1700000100", "1700086400"]
    for unit, holds in (("ms", "s"), ("ns", "s"), ("us", "ms")):
        values = _tiny(tmp_path, {"t": [str(int(t) * _FACTORS[holds]) for t in seconds]}, timestamp_unit=unit)
        with pytest.raises(DatasetError) as info:
            load_inputs(spec_from_dict(values, root=str(tmp_path)))
        (d,) = info.value.defects
        assert (d.column, d.rows) == ("t", 3) and f"timestamp_unit {holds}?" in d.message and unit in d.message, d
    # The right unit, or small test timestamps no other unit makes plausible, go through.
    load_inputs(spec_from_dict(_tiny(tmp_path, {"t": seconds}), root=str(tmp_path)))
    load_inputs(spec_from_dict(_tiny(tmp_path, {}, timestamp_unit="ms"), root=str(tmp_path)))


_FACTORS = {"s": 1, "ms": 1_000, "us": 1_000_000}


@pytest.mark.parametrize(("plain", "other"), [("7", "007"), ("1", "1.0"), ("1000", "1e3"), ("7", " 7")])
def test_two_spellings_of_one_event_id_are_refused_not_merged(tmp_path, plain, other):
    # Ids read as text were converted with to_numeric: items "7" and "007" (users "1" and "1.0") silently
    # became one id, merging two items (users) with no error; attribute tables already refused it as a
    # duplicate key, the event log had no such check.
    values = _tiny(tmp_path, {"i": [plain, other, "8"], "u": [other, plain, "2"]})
    with pytest.raises(DatasetError) as info:
        load_inputs(spec_from_dict(values, root=str(tmp_path)))
    found = {(d.column, d.rows, d.example) for d in info.value.defects}
    assert found == {("i", 2, other), ("u", 2, other)}, [str(d) for d in info.value.defects]
    message = only(info.value.defects, "i").message
    assert f"{plain!r} and {other!r}" in message and "events.item_id" in message and "one way" in message


def test_two_spellings_of_one_id_across_files_and_in_json_lines_are_refused(tmp_path):
    frame = pd.DataFrame({"u": ["1", "2"], "i": ["5", "6"], "t": ["10", "20"]})
    frame.to_json(tmp_path / "events-a.jsonl", orient="records", lines=True)
    frame.assign(i=["0005", "06"]).to_json(tmp_path / "events-b.jsonl", orient="records", lines=True)
    values = {"name": "tiny", "events": {"path": "events-*.jsonl", "user_id": "u", "item_id": "i", "timestamp": "t"}}
    with pytest.raises(DatasetError) as info:
        load_inputs(spec_from_dict(values, root=str(tmp_path)))
    (d,) = info.value.defects
    assert (d.column, d.rows, d.example, d.file) == ("i", 4, "0005", str(tmp_path / "events-*.jsonl")), str(d)
    assert "'5' and '0005' both become id 5" in d.message and "(2 ids written more than one way)" in d.message


def test_ids_zero_padded_alike_are_one_spelling_each_and_go_through(tmp_path):
    values = _tiny(tmp_path, {"i": ["007", "008", "007"], "u": ["0001", "0002", "0010"]})
    read = load_inputs(spec_from_dict(values, root=str(tmp_path)))
    events = read.events.compute()
    assert events["item_id"].tolist() == [7, 8, 7] and events["user_id"].tolist() == [1, 2, 10]


def test_an_id_written_one_way_in_the_log_and_another_in_a_table_is_one_id(tmp_path):
    # Ids are integers: the log's "007" and the item table's "7" (the user table's "1" and the log's "01")
    # are one id, each file writing it one way, and join as one (no missing item, the attribute attached).
    values = _tiny(tmp_path, {"i": ["007", "008", "009"], "u": ["01", "02", "03"]}, {"colour": ["r", "g", "b"]})
    pd.DataFrame({"i": ["7", "8", "9"], "colour": ["r", "g", "b"]}).to_csv(tmp_path / "items.csv", index=False)
    pd.DataFrame({"u": ["1", "2", "3"], "age": ["20", "30", "40"]}).to_csv(tmp_path / "users.csv", index=False)
    values["items"]["categorical"] = ["colour"]
    values["users"] = {"path": "users.csv", "id": "u", "continuous": ["age"]}
    read = load_inputs(spec_from_dict(values, root=str(tmp_path)))
    events = read.events.compute()
    assert events["item_id"].tolist() == [7, 8, 9] and events["user_id"].tolist() == [1, 2, 3]
    assert dict(zip(read.items["item_id"], read.items["colour"])) == {7: "r", 8: "g", 9: "b"}
    assert dict(zip(read.users["user_id"], read.users["age"])) == {1: 20, 2: 30, 3: 40}


def test_two_spellings_of_one_id_in_an_attribute_table_are_named(tmp_path):
    # An item table with rows "7" and "007" (a user table with "1" and "1.0") was refused as a duplicate
    # key naming id 7 only: the file has no two rows "7". The defect names the pair, as the event log's does.
    values = _tiny(tmp_path, {}, {})
    pd.DataFrame({"i": ["1", "2", "3", "007", "7", "02"]}).to_csv(tmp_path / "items.csv", index=False)
    pd.DataFrame({"u": ["1", "2", "3", "1.0"]}).to_csv(tmp_path / "users.csv", index=False)
    values["users"] = {"path": "users.csv", "id": "u"}
    with pytest.raises(DatasetError) as info:
        load_inputs(spec_from_dict(values, root=str(tmp_path)))
    found = {(d.column, d.rows, d.example) for d in info.value.defects}
    assert found == {("i", 4, "02"), ("u", 2, "1.0")}, [str(d) for d in info.value.defects]
    message = only(info.value.defects, "i").message
    assert "duplicate key" in message and "'2' and '02' both become id 2 (2 ids written more than one way)" in message
    # A true duplicate (one spelling, two rows) is reported as before.
    pd.DataFrame({"i": ["1", "2", "3", "3"]}).to_csv(tmp_path / "items.csv", index=False)
    del values["users"]
    with pytest.raises(DatasetError) as info:
        load_inputs(spec_from_dict(values, root=str(tmp_path)))
    (d,) = info.value.defects
    assert (d.rows, d.example, d.message) == (2, 3, "duplicate key: more than one row for the same id"), str(d)


def test_sampled_negatives_with_a_threshold_they_would_pass_are_refused():
    # Sampled negatives (workflow.negative_sampling) have every signal 0, and a continuous signal's label
    # is `value >= threshold`: with threshold 0 every sampled negative was labelled a positive `rating`.
    from configs import NegativeSamplingConfig, WorkflowConfig
    from workflows.adapt import adapt_workflow_config
    from workflows.labels import AtLeastThreshold

    def layout(threshold):
        rating = {"name": "rating", "kind": "continuous", "min": -1, "max": 1, "threshold": threshold}
        return spec_from_dict({"events": {"path": "e.csv", "signals": ["click", rating]}}).layout

    negative = pd.DataFrame({"rating": [0.0]})  # what workflows.negative_sampling gives every signal
    assert AtLeastThreshold(0.0, "rating").transform(None, negative)["rating"].tolist() == [1]
    sampled = WorkflowConfig(negative_sampling=NegativeSamplingConfig(kind="uniform"))
    for threshold in (0.0, -0.5):
        with pytest.raises(SpecError, match=r"workflow.negative_sampling.*rating \(threshold"):
            adapt_workflow_config(sampled, layout(threshold), ["item_id"])
    # Without sampled negatives a threshold of 0 is the user's own cut (a score in [-1, 1]); above 0 both go.
    assert adapt_workflow_config(WorkflowConfig(), layout(0.0), ["item_id"])[0].negative_sampling.kind == "none"
    assert adapt_workflow_config(sampled, layout(0.5), ["item_id"])[0].negative_sampling.kind == "uniform"


# ISO 8601 shapes mixed in one column, with what the pandas path of parse_iso reads (None: null).
MIXED_ISO = {
    "2026-03-01T10:00:00+02:00": "2026-03-01 08:00:00",
    "2026": "2026-01-01",
    "2026-03": "2026-03-01",
    "2026-03-01": "2026-03-01",
    "20260301T1000": "2026-03-01 10:00:00",
    "2026-03-01 10:00:05.123456789": "2026-03-01 10:00:05.123456789",
    "2026-03-01T10:00:05,5": "2026-03-01 10:00:05.5",
    "2026-03-01t10:00:00z": "2026-03-01 10:00:00",
    "2026-03-01T10:00:00-0530": "2026-03-01 15:30:00",
    "2026-03-01T10+01": "2026-03-01 09:00:00",
    " 2026-03-01T10:00:00.5Z ": "2026-03-01 10:00:00.5",
    "2026-02-30": None,
    "2026-03-01T24:00:00": None,
    "1500-01-01": None,  # beyond datetime64[ns]
    "202603": None,
    "2026-0301": None,
    "2026-03-01 10:00:00 Z": None,
    "None": None,  # cudf.to_datetime raised on this text
    "now": None,
    "03/01/2026": None,
    "x": None,
}


def _expected_iso():
    return pd.Series([None if v is None else pd.Timestamp(v) for v in MIXED_ISO.values()], dtype="datetime64[ns]")


def test_the_string_only_iso_parse_reads_what_the_pandas_path_reads():
    # parse_iso_parts is the parse for cudf partitions: run here on pandas, it matches parse_iso's pandas path.
    from workflows.validate import parse_iso, parse_iso_parts

    text = pd.Series([*MIXED_ISO, None], dtype=object)
    expected = pd.concat([_expected_iso(), pd.Series([pd.NaT])], ignore_index=True)
    pd.testing.assert_series_equal(parse_iso(text), expected)
    pd.testing.assert_series_equal(parse_iso_parts(text, pd), expected)


def test_the_string_only_iso_parse_reads_optional_groups_given_as_empty_text(monkeypatch):
    # cudf 23.08's str.extract gives "" for a capture group that took no part in the match (libcudf regex.inl:
    # the unset range (-1, -1) is returned as a match; extract.cu makes it ""), pandas gives null. Emulated here
    # on pandas: the parse must read the same either way (it raised on int("") for a row without an offset).
    from pandas.core.strings.accessor import StringMethods

    from workflows.validate import parse_iso_parts

    extract = StringMethods.extract

    def extract_like_cudf_23_08(self, pat, flags=0, expand=True):
        out = extract(self, pat, flags=flags, expand=expand)
        matched = out.notna().any(axis=1)  # a group that always takes part (the year) tells a match
        out[matched] = out[matched].fillna("")
        return out

    monkeypatch.setattr(StringMethods, "extract", extract_like_cudf_23_08)
    text = pd.Series([*MIXED_ISO, None], dtype=object)
    assert (text.astype("str").str.extract(r"^(a)?([0-9]{4})")[0] == "").sum() > 0  # the emulation is in place
    expected = pd.concat([_expected_iso(), pd.Series([pd.NaT])], ignore_index=True)
    pd.testing.assert_series_equal(parse_iso_parts(text, pd), expected)


def test_parse_iso_on_cudf_reads_mixed_shapes_row_by_row():
    # cudf.to_datetime cast every row with the format of the first (other shapes: undefined values, not null)
    # and raised on a null first row or the text "None". Runs only where cudf is importable (the GPU route).
    cudf = pytest.importorskip("cudf")
    from workflows.validate import parse_iso

    text = cudf.Series([None, *MIXED_ISO])
    got = parse_iso(text).to_pandas()
    expected = pd.concat([pd.Series([pd.NaT]), _expected_iso()], ignore_index=True)
    pd.testing.assert_series_equal(got, expected, check_names=False)


def test_one_column_in_two_key_roles_is_a_spec_mistake():
    # user_id and item_id naming one column, the timestamp naming the user id's, or a signal reading a key
    # column loaded silently: the item ids were the user ids (the timestamps, the 0/1 labels the ids).
    bad = {
        "item_id": {"user_id": "u", "item_id": "u", "timestamp": "t"},
        "timestamp": {"user_id": "u", "item_id": "i", "timestamp": "u"},
        "signals 'view'": {
            "user_id": "u",
            "item_id": "i",
            "timestamp": "t",
            "signals": [{"name": "view", "column": "i"}],
        },
    }
    for role, keys in bad.items():
        with pytest.raises(SpecError, match=f"events.{role}.* name the same column"):
            spec_from_dict({"events": {"path": "e.csv", **keys}})
    # Signals may still share a column with each other: a rating and its thresholded label.
    rating = [{"name": "rating", "kind": "continuous"}, {"name": "liked", "column": "rating", "kind": "continuous",
                                                        "threshold": 4.0}]  # fmt: skip
    assert spec_from_dict({"events": {"path": "e.csv", "signals": rating}}).layout.labels == ["click", "liked"]


def test_datetimes_become_epoch_seconds_in_the_unit_the_column_holds():
    """cudf (and pandas 2) keep a parquet timestamp column's own unit, ms or us; pandas 1.5 converts to
    ns. The reader divided every datetime column's integers by 1e9, so on a GPU a millisecond column
    became timestamps a million times too small, silently. numpy arrays stand in for cudf's columns
    here (same dtypes, same astype)."""
    from workflows.reader import epoch_seconds

    instants = ["1970-01-01T00:00:00", "2026-03-01T12:00:05", "1969-12-31T23:59:59"]
    expected = [0, 1772366405, -1]
    for unit in ("s", "ms", "us", "ns"):
        column = np.array(instants, dtype=f"datetime64[{unit}]")
        assert epoch_seconds(column).tolist() == expected, unit
    assert epoch_seconds(pd.Series(pd.to_datetime(instants))).tolist() == expected
    aware = pd.Series(pd.to_datetime(instants)).dt.tz_localize("UTC").dt.tz_convert("Europe/Berlin")
    assert epoch_seconds(aware).tolist() == expected
    with pytest.raises(ValueError, match="unit 'D'"):
        epoch_seconds(np.array(instants[:1], dtype="datetime64[D]"))
