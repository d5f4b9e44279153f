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

import functools
import sys
import unicodedata

import pandas as pd

from configs import DedupConfig
from workflows.report import StepReport, report

SIGNALS_MAX = ["click", "watch_seconds", "like", "share"]


def drop_identical_rows(events) -> tuple[object, StepReport]:
    kept = events.drop_duplicates(split_out=events.npartitions).persist()
    return kept, report("dedup_identical_rows", events, kept)


@functools.cache
def combining_marks() -> str:
    """The combining marks (Unicode category M: vowel signs, tone marks, accents) as the inside of a
    regex character class. Python's ``\\w`` has none of them, so ``\\W`` and ``\\b`` take "ि" in "दिल"
    for punctuation, a word's end."""
    marks, start = [], None
    for code in range(sys.maxunicode + 2):
        is_mark = code <= sys.maxunicode and unicodedata.category(chr(code)).startswith("M")
        if is_mark and start is None:
            start = code
        elif not is_mark and start is not None:
            marks.append(chr(start) if start == code - 1 else f"{chr(start)}-{chr(code - 1)}")
            start = None
    return "".join(marks)


@functools.cache
def _fold_pattern() -> str:
    """Runs of what a title's signature folds to one space: every character that is neither a word
    character nor a combining mark (``combining_marks``), and ``_``."""
    return rf"(?:[^\w{combining_marks()}]|_)+"


def content_signature(items, columns: list[str], text_columns=()):
    """A string per item: the title in NFKC form and case-folded (on cudf lower-cased only), with
    punctuation, spacing and underscores folded to single spaces (letters, digits and combining marks
    of every script kept: "日本の料理" is not "Русский фильм", "दिल" is not "दाल"), plus ``columns``.
    An item whose title is missing, or has no letter or digit at all, gets a signature of its own (its
    id): nothing is known to match, so it is nobody's duplicate. Every column of ``text_columns``
    (the item table's text columns) is a title in this sense, as is ``title``."""
    items = items.reset_index(drop=True)  # the columns below are combined by index
    sig = None
    for column in columns:
        if column not in items.columns:
            raise ValueError(f"dedup.signature_columns names {column!r}, not a column of the item table")
        # pandas' astype(str) spells a missing value ("None", "nan", "<NA>"); cudf's keeps it null, and a
        # null made the whole signature null: groupby left it out, the item's canonical id was null and
        # ``canonical_items`` failed on it (``.values`` of a column with nulls). One spelling for both.
        text = items[column].astype(str).fillna("<NA>")
        if column == "title" or column in text_columns:
            # \W is Unicode-aware in Python's re (pandas); `_` is a word character, so folded too.
            # NFKC and casefold first, as the denylist folds titles (``content_filter._fold``): a
            # decomposed "é" (NFD, as macOS writes names) is the composed one, full-width "Ｔｏｙ" is
            # "toy", the ligature "ﬁ" is "fi", "ß" is "ss" (NFC and lower() kept the full-width and
            # ligature titles apart from their ASCII copies). The combining marks' class (hundreds of
            # ranges) only where Python's re runs it: cudf's regex engine on the GPU is untested with
            # it, and cudf has no normal forms and no casefold either: lower() only there.
            if hasattr(text.str, "normalize"):  # pandas
                text, fold = text.str.normalize("NFKC").str.casefold(), _fold_pattern()
            else:  # cudf
                text, fold = text.str.lower(), r"[\W_]+"
            text = text.str.replace(fold, " ", regex=True).str.strip()
            unknown = items[column].isna() | ~text.str.contains(r"[^\W_]", regex=True)  # no letter or digit
            # "#" cannot survive the folding above, so no real title can equal this
            text = text.where(~unknown, "#id:" + items["item_id"].astype(str))
        sig = text if sig is None else sig + "|" + text
    return sig


def canonical_item_map(items, columns: list[str], text_columns=()):
    """Frame ``item_id, canonical_item_id`` for every item (identity for non-duplicates)."""
    items = items.reset_index(drop=True)
    frame = items[["item_id"]].copy()
    frame["signature"] = content_signature(items, columns, text_columns)
    frame["canonical_item_id"] = frame.groupby("signature")["item_id"].transform("min")
    return frame[["item_id", "canonical_item_id"]].reset_index(drop=True)


def apply_item_map(events, mapping):
    """Replace ``item_id`` with its canonical id in a dask event collection (small broadcast join)."""
    moved = mapping[mapping["item_id"] != mapping["canonical_item_id"]]
    if len(moved) == 0:
        return events
    if isinstance(moved, pd.DataFrame):
        # Nullable: pandas' left merge turned the int64 column into float64 for the unmatched rows, and
        # an id beyond 2**53 (a 64-bit hash or snowflake id) came back rounded to another id. cudf's
        # int64 column holds nulls itself.
        moved = moved.astype({"canonical_item_id": "Int64"})
    columns = list(events.columns)
    merged = events.merge(moved, on="item_id", how="left")
    merged["item_id"] = merged["canonical_item_id"].fillna(merged["item_id"]).astype(events["item_id"].dtype)
    return merged[columns]


def canonical_items(events, items, config: DedupConfig, text_columns=()):
    """Map duplicated items to their canonical id. Returns ``(events, items, mapping, report)``.
    ``text_columns``: the item table's text columns (``Layout.item_text``), folded as titles."""
    if not config.canonical_items:
        mapping = items[["item_id"]].copy()
        mapping["canonical_item_id"] = mapping["item_id"]
        return events, items, mapping, report("dedup_canonical_items", events, events, enabled=False)
    mapping = canonical_item_map(items, config.signature_columns, text_columns)
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


def duplicate_ids(mapping):
    """The rows of ``mapping`` (``item_id, canonical_item_id`` for every raw item) whose id is a
    duplicate, as ``item_id_raw, canonical_item_id_raw``: what a model version keeps so that serving
    can read a duplicate's raw id as its canonical item (``serving/item_aliases.py``)."""
    moved = mapping[mapping["item_id"] != mapping["canonical_item_id"]]
    out = moved.rename(columns={"item_id": "item_id_raw", "canonical_item_id": "canonical_item_id_raw"})
    return out[["item_id_raw", "canonical_item_id_raw"]].reset_index(drop=True)


def aggregate_pairs(events, first_columns: list[str] | None = None, signals: list[str] | None = None) -> object:
    """One row per (user, item): earliest timestamp, ``max`` of every signal, and ``first_columns``
    as they were at that earliest timestamp.

    ``first_columns`` are the point-in-time features. The cumulative counts never decrease, but
    windowed activity counts (``user_events_last_1h``) do, so the row's features are taken from its
    first impression itself (the least value among impressions at that same second, which share
    their features), never from a later one: a pair seen at t and again ten days later must not
    carry at t what the user did by then. ``signals``: the event log's signal columns (default the
    raw schema's click, watch_seconds, like, share).
    """
    keys = ["user_id", "item_id"]
    first_columns = list(first_columns or [])
    spec = {"timestamp": "min", **{s: "max" for s in (SIGNALS_MAX if signals is None else signals)}}
    extra = [c for c in events.columns if c not in spec and c not in keys and c not in first_columns]
    if extra:
        raise ValueError(f"aggregate_pairs does not know how to combine column(s) {extra}")
    out = events.groupby(keys).agg(spec, split_out=events.npartitions).reset_index()
    if first_columns:
        at_first = events[[*keys, "timestamp", *first_columns]].merge(
            out[[*keys, "timestamp"]], on=[*keys, "timestamp"], how="inner"
        )
        firsts = at_first.groupby(keys).agg({c: "min" for c in first_columns}, split_out=events.npartitions)
        out = out.merge(firsts.reset_index(), on=keys, how="left")
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
