"""Reading a local parquet file into memory on the host, with pyarrow opening the file itself.

Given a local path, pandas 1.5 opens the file in Python and hands pyarrow that file object; the buffers
pyarrow reads from it (``arrow::py::PyBuffer``) need the GIL to be freed, and pyarrow's pre-buffering can
drop the last of them on one of Arrow's IO threads after ``read_parquet`` returned. When that happens while
the interpreter shuts down, Python 3.11 ends that thread inside a destructor that may not throw: the
process aborts ("terminate called without an active exception", exit -6) after doing all its work, about
one short script in 60-80 under load. Naming pyarrow's own local filesystem makes pandas skip its file
handle (pyarrow opens the path natively) and leaves the rest of the read as it was: the same
``read_table(...).to_pandas()`` with the same arguments, so dtypes, categoricals and the index pandas
restores from its metadata are unchanged.

Every host-side read of a parquet file goes through :func:`read_parquet` (tests/test_layout.py checks that
no module and no notebook code cell calls ``pd.read_parquet`` itself); :func:`read_parquet_dispatched` keeps
cudf, which opens files natively, where Merlin's dispatch picks it. Dask and Merlin ``Dataset`` collections
read their own way.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from pyarrow import fs


def read_parquet(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """The local parquet file (or folder of files) at ``path`` as a pandas frame, as ``pd.read_parquet``
    reads it, with pyarrow opening the file (not a Python file object)."""
    # looked up per call, so a test that patches pd.read_parquet sees every read
    return pd.read_parquet(path, columns=columns, filesystem=fs.LocalFileSystem())


def read_parquet_dispatched(path: str | Path, columns: list[str] | None = None):
    """The file through Merlin's dispatch: cudf on a GPU machine (as before), :func:`read_parquet` where the
    dispatch picks pandas."""
    from merlin.core.dispatch import read_dispatch  # Merlin only for the callers that dispatch

    reader = read_dispatch(fmt="parquet")
    if reader is pd.read_parquet:
        return read_parquet(path, columns=columns)
    return reader(path, columns=columns)
