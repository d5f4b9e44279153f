"""Host-side parquet reads hand pyarrow a path it opens itself (workflows/local_parquet.py).

Given a Python file object (what pandas 1.5 passes for a local path), pyarrow's buffers need the GIL to
be freed and pre-buffering may free the last one on an Arrow IO thread during interpreter shutdown: the
process then aborts (exit -6) after its work is done."""

import io

import pandas as pd
import pyarrow.parquet as pq
import pytest

from workflows import local_parquet


@pytest.fixture
def table(tmp_path):
    frame = pd.DataFrame(
        {
            "item_id": pd.array([3, None, 5], dtype="Int64"),
            "category": pd.Categorical(["a", "b", "a"]),
            "title": pd.array(["x", None, "z"], dtype="string"),
            "score": [0.5, 1.5, float("nan")],
        },
        index=pd.Index([10, 20, 30], name="row"),
    )
    path = tmp_path / "a=1" / "items.parquet"  # a hive-looking folder must not add a partition column
    path.parent.mkdir()
    frame.to_parquet(path)
    return frame, path


def sources_pyarrow_reads(monkeypatch, read, path, **kwargs):
    """The types of the source arguments ``read(path)`` hands ``pyarrow.parquet.read_table``."""
    seen = []
    real = pq.read_table

    def spy(source, *args, **kw):
        seen.append(source)
        return real(source, *args, **kw)

    monkeypatch.setattr(pq, "read_table", spy)
    out = read(path, **kwargs)
    monkeypatch.undo()
    return out, seen


def test_pyarrow_opens_the_file_itself(monkeypatch, table):
    _, path = table
    _, seen = sources_pyarrow_reads(monkeypatch, local_parquet.read_parquet, path)
    # old code (pd.read_parquet): pandas' own file object (io.BufferedReader)
    assert seen and all(isinstance(s, str) for s in seen), [type(s) for s in seen]
    # the check tells the two apart: plain pandas hands pyarrow a Python file object
    _, plain = sources_pyarrow_reads(monkeypatch, pd.read_parquet, path)
    assert plain and all(isinstance(s, io.IOBase) for s in plain), [type(s) for s in plain]


def test_dispatched_read_on_the_host_goes_through_the_helper(monkeypatch, table):
    _, path = table
    _, seen = sources_pyarrow_reads(monkeypatch, local_parquet.read_parquet_dispatched, path, columns=["item_id"])
    assert seen and all(isinstance(s, str) for s in seen), [type(s) for s in seen]


@pytest.mark.parametrize("columns", [None, ["title", "item_id"]])
def test_the_frame_is_what_pandas_reads(table, columns):
    """Same dtypes (nullable, categorical, string), the index from pandas' metadata, the columns asked for."""
    frame, path = table
    got = local_parquet.read_parquet(path, columns=columns)
    pd.testing.assert_frame_equal(got, pd.read_parquet(path, columns=columns))
    pd.testing.assert_frame_equal(got, frame if columns is None else frame[columns])


def test_a_missing_file_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        local_parquet.read_parquet(tmp_path / "missing.parquet")
