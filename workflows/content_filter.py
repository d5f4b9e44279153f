"""Unsafe-content filter: a pluggable classifier over the item table; flagged items are removed
from the events (never trained on) and from the item table (never indexed, never served).

The default classifier is a whole-word, case-insensitive denylist over the configured text columns
(on CPU, term and text both folded by NFKC and casefold: full-width letters and ligatures match too).
Any function ``(items_frame, ContentFilterConfig) -> boolean series`` can replace it through
``content_filter.classifier: "package.module:function"`` (e.g. a moderation model's scores).

Items taken down at serving (``scripts/takedown.py``: the live store's takedown list,
``workflows/live_store.py``) are unsafe too: a takedown removes an item from every served list at
once and, through this filter, from the next training run and export. One list, two readers.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd

from configs import ContentFilterConfig
from workflows.dedup import combining_marks
from workflows.live_store import STORE_ENV, describe, is_postgres, taken_down_items
from workflows.report import report
from workflows.rows import IsIn, filter_rows

log = logging.getLogger(__name__)


def _whole(term: str, word: str | None = None) -> str:
    """``term`` as a regex matching it as a whole word or phrase. A word boundary is asked for only at
    an end that is a word character: ``\\b`` next to punctuation needs a word character on the far side,
    so ``f***`` wrapped in ``\\b...\\b`` matched "f***ing" but never "f***" on its own. The words of a
    phrase match across any run of whitespace (a title's double space or line break).

    ``word``: a regex class of the word characters, whose edges are the boundaries (lookarounds)
    instead of ``\\b``: Python's ``\\b`` takes a combining mark for a word's end, so "मार" matched inside
    "कुमार" (after the vowel sign "ु")."""
    term = term.strip()
    word_start = re.match(word or r"\w", term)
    word_end = re.search((word or r"\w") + "$", term)
    if word is None:
        start, end = r"\b" if word_start else "", r"\b" if word_end else ""
    else:
        start, end = f"(?<!{word})" if word_start else "", f"(?!{word})" if word_end else ""
    return start + r"\s+".join(re.escape(part) for part in term.split()) + end


def _fold(text: str) -> str:
    """What the denylist compares on CPU: NFKC (compatibility forms and accents composed) and casefold,
    as ``pandas.Series.str.normalize("NFKC").str.casefold()`` does to the titles."""
    return unicodedata.normalize("NFKC", text).casefold()


def keyword_classifier(items, config: ContentFilterConfig):
    """True for items whose text columns contain a denylisted word or phrase (whole words only)."""
    if not config.denylist:
        return items["item_id"] < items["item_id"].min()  # nothing is unsafe: an all-False series
    # Combining marks are part of a word where Python's re runs the pattern (pandas); cudf's regex
    # engine on the GPU is untested with lookbehinds and the marks' class, and keeps ``\b``.
    on_pandas = isinstance(items, pd.DataFrame)
    word = rf"[\w{combining_marks()}]" if on_pandas else None
    # NFKC, then casefold, on both sides (pandas): a decomposed "é" (NFD, as macOS writes names) is the
    # composed one, full-width "ＸＸＸ" is "xxx", the ligature "ﬁ" is "fi" and "ß" is "ss" (NFC and
    # lower() only let a title in full-width letters past a term typed in ASCII). cudf has no normal
    # forms and no casefold: lower() only there.
    terms = [_fold(w) if on_pandas else w.lower() for w in config.denylist]
    pattern = "|".join(_whole(w) for w in terms)
    # The lookarounds are ten times slower than ``\b``: they only confirm the titles ``pattern`` found,
    # which it finds all of (its boundaries are looser).
    exact = "|".join(_whole(w, word) for w in terms) if on_pandas else None
    flagged = None
    for column in config.columns:
        if column not in items.columns:
            raise ValueError(f"content_filter.columns names {column!r}, not a column of the item table")
        text = items[column].astype(str)
        text = text.str.normalize("NFKC").str.casefold() if on_pandas else text.str.lower()
        hit = text.str.contains(pattern, regex=True)
        if exact is not None and hit.any():
            hit[hit] = text[hit].str.contains(exact, regex=True)  # pandas: no missing text after astype
        flagged = hit if flagged is None else (flagged | hit)
    return flagged.fillna(False).astype(bool)


def load_classifier(name: str):
    """``keyword`` or a ``package.module:function`` dotted path."""
    if name == "keyword":
        return keyword_classifier
    module, sep, attr = name.partition(":")
    if not sep:
        raise ValueError(f"content_filter.classifier must be 'keyword' or 'package.module:function', got {name!r}")
    return getattr(importlib.import_module(module), attr)


def unsafe_item_ids(items, config: ContentFilterConfig):
    """Ids (host array) of the items the configured classifier flags."""
    flags = load_classifier(config.classifier)(items, config)
    ids = items["item_id"][flags.values if hasattr(flags, "values") else flags]
    return ids.values_host if hasattr(ids, "values_host") else ids.values


def takedown_ids(config: ContentFilterConfig) -> np.ndarray:
    """Raw ids of the items down now in the configured live store (``takedowns``, else
    ``$FUNNEL_STORE_URL``; none if neither is set)."""
    location = config.takedowns or os.environ.get(STORE_ENV, "")
    if not location:
        return np.zeros(0, dtype=np.int64)
    if not is_postgres(location) and not Path(location).exists():
        if config.takedowns:
            raise ValueError(f"content_filter.takedowns names {describe(location)}, which does not exist")
        # Opening it created an empty store there and applied no takedown, silently. It may be a
        # deployment that has not started yet (nothing taken down), or a mistyped path: say so.
        log.warning("$%s names %s, which does not exist: no takedown applied", STORE_ENV, describe(location))
        return np.zeros(0, dtype=np.int64)
    return taken_down_items(location)


def content_filter(events, items, config: ContentFilterConfig, item_map=None, raw_items=None):
    """Remove unsafe items from ``events`` (dask) and ``items`` (a cudf/pandas frame).

    After duplicates were mapped to one canonical id (the pipeline's order), pass the map
    (``item_id, canonical_item_id``, ``workflows/dedup.py``) and the item table from before it: an
    item is unsafe when any of its ids is. The classifier reads every raw item's text (a denylisted
    word in a duplicate's title counts), and a takedown of a duplicate's id takes the canonical item
    down with it.

    Returns ``(events, items, unsafe_ids, report)``.
    """
    if not config.enabled:
        # A host array either way (cudf's .values is a device one), as the enabled path returns.
        return events, items, np.zeros(0, dtype=np.int64), report("content_filter", events, events, enabled=False)
    taken_down = takedown_ids(config)
    unsafe = np.asarray(unsafe_item_ids(items if raw_items is None else raw_items, config), dtype=np.int64)
    if taken_down.size:  # ids the item table lacks too: their events go, whatever the table says
        unsafe = np.union1d(unsafe, taken_down)
    if item_map is not None and len(unsafe):
        flagged = item_map[item_map["item_id"].isin(list(unsafe))]["canonical_item_id"]
        flagged = flagged.values_host if hasattr(flagged, "values_host") else flagged.to_numpy()
        unsafe = np.union1d(unsafe, np.asarray(flagged, dtype=np.int64))
    kept = filter_rows(events, IsIn("item_id", unsafe, keep=False)).persist()
    kept_items = items[~items["item_id"].isin(list(unsafe))].reset_index(drop=True)
    rep = report(
        "content_filter",
        events,
        kept,
        classifier=config.classifier,
        unsafe_items=int(len(unsafe)),
        taken_down=int(len(taken_down)),
        catalog_before=int(len(items)),
        catalog_after=int(len(kept_items)),
    )
    return kept, kept_items, unsafe, rep
