"""Duplicates, three kinds:

* identical rows: exact copies of an event (logging retries) are dropped;
* duplicate (user, item) pairs: one row per pair (per split part), signals combined with ``max`` so
  a pair shown five times and clicked once is one clicked example, never five (no double counting).
  The row keeps the first timestamp and the point-in-time features of that first impression;
* one item under two ids: items with the same content signature (normalised title + the configured
  columns) map to one canonical id (the smallest), in the events, the item table and therefore the
  serving tables; ``item_id_map.parquet`` records the mapping.
"""

from __future__ import annotations

from configs import DedupConfig
from workflows.report import StepReport, report

SIGNALS_MAX = ["click", "watch_seconds", "like", "share"]


def drop_identical_rows(events) -> tuple[object, StepReport]:
    kept = events.drop_duplicates(split_out=events.npartitions).persist()
    return kept, report("dedup_identical_rows", events, kept)


def content_signature(items, columns: list[str]):
    """A string per item: lower-cased title with punctuation and spacing normalised, plus ``columns``."""
    sig = None
    for column in columns:
        if column not in items.columns:
            raise ValueError(f"dedup.signature_columns names {column!r}, not a column of the item table")
        text = items[column].astype(str)
        if column == "title":
            text = text.str.lower().str.replace(r"[^a-z0-9]+", " ", regex=True).str.strip()
        sig = text if sig is None else sig + "|" + text
    return sig


def canonical_item_map(items, columns: list[str]):
    """Frame ``item_id, canonical_item_id`` for every item (identity for non-duplicates)."""
    frame = items[["item_id"]].copy()
    frame["signature"] = content_signature(items, columns)
    frame["canonical_item_id"] = frame.groupby("signature")["item_id"].transform("min")
    return frame[["item_id", "canonical_item_id"]].reset_index(drop=True)


def apply_item_map(events, mapping):
    """Replace ``item_id`` with its canonical id in a dask event collection (small broadcast join)."""
    moved = mapping[mapping["item_id"] != mapping["canonical_item_id"]]
    if len(moved) == 0:
        return events
    columns = list(events.columns)
    merged = events.merge(moved, on="item_id", how="left")
    merged["item_id"] = merged["canonical_item_id"].fillna(merged["item_id"]).astype(events["item_id"].dtype)
    return merged[columns]


def canonical_items(events, items, config: DedupConfig):
    """Map duplicated items to their canonical id. Returns ``(events, items, mapping, report)``."""
    if not config.canonical_items:
        mapping = items[["item_id"]].copy()
        mapping["canonical_item_id"] = mapping["item_id"]
        return events, items, mapping, report("dedup_canonical_items", events, events, enabled=False)
    mapping = canonical_item_map(items, config.signature_columns)
    mapped = apply_item_map(events, mapping).persist()
    keep = mapping["item_id"] == mapping["canonical_item_id"]
    kept_items = items[keep.values].reset_index(drop=True)
    rep = report(
        "dedup_canonical_items",
        events,
        mapped,
        duplicate_ids=int((~keep).sum()),
        catalog_before=int(len(items)),
        catalog_after=int(len(kept_items)),
    )
    return mapped, kept_items, mapping, rep


def aggregate_pairs(events, first_columns: list[str] | None = None, signals: list[str] | None = None) -> object:
    """One row per (user, item): earliest timestamp, ``max`` of every signal, ``min`` of ``first_columns``.

    ``first_columns`` are the point-in-time counts: they never decrease, so their minimum is their
    value at the pair's first impression, the same moment as the kept timestamp. ``signals``: the
    event log's signal columns (default the raw schema's click, watch_seconds, like, share).
    """
    spec = {"timestamp": "min", **{s: "max" for s in (SIGNALS_MAX if signals is None else signals)}}
    for column in first_columns or []:
        spec[column] = "min"
    extra = [c for c in events.columns if c not in spec and c not in ("user_id", "item_id")]
    if extra:
        raise ValueError(f"aggregate_pairs does not know how to combine column(s) {extra}")
    out = events.groupby(["user_id", "item_id"]).agg(spec, split_out=events.npartitions).reset_index()
    return out[list(events.columns)]


def dedup_pairs(
    events,
    config: DedupConfig,
    first_columns: list[str] | None = None,
    step: str = "dedup_pairs",
    signals: list[str] | None = None,
):
    if not config.aggregate_pairs:
        return events, report(step, events, events, enabled=False)
    out = aggregate_pairs(events, first_columns, signals).persist()
    return out, report(step, events, out)
