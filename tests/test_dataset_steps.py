"""Each dataset step against the synthetic generator's ground truth (small data, no training)."""

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

from configs import ActiveUsersConfig, ContentFilterConfig, DedupConfig, RecencyWindowConfig, SyntheticDataConfig
from workflows.sources.synthetic import generate

CFG = SyntheticDataConfig(num_users=300, num_items=200, events_per_user=40, seed=11)


@pytest.fixture(scope="module")
def world():
    return generate(CFG)


def ddf(frame, parts=3):
    return dd.from_pandas(frame, npartitions=parts)


# --- dedup -----------------------------------------------------------------------------------------


def test_identical_rows_are_dropped_and_counted(world):
    from workflows.dedup import drop_identical_rows

    unique = world.events.drop_duplicates()
    assert len(world.events) - len(unique) == world.truth.repeated_events > 0
    copies = unique.sample(50, random_state=0)
    kept, rep = drop_identical_rows(ddf(pd.concat([unique, copies])))
    assert rep.rows_removed == 50
    assert len(kept.compute()) == len(unique)


def test_pipeline_drops_exactly_the_planted_repeated_events(processed, small_data):
    assert small_data.truth.repeated_events > 0
    steps = {s["step"]: s for s in processed.summary["steps"]}
    assert steps["dedup_identical_rows"]["rows_removed"] == small_data.truth.repeated_events


def test_content_signature_finds_exactly_the_reposted_items(world):
    from workflows.dedup import canonical_item_map, canonical_items

    truth = world.truth.duplicate_of
    assert len(truth) == round(CFG.duplicate_item_fraction * CFG.num_items)
    mapping = canonical_item_map(world.items, DedupConfig().signature_columns)
    found = mapping[mapping["item_id"] != mapping["canonical_item_id"]]
    assert dict(zip(found["item_id"], found["canonical_item_id"])) == truth

    events, items, _, rep = canonical_items(ddf(world.events), world.items, DedupConfig())
    mapped = events.compute()
    assert not set(truth) & set(mapped["item_id"]) and not set(truth) & set(items["item_id"])
    assert len(mapped) == len(world.events) and rep.items_removed == len(truth)
    # The events of a re-post now count for the original.
    original = next(iter(truth.values()))
    moved = world.events["item_id"].isin([k for k, v in truth.items() if v == original]).sum()
    assert (mapped["item_id"] == original).sum() == (world.events["item_id"] == original).sum() + moved


def test_duplicate_pairs_are_aggregated_without_double_counting():
    from workflows.dedup import dedup_pairs

    events = pd.DataFrame(
        {
            "user_id": [1, 1, 1, 2, 2],
            "item_id": [10, 10, 10, 10, 11],
            "timestamp": [5, 3, 9, 4, 4],
            "click": [0, 1, 1, 0, 1],
            "watch_seconds": [0, 30, 12, 0, 7],
            "like": [0, 0, 1, 0, 0],
            "share": [0, 0, 0, 0, 0],
        }
    )
    out, rep = dedup_pairs(ddf(events, 2), DedupConfig())
    out = out.compute().sort_values(["user_id", "item_id"]).reset_index(drop=True)
    assert rep.rows_removed == 2 and len(out) == 3
    first = out.iloc[0]
    # Shown three times, clicked twice: one clicked example, the longest watch, the first timestamp.
    assert (first["timestamp"], first["click"], first["watch_seconds"], first["like"]) == (3, 1, 30, 1)


def test_a_deduplicated_pair_keeps_the_features_of_its_first_impression():
    """Windowed activity counts go down as well as up: the pair's row at its first timestamp must not
    carry the counts of a later impression (here: 0 events in the last hour, ten days later)."""
    from workflows.activity import add_activity_counts, column_names
    from workflows.dedup import dedup_pairs
    from workflows.point_in_time import POINT_IN_TIME_COLUMNS, add_point_in_time_counts

    hour, day = 3600, 86400
    events = pd.DataFrame(
        {
            "user_id": [1, 1, 1, 1],
            "item_id": [20, 21, 10, 10],
            "timestamp": [1000, 1100, 1200, 1200 + 10 * day],
            "click": [1, 1, 0, 1],
            "watch_seconds": 0,
            "like": 0,
            "share": 0,
        }
    )
    featured = add_activity_counts(add_point_in_time_counts(ddf(events, 2)), [hour])
    columns = POINT_IN_TIME_COLUMNS + column_names([hour])
    out, _ = dedup_pairs(featured, DedupConfig(), columns)
    row = out.compute().set_index("item_id").loc[10]
    first = featured.compute().query("item_id == 10 and timestamp == 1200").iloc[0]
    assert row["timestamp"] == 1200 and row["click"] == 1
    assert row["user_events_last_1h"] == 2 and row["user_clicks_last_1h"] == 2  # it was 0: the later visit's
    assert row[columns].tolist() == first[columns].tolist()


# --- unsafe content --------------------------------------------------------------------------------


def test_default_classifier_flags_exactly_the_unsafe_items(world):
    from workflows.content_filter import content_filter, unsafe_item_ids

    flagged = unsafe_item_ids(world.items, ContentFilterConfig())
    assert len(world.truth.unsafe_items) > 0
    assert sorted(flagged) == sorted(world.truth.unsafe_items)
    events, items, _, rep = content_filter(ddf(world.events), world.items, ContentFilterConfig())
    assert not set(flagged) & set(events.compute()["item_id"]) and not set(flagged) & set(items["item_id"])
    assert rep.rows_removed == world.events["item_id"].isin(flagged).sum()


def test_denylisted_terms_that_start_or_end_with_punctuation_match_as_whole_terms():
    """``\\b`` beside punctuation needs a word character on the far side: wrapped in ``\\b...\\b``, the
    terms ``f***`` and ``(adult)`` matched no title that held them on their own."""
    import pandas as pd

    from workflows.content_filter import keyword_classifier

    items = pd.DataFrame(
        {
            "item_id": [1, 2, 3, 4, 5],
            "title": ["What the F*** was that", "An (adult) film", "grassy hills", "ass", "f***ing"],
        }
    )
    config = ContentFilterConfig(denylist=["f***", "(adult)", "ass"], columns=["title"])
    assert keyword_classifier(items, config).tolist() == [True, True, False, True, True]


def test_a_blank_denylist_term_is_refused_and_blanks_around_terms_do_not_count():
    """An empty term (a stray "" in the YAML list) made a pattern that matched every title: every item
    was flagged unsafe and the whole catalog filtered out. " nsfw " matched only after a space, and a
    phrase only with exactly its single spaces."""
    import pandas as pd

    from workflows.content_filter import keyword_classifier

    for bad in ([""], ["gore", "  "]):
        with pytest.raises(ValueError, match="content_filter.denylist has empty terms"):
            ContentFilterConfig(denylist=bad)
    items = pd.DataFrame(
        {"item_id": [1, 2, 3, 4], "title": ["a nice film", "nsfw clip", "Graphic  violence", "graphic\nviolence!"]}
    )
    config = ContentFilterConfig(denylist=[" nsfw ", "graphic violence"], columns=["title"])
    assert config.denylist == ["nsfw", "graphic violence"]
    assert keyword_classifier(items, config).tolist() == [False, True, True, True]


def test_denylisted_terms_match_whole_words_in_scripts_with_vowel_signs():
    """Python's ``\\b`` takes a vowel sign (a combining mark, "ु" in "कुमार") for the end of a word: the
    term "मार" matched inside the name "कुमार", and "बिल्ली", which ends in a vowel sign, had no end
    boundary at all and matched inside longer words."""
    import pandas as pd

    from workflows.content_filter import keyword_classifier

    items = pd.DataFrame(
        {"item_id": [1, 2, 3, 4, 5], "title": ["कुमार की कहानी", "मार", "मार-पीट", "बिल्लीयाँ", "एक बिल्ली"]}
    )
    config = ContentFilterConfig(denylist=["मार", "बिल्ली"], columns=["title"])
    assert keyword_classifier(items, config).tolist() == [False, True, True, False, True]


def test_a_denylisted_word_matches_whether_its_accents_are_composed_or_decomposed():
    """A title in decomposed form (NFD, as macOS writes names: "e" + U+0301 for "é") escaped the term
    "pédé" typed composed, and a decomposed term missed the composed titles."""
    import unicodedata

    import pandas as pd

    from workflows.content_filter import keyword_classifier

    titles = [unicodedata.normalize(form, "Le pédé du village") for form in ("NFC", "NFD")] + ["Le pede"]
    items = pd.DataFrame({"item_id": [1, 2, 3], "title": titles})
    for form in ("NFC", "NFD"):
        config = ContentFilterConfig(denylist=[unicodedata.normalize(form, "pédé")], columns=["title"])
        assert keyword_classifier(items, config).tolist() == [True, True, False], form


def test_a_denylisted_word_matches_in_full_width_letters_ligatures_and_any_case_form():
    """A title in full-width letters ("ＸＸＸ", U+FF38) escaped the term "xxx" typed in ASCII, and so did
    a ligature ("ﬁ") and "ß" against "ss": NFC and lower() fold none of them (NFKC and casefold do)."""
    import pandas as pd

    from workflows.content_filter import keyword_classifier

    titles = ["ＸＸＸ ｐａｒｔｙ", "xxx party", "ｆｕｃｋ", "a ﬁne ﬁlm", "STRASSE", "Straße", "xxxl party", "finest"]
    items = pd.DataFrame({"item_id": list(range(1, 9)), "title": titles})
    for terms in (["xxx", "fine", "straße"], ["ＸＸＸ", "ﬁne", "STRASSE"]):
        config = ContentFilterConfig(denylist=terms, columns=["title"])
        got = keyword_classifier(items, config).tolist()
        assert got == [True, True, False, True, True, True, False, False], terms
    config = ContentFilterConfig(denylist=["fuck"], columns=["title"])
    assert keyword_classifier(items, config).tolist()[2] is True


def test_signatures_keep_every_script_and_never_match_a_missing_title():
    """Titles in Japanese, Russian or with accents used to fold to nothing (or lose letters), and a
    missing title became "none": different films of one category and length then merged."""
    from workflows.dedup import canonical_item_map

    items = pd.DataFrame(
        {
            "item_id": [1, 2, 3, 4, 5, 6, 7, 8],
            "category": ["film"] * 8,
            "duration_seconds": [600] * 8,
            "title": ["日本の料理", "Русский фильм", "Café crème", "Caf crme", None, None, "!!!", "café  CRÈME!"],
        }
    )
    mapping = canonical_item_map(items, DedupConfig().signature_columns).set_index("item_id")["canonical_item_id"]
    assert mapping.to_dict() == {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 7: 7, 8: 3}  # only the true repost merges


def test_signatures_keep_combining_marks_and_match_either_unicode_form():
    """Vowel signs and tone marks are combining marks, not letters to Python's ``\\W``: they were folded
    to spaces, so "दिल" (heart) and "दाल" (lentils) both became "द ल" and merged, as did Thai "ไก่" and
    "ไก้"; and a title in decomposed form (NFD, as macOS writes it) never matched the same title composed."""
    import unicodedata

    from workflows.dedup import canonical_item_map

    titles = ["दिल", "दाल", "ไก่", "ไก้", "Café crème", unicodedata.normalize("NFD", "Café crème"), "Cafe creme"]
    items = pd.DataFrame({"item_id": range(1, 8), "category": "film", "duration_seconds": 600, "title": titles})
    mapping = canonical_item_map(items, DedupConfig().signature_columns).set_index("item_id")["canonical_item_id"]
    assert mapping.to_dict() == {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 5, 7: 7}


def test_a_text_column_of_any_name_is_a_title_in_the_signature():
    """own-data.md: point ``signature_columns`` at your own text columns. Only a column named ``title``
    was folded and guarded, so in ``[name, category]`` every item without a name in one category was
    one item (all "None|a"), and "Cat video" / "cat  video!" stayed two."""
    from workflows.dedup import canonical_items

    items = pd.DataFrame(
        {"item_id": [1, 2, 3, 4, 5], "category": ["a"] * 5, "name": [None, None, "Cat video", "cat  video!", None]}
    )
    events = pd.DataFrame({"user_id": [7, 8, 9, 10, 11], "item_id": [1, 2, 3, 4, 5], "timestamp": [1, 2, 3, 4, 5]})
    config = DedupConfig(signature_columns=["name", "category"])
    _, kept, item_map, _ = canonical_items(ddf(events, 1), items, config, text_columns=["name"])
    assert item_map.set_index("item_id")["canonical_item_id"].to_dict() == {1: 1, 2: 2, 3: 3, 4: 3, 5: 5}
    assert kept["item_id"].tolist() == [1, 2, 3, 5]


NULL_CATEGORY_ITEMS = {
    "item_id": [1, 2, 3],
    "category": [None, None, None],
    "duration_seconds": [60.0, 60.0, 60.0],
    "title": ["Cat video", "cat  video!", "Dog video"],
}


def test_a_missing_signature_attribute_keeps_the_item_when_astype_str_keeps_nulls(monkeypatch):
    """cudf's ``astype(str)`` keeps a null (pandas spells it "None"), and ``+`` propagates it: the item's
    whole signature was null, groupby left it out, its canonical id was null and the item went from
    the table (on cudf ``.values`` of the null mask raised). Emulated here on pandas, as cudf does it."""
    from workflows.dedup import canonical_items

    astype = pd.Series.astype

    def astype_like_cudf(self, dtype, *args, **kwargs):
        out = astype(self, dtype, *args, **kwargs)
        return out.where(self.notna(), None) if dtype is str else out

    monkeypatch.setattr(pd.Series, "astype", astype_like_cudf)
    items = pd.DataFrame(NULL_CATEGORY_ITEMS)
    events = pd.DataFrame({"user_id": [7, 8, 9], "item_id": [1, 2, 3], "timestamp": [1, 2, 3]})
    mapped, kept, item_map, _ = canonical_items(ddf(events, 1), items, DedupConfig())
    assert item_map.set_index("item_id")["canonical_item_id"].to_dict() == {1: 1, 2: 1, 3: 3}
    assert kept["item_id"].tolist() == [1, 3]
    assert mapped.compute()["item_id"].tolist() == [1, 1, 3]


def test_canonical_item_map_on_cudf_matches_pandas_with_missing_attributes():
    """The same on a real cudf frame (GPU machines only)."""
    cudf = pytest.importorskip("cudf")
    from workflows.dedup import canonical_item_map

    items = pd.DataFrame(NULL_CATEGORY_ITEMS)
    got = canonical_item_map(cudf.from_pandas(items), DedupConfig().signature_columns).to_pandas()
    want = canonical_item_map(items, DedupConfig().signature_columns)
    assert got.set_index("item_id")["canonical_item_id"].to_dict() == {1: 1, 2: 1, 3: 3}
    assert want.set_index("item_id")["canonical_item_id"].to_dict() == {1: 1, 2: 1, 3: 3}


def test_item_ids_beyond_2_53_survive_the_mapping_to_canonical_ids():
    """Ids up to int64's end are valid (validate.py refuses only beyond it). The left merge onto the
    duplicates made the canonical column float64, and every event's id came back rounded: 2**62 + 1,
    + 3 and + 5 all became 2**62, three items one."""
    from workflows.dedup import canonical_items

    big = 2**62
    items = pd.DataFrame(
        {
            "item_id": [big + 1, big + 3, big + 5],
            "category": ["a"] * 3,
            "duration_seconds": [60] * 3,
            "title": ["Cat video", "cat  video!", "Dog video"],
        }
    )
    events = pd.DataFrame({"user_id": [7, 8, 9], "item_id": [big + 1, big + 3, big + 5], "timestamp": [1, 2, 3]})
    mapped, _, _, _ = canonical_items(ddf(events, 1), items, DedupConfig())
    assert mapped.compute()["item_id"].tolist() == [big + 1, big + 1, big + 5]


def test_an_unsafe_or_taken_down_duplicate_id_takes_its_canonical_item_down(tmp_path):
    """Duplicates are mapped before the content filter: a denylisted word in a duplicate's title, or
    a takedown of a duplicate's id, used to miss the canonical item that carries its events."""
    from workflows.content_filter import content_filter
    from workflows.dedup import canonical_items
    from workflows.live_store import LiveStore

    items = pd.DataFrame(
        {
            "item_id": [1, 2, 3, 4, 5],
            "category": ["a", "a", "b", "c", "c"],
            "duration_seconds": [60, 60, 60, 90, 90],
            "title": ["Cat video", "cat  video!", "Dog video", "Self harm tips", "Self-harm tips"],
        }
    )
    events = pd.DataFrame({"user_id": [7, 8, 9, 10, 11], "item_id": [1, 2, 3, 4, 5], "timestamp": [1, 2, 3, 4, 5]})
    store = str(tmp_path / "live.sqlite")
    LiveStore(store).set_takedown(2, True, "reported", "moderator")
    mapped, canonical, item_map, _ = canonical_items(ddf(events, 1), items, DedupConfig())
    assert item_map.set_index("item_id")["canonical_item_id"].to_dict() == {1: 1, 2: 1, 3: 3, 4: 4, 5: 4}
    config = ContentFilterConfig(denylist=["self-harm"], takedowns=store)
    kept, kept_items, unsafe, _ = content_filter(mapped, canonical, config, item_map, items)
    assert kept.compute()["user_id"].tolist() == [9] and kept_items["item_id"].tolist() == [3]
    assert {1, 2, 4, 5} <= set(unsafe.tolist())


def test_takedowns_still_apply_to_an_item_table_without_the_filters_text_columns(tmp_path):
    """own-data.md: with no ``title`` the *keyword* filter is switched off; live-features.md: an item
    taken down is out of the next training run. The adaptation switched the whole filter off, and a
    taken-down item of such a table was trained on and exported again."""
    from types import SimpleNamespace

    from configs import WorkflowConfig
    from workflows.adapt import adapt_workflow_config
    from workflows.content_filter import content_filter
    from workflows.live_store import LiveStore

    store = str(tmp_path / "live.sqlite")
    LiveStore(store).set_takedown(2, True, "reported", "moderator")
    items = pd.DataFrame({"item_id": [1, 2, 3], "brand": ["a", "b", "c"]})  # no title
    events = pd.DataFrame({"user_id": [7, 8, 9], "item_id": [1, 2, 3], "timestamp": [1, 2, 3]})
    config = WorkflowConfig(content_filter=ContentFilterConfig(takedowns=store))
    layout = SimpleNamespace(signals=("click",), positive="click")
    adapted, notes = adapt_workflow_config(config, layout, list(items.columns))
    assert any("content_filter" in note and "title" in note for note in notes)
    kept, kept_items, unsafe, _ = content_filter(ddf(events, 1), items, adapted.content_filter)
    assert kept_items["item_id"].tolist() == [1, 3] and unsafe.tolist() == [2]
    assert kept.compute()["item_id"].tolist() == [1, 3]


def long_items_are_unsafe(items, config):
    """A stand-in for any pluggable classifier: flags long items."""
    return items["duration_seconds"] > 1000


def test_classifier_is_pluggable_by_dotted_path(world):
    from workflows.content_filter import unsafe_item_ids

    cfg = ContentFilterConfig(classifier="tests.test_dataset_steps:long_items_are_unsafe")
    flagged = unsafe_item_ids(world.items, cfg)
    assert sorted(flagged) == sorted(world.items.loc[world.items["duration_seconds"] > 1000, "item_id"])
    with pytest.raises(ValueError, match="classifier"):
        unsafe_item_ids(world.items, ContentFilterConfig(classifier="not a path"))


def test_unsafe_and_duplicate_items_are_never_trained_on_or_served(processed, small_data):
    train_items = set(pd.read_parquet(processed.train_events)["item_id"])
    served = set(pd.read_parquet(processed.item_features)["item_id_raw"])
    bad = set(small_data.truth.unsafe_items) | set(small_data.truth.duplicate_of)
    assert bad and not bad & train_items and not bad & served
    assert sorted(processed.summary["unsafe_items"]) == sorted(small_data.truth.unsafe_items)
    id_map = pd.read_parquet(processed.item_id_map)
    moved = id_map[id_map["item_id"] != id_map["canonical_item_id"]]
    assert dict(zip(moved["item_id"], moved["canonical_item_id"])) == small_data.truth.duplicate_of


# --- freshness and activity ------------------------------------------------------------------------


def test_recency_window_keeps_the_last_days(world):
    from workflows.recency_window import recency_window

    kept, rep = recency_window(ddf(world.events), RecencyWindowConfig(days=7))
    start = world.events["timestamp"].max() + 1 - 7 * 86_400
    assert rep.rows_after == (world.events["timestamp"] >= start).sum() > 0
    assert kept.compute()["timestamp"].min() >= start
    unchanged, rep0 = recency_window(ddf(world.events), RecencyWindowConfig(days=0))
    assert rep0.rows_removed == 0
    # Exactly one day of seconds for days=1, as the active-user window counts it: an event one day
    # older than the newest is out.
    edge = pd.DataFrame({"user_id": [1, 1, 1], "item_id": [1, 2, 3], "timestamp": [0, 1, 86_400]})
    kept, _ = recency_window(ddf(edge, 1), RecencyWindowConfig(days=1))
    assert kept.compute()["timestamp"].tolist() == [1, 86_400]


def test_a_fractional_day_window_is_its_exact_seconds_at_the_boundary():
    """0.7 days is 60480 s; truncating 0.7 x 86400 (60479.99999999999 in floats) lost the window's first second."""
    from workflows.active_users import active_user_ids
    from workflows.recency_window import recency_window

    newest = 1_000_000
    first = newest + 1 - 60_480  # the first second of [newest + 1 - 0.7 days, newest + 1)
    edge = pd.DataFrame({"user_id": [1, 2, 3], "item_id": [1, 2, 3], "timestamp": [newest, first, first - 1]})
    edge = edge.assign(click=1)
    kept, _ = recency_window(ddf(edge, 1), RecencyWindowConfig(days=0.7))
    assert sorted(kept.compute()["timestamp"]) == [first, newest]  # it was [newest]
    ids = active_user_ids(ddf(edge, 1), ActiveUsersConfig(min_events=1, days=0.7))
    assert sorted(ids) == [1, 2]  # it was [1]


def test_active_users_drops_inactive_and_one_off_users(world):
    from workflows.active_users import active_users

    truth = set(world.truth.inactive_users) | set(world.truth.one_off_users)
    assert len(truth) == round((CFG.inactive_user_fraction + CFG.one_off_user_fraction) * CFG.num_users)
    cfg = ActiveUsersConfig(min_events=3, days=30, event="click")
    kept, rep = active_users(ddf(world.events), cfg)
    kept_users = set(kept.compute()["user_id"])
    assert not truth & kept_users
    # Exactly the users with >= 3 clicks in the window stay.
    clicks = world.events[world.events["click"] == 1].groupby("user_id").size()
    assert kept_users == set(clicks[clicks >= 3].index)
    assert rep.users_removed == world.events["user_id"].nunique() - len(kept_users)


def test_seed_example_ten_clicks_in_ten_days(world):
    from workflows.active_users import active_user_ids

    events = world.events
    end = int(events["timestamp"].max()) + 1
    recent = events[(events["timestamp"] >= end - 10 * 86_400) & (events["click"] == 1)]
    per_user = recent.groupby("user_id").size()
    ids = active_user_ids(ddf(events), ActiveUsersConfig(min_events=10, days=10, event="click"))
    assert set(ids) == set(per_user[per_user >= 10].index) and 0 < len(ids) < CFG.num_users


# --- labels ----------------------------------------------------------------------------------------


def _fit_labels(train):
    import nvtabular as nvt
    from merlin.io import Dataset

    from configs import WorkflowConfig
    from workflows.labels import label_graph

    workflow = nvt.Workflow(label_graph(WorkflowConfig()))
    workflow.fit(Dataset(train, npartitions=2))
    return workflow


def test_duration_watch_does_not_favour_the_short_clip():
    """The seed's example: 15 s of a 20 s clip vs 30 min of a 60 min tutorial."""
    from merlin.io import Dataset

    rng = np.random.default_rng(0)
    n = 4000
    duration = np.where(rng.random(n) < 0.5, 20, 3600)
    # As on real platforms: clips are mostly finished, hour-long tutorials mostly not.
    fraction = np.where(duration == 20, rng.uniform(0.7, 1.0, n), rng.uniform(0.05, 0.6, n))
    train = pd.DataFrame(
        {
            "click": 1,
            "watch_seconds": (fraction * duration).round().astype("int64"),
            "duration_seconds": duration,
            "like": 0,
            "share": 0,
        }
    )
    workflow = _fit_labels(train)
    examples = pd.DataFrame(
        {"click": [1, 1], "watch_seconds": [15, 1800], "duration_seconds": [20, 3600], "like": 0, "share": 0}
    )
    labels = workflow.transform(Dataset(examples)).to_ddf().compute()
    assert list(labels["watched"]) == [1, 0]  # "watched 75%" rewards the clip
    assert list(labels["duration_watch"]) == [0, 1]  # the duration-aware label rewards the tutorial


def test_duration_watch_has_the_same_positive_rate_in_every_duration_bucket(world):
    from merlin.io import Dataset

    joined = world.events.merge(world.items[["item_id", "duration_seconds"]], on="item_id")
    workflow = _fit_labels(joined[["click", "watch_seconds", "duration_seconds", "like", "share"]])
    labels = workflow.transform(Dataset(joined)).to_ddf().compute()
    clicked = joined["click"].values == 1
    short = clicked & (joined["duration_seconds"].values < 60)
    long = clicked & (joined["duration_seconds"].values >= 1200)
    watched_gap = labels["watched"].values[short].mean() - labels["watched"].values[long].mean()
    fair_gap = labels["duration_watch"].values[short].mean() - labels["duration_watch"].values[long].mean()
    assert watched_gap > 0.3, watched_gap  # the generator's duration bias is real...
    assert abs(fair_gap) < 0.1, fair_gap  # ...and the duration-aware label removes it


def test_duration_watch_threshold_is_the_exact_quantile_whatever_the_partitioning():
    """dask's quantile is approximate: on a time-sorted log whose two partitions hold disjoint
    fractions it gave a median of 1/6 where the clicked events' median is 1/3 (16 positives of 21)."""
    watch = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 20, 21, 22, 23, 24, 25, 26, 27, 28, 30]
    train = pd.DataFrame({"click": 1, "watch_seconds": watch, "duration_seconds": 30, "like": 0, "share": 0})
    train = pd.concat([train, train.head(3).assign(click=0, watch_seconds=0)], ignore_index=True)  # not counted
    from workflows.pipeline import _duration_op

    for parts in (1, 2, 3):
        op = _duration_op(_fit_labels(ddf(train, parts)))
        want = (train.loc[train["click"] == 1, "watch_seconds"] / 30).quantile(0.5)
        assert op.thresholds[0] == pytest.approx(want), parts  # the 30 s clips' bucket
        assert op.thresholds[1:] == pytest.approx([want] * 3)  # empty buckets: the overall median


def test_an_unwatched_impression_of_a_zero_second_item_is_not_watched():
    """0 s >= 75% of 0 s: every impression (and sampled negative) of a 0 s item was labelled watched."""
    from merlin.io import Dataset

    from workflows.checks import check_labels_agree

    train = pd.DataFrame(
        {
            "click": [0, 0, 1, 1],
            "watch_seconds": [0, 0, 4, 30],
            "duration_seconds": [0, 0, 0, 40],
            "like": 0,
            "share": 0,
        }
    )
    labels = _fit_labels(train).transform(Dataset(train)).to_ddf().compute()
    assert list(labels["watched"]) == [0, 0, 1, 1]
    check_labels_agree(ddf(train, 1), ddf(labels, 1), 0.75)  # the pipeline's check reads the label the same way


def test_watched_at_exactly_the_threshold_fraction_is_watched_whatever_the_threshold():
    """``watch_seconds >= threshold * duration`` missed the boundary where the product rounds up:
    0.55 * 100 is 55.000000000000007, so 55 s of 100 s was not "watched >= 55%" (0.28 * 25 too)."""
    import nvtabular as nvt
    from merlin.io import Dataset

    from configs import WorkflowConfig
    from workflows.checks import check_labels_agree
    from workflows.labels import label_graph

    for threshold, watch, duration in ((0.55, 55, 100), (0.28, 7, 25), (0.75, 45, 60)):
        train = pd.DataFrame(
            {
                "click": 1,
                "watch_seconds": [watch, watch - 1, watch],
                "duration_seconds": [duration, duration, duration + 1],
                "like": 0,
                "share": 0,
            }
        )
        workflow = nvt.Workflow(label_graph(WorkflowConfig(watch_threshold=threshold)))
        labels = workflow.fit_transform(Dataset(train, npartitions=1)).to_ddf().compute()
        assert list(labels["watched"]) == [1, 0, 0], (threshold, watch, duration)
        check_labels_agree(ddf(train, 1), ddf(labels, 1), threshold)


def test_an_event_of_an_item_without_a_duration_gets_no_watch_label():
    """checks.missing_items: warn keeps an item the item table lacks, with a null duration: the label
    workflow failed on it (the duration bucket cast NaN to int64), so the whole pipeline did."""
    from merlin.io import Dataset

    train = pd.DataFrame(
        {
            "click": [1, 1, 1],
            "watch_seconds": [30, 50, 40],
            "duration_seconds": [40.0, np.nan, 60.0],
            "like": 0,
            "share": 0,
        }
    )
    labels = _fit_labels(train).transform(Dataset(train)).to_ddf().compute()
    assert list(labels["watched"]) == [1, 0, 0] and list(labels["duration_watch"]) == [1, 0, 1]


def test_clickbait_wins_on_clicks_and_loses_on_duration_watch(processed, small_data):
    from workflows.pipeline import category_mapping

    train = processed.train().to_ddf().compute()
    raw = category_mapping(processed.workflow(), "item_id").set_index("encoded")["raw"]
    bait = train["item_id"].map(raw).isin(small_data.truth.clickbait_items)
    assert bait.sum() > 20
    assert train.loc[bait, "click"].mean() > train.loc[~bait, "click"].mean() + 0.1
    clicked = train["click"] == 1
    assert (
        train.loc[bait & clicked, "duration_watch"].mean() < 0.5 * train.loc[~bait & clicked, "duration_watch"].mean()
    )


# --- generator knobs ------------------------------------------------------------------------------


def test_interest_drift_moves_tastes_over_time():
    from evaluation.metrics import roc_auc

    data = generate(SyntheticDataConfig(num_users=300, num_items=200, events_per_user=40, seed=5, interest_drift=1.0))
    e = data.events
    late = e[e["timestamp"] >= e["timestamp"].quantile(0.75)]
    early = e[e["timestamp"] <= e["timestamp"].quantile(0.25)]
    start_late = roc_auc(late["click"].values, data.true_affinity(late["user_id"], late["item_id"]))
    end_late = roc_auc(late["click"].values, data.true_affinity(late["user_id"], late["item_id"], at_end=True))
    start_early = roc_auc(early["click"].values, data.true_affinity(early["user_id"], early["item_id"]))
    end_early = roc_auc(early["click"].values, data.true_affinity(early["user_id"], early["item_id"], at_end=True))
    assert end_late > start_late + 0.05 and start_early > end_early + 0.05


def test_popularity_is_zipf_skewed(world):
    counts = world.events["item_id"].value_counts().values
    top = counts[: len(counts) // 10].sum() / counts.sum()
    assert top > 0.25  # the top 10% of items take far more than 10% of impressions


def test_attributes_join_onto_a_part_with_an_empty_partition():
    """A part with an empty partition (a filter or a shuffle left one without rows) made Merlin's
    executor look for the joined columns among the event columns: ``KeyError: "['gender'] not in
    index"``, and the pipeline stopped at the join."""
    from workflows.joins import apply_join, attribute_join

    events = pd.DataFrame({"user_id": [1, 2, 3], "item_id": [5, 6, 5], "timestamp": [1, 2, 3], "click": [1, 0, 1]})
    part = dd.from_pandas(events, npartitions=3)
    part = part[part["user_id"] != 2]  # the middle partition is left empty
    assert part.map_partitions(len).compute().tolist() == [1, 0, 1]
    users = pd.DataFrame({"user_id": [1, 2, 3], "gender": ["a", "b", "c"]})
    items = pd.DataFrame({"item_id": [5, 6], "category": ["x", "y"]})
    join = attribute_join(users, items, list(part.columns), ["user_id", "gender"], ["item_id", "category"])
    out = apply_join(join, part).to_ddf().compute().sort_values("user_id")
    assert out[["user_id", "gender", "category"]].values.tolist() == [[1, "a", "x"], [3, "c", "x"]]


def test_signatures_fold_compatibility_forms_and_case_as_the_denylist_does():
    """The signature took NFC and lower() only, while the denylist folds NFKC and casefold: a title in
    full-width letters ("Ｔｏｙ Ｓｔｏｒｙ"), with a ligature ("ﬁ") or "ß" stayed a second item beside
    its ASCII copy."""
    from workflows.dedup import canonical_item_map

    titles = ["Toy Story", "Ｔｏｙ　Ｓｔｏｒｙ", "The Fifth Element", "The ﬁfth element", "Straße", "STRASSE"]
    titles.append("Toy Store")  # nothing else merges
    items = pd.DataFrame({"item_id": range(1, 8), "category": "film", "duration_seconds": 600, "title": titles})
    mapping = canonical_item_map(items, DedupConfig().signature_columns).set_index("item_id")["canonical_item_id"]
    assert mapping.to_dict() == {1: 1, 2: 1, 3: 3, 4: 3, 5: 5, 6: 5, 7: 7}


def test_point_in_time_counts_match_a_brute_force_count_on_a_shuffled_partition():
    """A partition after the shuffle by user has a repeating index; each count must still be the
    events strictly earlier than its own (ties see the same count), row by row."""
    from workflows.point_in_time import _counts_before

    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {"user_id": rng.integers(0, 5, 60), "timestamp": rng.integers(0, 10, 60), "click": rng.integers(0, 2, 60)}
    )
    df.index = np.repeat(np.arange(12), 5)
    out = _counts_before(df.copy(), "user_id", ["events", "clicks"])
    assert len(out) == len(df)
    for row in out.itertuples():
        earlier = df[(df.user_id == row.user_id) & (df.timestamp < row.timestamp)]
        assert (row.events, row.clicks) == (len(earlier), earlier.click.sum()), row
