"""Train / validation (/ test) splits of the event log.

``temporal`` (default): everything before a cutoff trains, everything after is held out, so no model
    sees the future of what it is evaluated on. Cutoffs are timestamp quantiles: the last
    ``valid_fraction`` (and then ``test_fraction``) of events by time are held out.
``random``: RecBole's random-ordering protocol: each user's items (distinct (user, item) pairs) are
    put in a pseudo-random order (a hash of user, item, the pair's first timestamp and ``seed``, so
    the split is reproducible and does not depend on partitioning) and cut at ``ratios`` (80/10/10),
    with RecBole's rounding of each user's counts (``recbole_part_sizes``); a test ratio of 0: no test
    part. Every event of a pair goes to the pair's part: a pair is one row per part after
    ``dedup_pairs``, and a pair in two parts would be a held-out positive that is also a training one.
    A log with one event per pair is split exactly as per-event ordering split it.
``explicit``: parquet files list the ``user_id, item_id, timestamp`` of each part; events are
    assigned by an inner join, so an external protocol (a paper's split) is reproduced exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import dask
import dask.dataframe as dd
import numpy as np

from configs import SplitConfig
from workflows.dedup import apply_item_map
from workflows.validate import DatasetError, Defect

KEYS = ["user_id", "item_id", "timestamp"]
PAIR = ["user_id", "item_id"]


@dataclass
class Split:
    train: object  # dask dataframes
    valid: object
    cutoff: int  # first timestamp of the held-out period (temporal); end of training data otherwise
    test: object | None = None
    details: dict = field(default_factory=dict)

    def parts(self) -> dict:
        out = {"train": self.train, "valid": self.valid}
        if self.test is not None:
            out["test"] = self.test
        return out


def exact_quantiles(series, qs: list[float], bins: int = 4096) -> list[int]:
    """Exact lower quantiles of an integer dask series (the value at sorted position floor(q * (n - 1))).

    dask's own ``quantile`` is approximate and collapses when partitions cover disjoint ranges, as
    time-sorted logs do. Two passes instead: a histogram locates each quantile's bin, then only the
    values of that bin are brought back and sorted. cudf or pandas partitions alike.
    """
    lo, hi, n = dask.compute(series.min(), series.max(), series.shape[0])
    lo, hi, n = int(lo), int(hi), int(n)
    if n == 0:
        raise ValueError("cannot split an empty event log")
    width = max(1, -(-(hi - lo + 1) // bins))
    bin_of = (series - lo) // width
    counts = bin_of.value_counts().compute()
    counts = counts.to_pandas() if hasattr(counts, "to_pandas") else counts
    counts = counts.sort_index()
    cumulative = counts.cumsum()
    out = []
    for q in qs:
        rank = int(q * (n - 1))
        if rank in (0, n - 1):  # the extremes are known without another pass
            out.append(lo if rank == 0 else hi)
            continue
        b = int(cumulative.index[(cumulative.values > rank).argmax()])
        before = int(cumulative.loc[b] - counts.loc[b])
        values = series[bin_of == b].compute()
        values = values.to_pandas() if hasattr(values, "to_pandas") else values
        out.append(int(values.sort_values().iloc[rank - before]))
    return out


def temporal_split(ddf, config: SplitConfig) -> Split:
    """Split by time; works on dask-cudf and dask-pandas collections alike."""
    held_out = config.valid_fraction + config.test_fraction
    quantiles = [0.0, 1.0 - held_out, 1.0 - config.test_fraction]
    first, cutoff, test_cutoff = exact_quantiles(ddf["timestamp"], quantiles)
    # A tie is never split across parts, so a timestamp that more events share than a part's fraction
    # can leave it empty (a log batched by the day); the pipeline then failed with a KeyError at the
    # attribute join. Named here instead.
    empty = "training part" if cutoff == first else None
    if config.test_fraction > 0 and cutoff == test_cutoff:
        empty = "validation part"
    if empty:
        message = (
            f"the temporal split leaves the {empty} empty: the events that share timestamp {cutoff} fill its "
            f"share and more (a tie stays in one part; split.valid_fraction {config.valid_fraction}, "
            f"test_fraction {config.test_fraction})"
        )
        raise DatasetError([Defect("events", "timestamp", message)])
    train = ddf[ddf["timestamp"] < cutoff]
    if config.test_fraction <= 0:
        return Split(train, ddf[ddf["timestamp"] >= cutoff], cutoff, details={"kind": "temporal"})
    valid = ddf[(ddf["timestamp"] >= cutoff) & (ddf["timestamp"] < test_cutoff)]
    test = ddf[ddf["timestamp"] >= test_cutoff]
    return Split(train, valid, cutoff, test, {"kind": "temporal", "test_cutoff": test_cutoff})


def _pseudo_random(df, seed: int):
    """A uniform-looking number in [0, 1) per row from its keys (integer hashing, cudf/pandas alike)."""
    mask = (1 << 31) - 1
    h = (df["user_id"] * 1_000_003 + df["item_id"] * 7_919 + df["timestamp"] + seed) & mask
    for _ in range(3):  # a few rounds of multiply-xorshift mixing within 31 bits
        h = (h * 1_103_515_245 + 12_345) & mask
        h = h ^ (h // 65_536)
    return h / float(mask + 1)


def _assign_random(df, config: SplitConfig):
    """A ``_part`` (0 train, 1 valid, 2 test) per row, drawn per (user, item) pair: re-impressions of a
    pair, and rows that identical keys (a canonical id's merge) made ties, all go to one part."""
    pairs = df.groupby(PAIR).agg({"timestamp": "min"}).reset_index()  # a pair hashed by its first event
    pairs["_r"] = _pseudo_random(pairs, config.seed)
    pairs = pairs.sort_values(["user_id", "_r", "item_id"])  # item_id breaks hash ties the same in every partitioning
    rank = pairs.groupby("user_id").cumcount()
    size = pairs.groupby("user_id")["_r"].transform("count").astype("int64")  # "count": cudf and pandas
    n_train, n_valid = recbole_part_sizes(size, config.ratios)
    pairs["_part"] = (rank >= n_train).astype("int64") + (rank >= n_train + n_valid).astype("int64")
    return df.merge(pairs[[*PAIR, "_part"]], on=PAIR, how="inner")


def recbole_part_sizes(size, ratios):
    """Train and validation counts per user (the rest is test), as RecBole's ``_calcu_split_ids``
    makes them for ``size`` interactions (``evaluation.protocols.recbole_split_sizes``, one user at a
    time): each held-out share rounded down, the rest to train; then, last part first, a held-out
    part whose share is between 0 and 1 interactions gets one while train keeps more than one (so
    a user of 2-9 interactions still has a test item). Series in, series out (cudf or pandas)."""
    shares = [size * r for r in ratios[1:]]
    held = [share.astype("int64") for share in shares]  # floor: the shares are not negative
    n_train = size - sum(held)
    for i in reversed(range(len(held))):
        bump = ((n_train > 1) & (shares[i] > 0) & (shares[i] < 1)).astype("int64")
        held[i] = held[i] + bump
        n_train = n_train - bump
    return n_train, held[0]


def random_split(ddf, config: SplitConfig) -> Split:
    """Per user: ``ratios`` of the user's items, in pseudo-random order, to train/valid/test (every
    event of a (user, item) pair in the pair's part)."""
    columns = list(ddf.columns)
    assigned = ddf.shuffle(on="user_id", npartitions=ddf.npartitions).map_partitions(_assign_random, config)
    parts = [assigned[assigned["_part"] == i][columns] for i in range(3)]
    end_of_train = int(parts[0]["timestamp"].max().compute()) + 1
    # A test ratio of 0 leaves no user a test item: no test part, as a temporal test_fraction of 0 gives
    # none (an empty one stopped the pipeline at the attribute join).
    test = parts[2] if config.ratios[2] > 0 else None
    return Split(parts[0], parts[1], end_of_train, test, {"kind": "random", "ratios": list(config.ratios)})


def _read_keys(path: str):
    from pathlib import Path

    from merlin.io import Dataset

    if not Path(path).exists():
        raise FileNotFoundError(f"split file {path!r} does not exist")
    keys = Dataset(str(path), engine="parquet").to_ddf()  # cudf on a GPU machine, pandas otherwise
    missing = [k for k in KEYS if k not in keys.columns]
    if missing:
        raise ValueError(f"split file {path!r} lacks column(s) {missing}; it needs {KEYS}")
    # Ids or timestamps as text or datetimes failed in the join with pandas' "You are trying to merge on
    # int64 and object columns", naming neither the file nor the column.
    wrong = [k for k in KEYS if not _is_number(keys[k].dtype)]
    if wrong:
        message = "must hold integers (the log's ids, unix seconds)"
        raise DatasetError([Defect(str(path), k, f"{message}, found {keys[k].dtype}") for k in wrong])
    # A nullable integer column (``Int64``: pandas' convert_dtypes) failed in the join with "int() argument
    # must be ... not 'NAType'": NumPy's int64 instead, as the log's ids are.
    for k in KEYS:
        dtype = keys[k].dtype
        if not isinstance(dtype, np.dtype) and getattr(dtype, "numpy_dtype", dtype).kind in "iu":
            keys[k] = keys[k].astype("int64")
    return keys[KEYS].drop_duplicates()


def _is_number(dtype) -> bool:
    """An integer or float column, pyarrow-backed and nullable ones (``int64[pyarrow]``, ``Int64``) included."""
    return getattr(getattr(dtype, "numpy_dtype", dtype), "kind", "O") in "iuf"


def explicit_split(ddf, config: SplitConfig, item_map=None) -> Split:
    """Assign events to the parts listed in ``train_file``, ``valid_file`` (and ``test_file``).

    The files name items by the ids of the raw log. ``item_map`` (``item_id, canonical_item_id``,
    ``workflows/dedup.py``) maps them as the events were mapped, so an event of an item listed under
    a duplicate id still finds its part instead of silently falling out of every part."""
    files = {"train": config.train_file, "valid": config.valid_file}
    if config.test_file:
        files["test"] = config.test_file
    raw = {name: _read_keys(path) for name, path in files.items()}
    _refuse_shared_events(raw, files)
    keys = {
        name: part if item_map is None else apply_item_map(part, item_map).drop_duplicates()
        for name, part in raw.items()
    }
    # Two raw ids of one item make two listed events one (MovieLens: a user rated both copies of a film
    # in the same second, each copy in another part): the event stays in the first of train, valid,
    # test, so it is trained on and never also evaluated on.
    merged, names = 0, list(keys)
    for i, name in enumerate(names[1:], start=1):
        earlier = dd.concat([keys[n] for n in names[:i]]).drop_duplicates().assign(_earlier=1)
        tagged = keys[name].merge(earlier, on=KEYS, how="left")
        kept = tagged[tagged["_earlier"].isna()][KEYS]
        count = int((keys[name].shape[0] - kept.shape[0]).compute())
        if count:
            keys[name], merged = kept, merged + count
    parts = {name: ddf.merge(part_keys, on=KEYS, how="inner") for name, part_keys in keys.items()}
    sizes = dict(zip(parts, dask.compute(*(p.shape[0] for p in parts.values()))))
    # A part no file row matched (timestamps in milliseconds, ids of another log) is a defect of its
    # file: an empty part failed later with a KeyError at the attribute join, before anything was reported.
    empty = [name for name, size in sizes.items() if not size]
    if empty:
        message = "no row matches an event of the log (are its ids the log's, its timestamps unix seconds?)"
        rows = dask.compute(*(raw[name].shape[0] for name in empty))
        raise DatasetError([Defect(files[name], "", message, int(n)) for name, n in zip(empty, rows)])
    end_of_train = int(parts["train"]["timestamp"].max().compute()) + 1
    # What the files leave out is reported, not an error (a paper's split may drop events on purpose),
    # but never silent: a timestamp in another unit makes every file row match nothing.
    in_log = ddf[KEYS].drop_duplicates().assign(_in_log=1)
    unmatched = [part.merge(in_log, on=KEYS, how="left")["_in_log"].isna().sum() for part in keys.values()]
    events, unmatched = dask.compute(ddf.shape[0], sum(unmatched))
    placed = sum(sizes.values())
    details = {
        "kind": "explicit",
        "files": files,
        "events_in_no_part": int(events - placed),
        "file_rows_matching_no_event": int(unmatched),
        "events_kept_in_an_earlier_part": merged,
    }
    return Split(parts["train"], parts["valid"], end_of_train, parts.get("test"), details)


def _refuse_shared_events(keys: dict, files: dict) -> None:
    """An event listed in two parts (as the files name it) would be trained on and evaluated on: a
    ``DatasetError`` naming the files and how many events they share."""
    names = list(keys)
    defects = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = dd.merge(keys[a], keys[b], on=KEYS, how="inner")
            count = int(shared.shape[0].compute())
            if count:
                # every partition: head(1) read only the first, and where the merge had put no shared
                # event there, iloc[0] raised an IndexError instead of this defect
                first = shared.head(1, npartitions=-1)  # cudf on a GPU machine: its series have no tolist()
                example = (first.to_pandas() if hasattr(first, "to_pandas") else first).iloc[0].tolist()
                defects.append(
                    Defect(
                        files[b],
                        "",
                        f"lists events {files[a]} lists too ({a} and {b} must not share one)",
                        count,
                        example,
                    )
                )
    if defects:
        raise DatasetError(defects)


def split_events(ddf, config: SplitConfig, item_map=None) -> Split:
    """Split ``ddf`` as ``config.kind`` says; ``item_map``: the raw -> canonical item ids the events
    went through (an explicit split's files name raw ids)."""
    if config.kind == "explicit":
        return explicit_split(ddf, config, item_map)
    return {"temporal": temporal_split, "random": random_split}[config.kind](ddf, config)
