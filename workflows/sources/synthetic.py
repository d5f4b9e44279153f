"""A seeded synthetic interaction log with a known ground truth.

Why not Merlin's ``aliccp-raw`` generator: its labels are drawn independently of the features, so no
model can beat chance on it. Here latent user and item vectors drive every event, so a good model
scores far above chance and tests can compare what a model learned against the truth.

How the world works:

* Items belong to a category; an item's latent vector is its category centre plus noise. Durations
  are log-normal per category (some categories are short clips, some long tutorials).
* Users have age band, gender and location. A user's latent vector mixes two favourite categories
  and a small shift shared by everyone of the same age band, so user attributes carry signal.
* A logging policy exposes items: a share ``personalized_exposure`` by the user's true preference
  (``softmax(exposure_sharpness * affinity)`` over the catalog: the larger, the more what a user is
  shown follows taste), the rest by popularity (a power law over items, Zipf exponent
  ``popularity_skew``). Each exposure is one event (an impression).
* The user reacts by affinity ``a = <u, v> / sqrt(d)``: click with ``sigmoid(s * a - 1.5)``, watch a
  fraction of the duration that grows with ``a`` and shrinks with the item's length
  (``long_item_watch_penalty``: people finish clips, not hour-long tutorials), like and share more
  rarely, only after a click.

The data-quality knobs each leave a ground truth in ``SyntheticData.truth`` that tests check the
workflow steps against:

* ``inactive_user_fraction`` / ``one_off_user_fraction``: users with 1-2 events early in the log, or
  exactly one event (``active_users`` must drop them);
* ``interest_drift``: each user's taste moves from ``user_latent`` to ``user_latent_end`` over time;
* ``duplicate_item_fraction``: items re-posted under a second id with identical content, their events
  split between both ids (``truth.duplicate_of``: second id -> original id);
* ``unsafe_item_fraction``: titles carrying a denylisted phrase (``truth.unsafe_items``);
* ``clickbait_item_fraction``: items clicked far more than their affinity says, then abandoned
  (``truth.clickbait_items``);
* ``repeated_event_fraction``: exact copies of event rows, as logging retries produce
  (``truth.repeated_events``).

The result is three raw tables in the project's raw schema (see ``workflows/schema.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from configs import SyntheticDataConfig

AGE_BANDS = np.array(["18-24", "25-34", "35-44", "45-54", "55+"])
GENDERS = np.array(["F", "M"])
LOCATIONS = np.array(["north", "south", "east", "west", "central", "coast", "mountain", "islands"])
START_TIMESTAMP = 1_767_225_600  # 2026-01-01T00:00:00Z
SECONDS_PER_DAY = 86_400


TITLE_WORDS_A = np.array(["quick", "easy", "ultimate", "honest", "tiny", "epic", "calm", "secret", "daily", "wild"])
TITLE_WORDS_B = np.array(
    ["recipe", "workout", "guitar", "travel", "garden", "coding", "makeup", "chess", "camping", "physics"]
)
TITLE_WORDS_C = np.array(["guide", "vlog", "review", "tutorial", "story", "challenge", "tips", "session"])
UNSAFE_PHRASES = np.array(["graphic violence", "gore compilation", "nsfw", "hate speech rant", "crypto scam"])
CLICKBAIT_PHRASES = np.array(["you won't believe", "shocking", "gone wrong"])


@dataclass
class SyntheticTruth:
    """What the generator did on purpose; tests compare the workflow steps against it."""

    inactive_users: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    one_off_users: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    duplicate_of: dict = field(default_factory=dict)  # re-posted item id -> original item id
    unsafe_items: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    clickbait_items: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    repeated_events: int = 0  # exact copies of event rows appended (logging retries)


@dataclass
class SyntheticData:
    """The three raw tables plus the latent truth that generated them."""

    events: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    user_latent: np.ndarray  # [num_users, latent_dim], row i is user id i + 1 (taste at the start)
    item_latent: np.ndarray  # [num_items + duplicates, latent_dim], row j is item id j + 1
    user_latent_end: np.ndarray | None = None  # taste at the end of the log (== user_latent without drift)
    truth: SyntheticTruth = field(default_factory=SyntheticTruth)

    def true_affinity(self, user_ids: np.ndarray, item_ids: np.ndarray, at_end: bool = False) -> np.ndarray:
        """Affinity of each (user, item) pair, the quantity that drives clicks (start or end taste)."""
        latent = self.user_latent_end if at_end and self.user_latent_end is not None else self.user_latent
        u = latent[np.asarray(user_ids) - 1]
        v = self.item_latent[np.asarray(item_ids) - 1]
        return (u * v).sum(axis=-1) / np.sqrt(u.shape[-1])

    def true_top_items(self, user_id: int, k: int) -> np.ndarray:
        """The ``k`` item ids this user likes most according to the ground truth."""
        scores = self.item_latent @ self.user_latent[user_id - 1] / np.sqrt(self.user_latent.shape[1])
        return np.argsort(-scores)[:k] + 1

    def write_parquet(self, out_dir) -> dict[str, str]:
        """Write ``events``, ``users`` and ``items`` as parquet; return their paths."""
        from workflows.sources import write_raw_tables

        return write_raw_tables(self, out_dir, name="synthetic")


MAX_CHUNK_CELLS = 1 << 26  # users x items cells per chunk of the generator's float64 matrices


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _normalise(latent: np.ndarray) -> np.ndarray:
    """Scale rows so affinities have a comparable scale whatever latent_dim is."""
    d = latent.shape[1]
    return latent / (np.linalg.norm(latent, axis=1, keepdims=True) / np.sqrt(d) * 1.5)


def _pick(rng: np.random.Generator, pool: np.ndarray, fraction: float) -> np.ndarray:
    n = int(round(fraction * len(pool)))
    return np.sort(rng.choice(pool, size=min(n, len(pool)), replace=False)) if n > 0 else pool[:0]


def respond(
    affinity: np.ndarray,
    duration: np.ndarray,
    clickbait: np.ndarray,
    cfg: SyntheticDataConfig,
    rng: np.random.Generator,
    position_bias: np.ndarray | None = None,
):
    """How a user reacts to items shown: ``(click, watch_seconds, like, share)`` arrays.

    The one response model of this world: the generator uses it for the logged events and the user
    simulator (``online/simulator.py``) for reactions to live recommendations. ``position_bias``
    (optional) is the probability that each shown item is examined at all; unexamined items get no
    reaction. Clickbait lifts clicks but cuts watching and liking; long items are watched to a
    smaller fraction.
    """
    s = cfg.preference_strength
    bait = np.asarray(clickbait, dtype=bool)
    n = len(affinity)
    examined = np.ones(n, dtype=bool) if position_bias is None else rng.random(n) < position_bias
    click = examined & (rng.random(n) < _sigmoid(s * affinity - 1.5 + 2.5 * bait))
    length = np.log(np.asarray(duration, dtype=np.float64) / 60.0)
    watch_logit = s * affinity + 0.5 - cfg.long_item_watch_penalty * length - 3.5 * bait
    watch_fraction = _sigmoid(watch_logit + 0.8 * rng.normal(size=n))
    watch_seconds = np.where(click, np.round(watch_fraction * duration), 0).astype(np.int64)
    like = click & (rng.random(n) < _sigmoid(s * affinity - 2.5 - 3.0 * bait))
    share = like & (rng.random(n) < _sigmoid(s * affinity - 2.5))
    return click, watch_seconds, like, share


def generate(config: SyntheticDataConfig | None = None) -> SyntheticData:
    """Generate the synthetic log; the same config always gives the same tables."""
    cfg = config or SyntheticDataConfig()
    rng = np.random.default_rng(cfg.seed)
    d = cfg.latent_dim

    # Items: category centres plus noise; durations per category; a Zipf exposure propensity.
    centres = rng.normal(size=(cfg.num_categories, d))
    item_category = rng.integers(0, cfg.num_categories, size=cfg.num_items)
    item_latent = centres[item_category] + 0.6 * rng.normal(size=(cfg.num_items, d))
    category_log_duration = rng.uniform(np.log(20), np.log(3600), size=cfg.num_categories)
    duration = np.exp(category_log_duration[item_category] + 0.3 * rng.normal(size=cfg.num_items))
    duration = np.maximum(5, np.round(duration)).astype(np.int64)
    popularity_rank = rng.permutation(cfg.num_items) + 1
    exposure_pop = 1.0 / popularity_rank.astype(float) ** cfg.popularity_skew
    exposure_pop /= exposure_pop.sum()

    # Users: two favourite categories plus an age-band shift, so attributes are informative.
    age = rng.integers(0, len(AGE_BANDS), size=cfg.num_users)
    gender = rng.integers(0, len(GENDERS), size=cfg.num_users)
    location = rng.integers(0, len(LOCATIONS), size=cfg.num_users)
    age_shift = rng.normal(size=(len(AGE_BANDS), d))
    favourites = rng.integers(0, cfg.num_categories, size=(cfg.num_users, 2))
    user_noise = rng.normal(size=(cfg.num_users, d))
    user_latent = _normalise(
        0.7 * centres[favourites[:, 0]] + 0.4 * centres[favourites[:, 1]] + 0.5 * age_shift[age] + 0.4 * user_noise
    )
    item_latent = _normalise(item_latent)
    # Drift: by the end of the log each user's taste has moved towards two other categories.
    new_favourites = rng.integers(0, cfg.num_categories, size=(cfg.num_users, 2))
    drifted = _normalise(
        0.7 * centres[new_favourites[:, 0]]
        + 0.4 * centres[new_favourites[:, 1]]
        + 0.5 * age_shift[age]
        + 0.4 * user_noise
    )
    user_latent_end = _normalise(user_latent + cfg.interest_drift * (drifted - user_latent))

    n_events = np.maximum(1, rng.lognormal(np.log(cfg.events_per_user) - 0.32, 0.8, size=cfg.num_users).round()).astype(
        np.int64
    )
    all_users = np.arange(cfg.num_users)
    special = rng.permutation(all_users)
    n_inactive = int(round(cfg.inactive_user_fraction * cfg.num_users))
    n_one_off = int(round(cfg.one_off_user_fraction * cfg.num_users))
    inactive = np.sort(special[:n_inactive])
    one_off = np.sort(special[n_inactive : n_inactive + n_one_off])
    n_events[inactive] = rng.integers(1, 3, size=len(inactive))
    n_events[one_off] = 1
    # Inactive users only appear in the first half of the log.
    span = np.full(cfg.num_users, cfg.days * SECONDS_PER_DAY, dtype=np.int64)
    span[inactive] = cfg.days * SECONDS_PER_DAY // 2

    # Time is drawn first: with drift, what a user is shown and likes depends on when.
    phases = 1 if cfg.interest_drift == 0 else 4
    rows_user, rows_item, rows_time = [], [], []
    # Users in chunks keep the [users, items] matrices (~0.5 GB each at most) in memory whatever the
    # catalog size; up to 131k items the chunk is 512 users, as it always was (same data per seed).
    chunk = int(max(1, min(512, MAX_CHUNK_CELLS // cfg.num_items)))
    for start in range(0, cfg.num_users, chunk):
        stop = min(cfg.num_users, start + chunk)
        times = [rng.integers(0, span[uid], size=n_events[uid]) for uid in range(start, stop)]
        for phase in range(phases):
            w = (phase + 0.5) / phases if phases > 1 else 0.0
            latent = _normalise((1 - w) * user_latent[start:stop] + w * user_latent_end[start:stop])
            aff = latent @ item_latent.T / np.sqrt(d)
            sharp = cfg.exposure_sharpness * aff
            pref = np.exp(sharp - sharp.max(axis=1, keepdims=True))
            pref /= pref.sum(axis=1, keepdims=True)
            pw = cfg.personalized_exposure
            policy = (1.0 - pw) * exposure_pop[None, :] + pw * pref
            cdf = np.cumsum(policy, axis=1)
            for row, uid in enumerate(range(start, stop)):
                t = times[row]
                in_phase = (
                    (t * phases // (cfg.days * SECONDS_PER_DAY)) == phase if phases > 1 else np.ones(len(t), bool)
                )
                draws = rng.random(int(in_phase.sum())) * cdf[row, -1]
                items = np.minimum(np.searchsorted(cdf[row], draws), cfg.num_items - 1)
                rows_user.append(np.full(len(items), uid, dtype=np.int64))
                rows_item.append(items)
                rows_time.append(t[in_phase])
    user_idx = np.concatenate(rows_user)
    item_idx = np.concatenate(rows_item)
    offset = np.concatenate(rows_time)
    progress = offset / float(cfg.days * SECONDS_PER_DAY)  # 0 at the start of the log, 1 at the end
    taste = (
        _normalise((1 - progress[:, None]) * user_latent[user_idx] + progress[:, None] * user_latent_end[user_idx])
        if cfg.interest_drift
        else user_latent[user_idx]
    )

    # Item-level data-quality truths.
    pool = np.arange(cfg.num_items)
    unsafe = _pick(rng, pool, cfg.unsafe_item_fraction)
    clickbait = _pick(rng, np.setdiff1d(pool, unsafe), cfg.clickbait_item_fraction)
    is_clickbait = np.zeros(cfg.num_items, bool)
    is_clickbait[clickbait] = True

    aff = (taste * item_latent[item_idx]).sum(axis=1) / np.sqrt(d)
    click, watch_seconds, like, share = respond(aff, duration[item_idx], is_clickbait[item_idx], cfg, rng)
    timestamp = START_TIMESTAMP + offset

    # Re-posts: a second id with the same content; each event of the original moves to it w.p. 1/2.
    originals = _pick(rng, np.setdiff1d(pool, unsafe), cfg.duplicate_item_fraction)
    copies = np.arange(cfg.num_items, cfg.num_items + len(originals))
    item_ids = item_idx.copy()
    copy_of = np.full(cfg.num_items, -1, dtype=np.int64)
    copy_of[originals] = copies
    moves = (copy_of[item_idx] >= 0) & (rng.random(len(item_idx)) < 0.5)
    item_ids[moves] = copy_of[item_idx[moves]]

    events = pd.DataFrame(
        {
            "user_id": user_idx + 1,
            "item_id": item_ids + 1,
            "timestamp": timestamp.astype(np.int64),
            "click": click.astype(np.int64),
            "watch_seconds": watch_seconds,
            "like": like.astype(np.int64),
            "share": share.astype(np.int64),
        }
    )
    # Logging retries: exact copies of some rows (drawn last, so the other knobs' data is unchanged).
    repeats = events.iloc[
        np.sort(rng.choice(len(events), int(round(cfg.repeated_event_fraction * len(events))), replace=False))
    ]
    events = pd.concat([events, repeats]).sort_values(["timestamp", "user_id"], kind="stable", ignore_index=True)
    users = pd.DataFrame(
        {
            "user_id": np.arange(1, cfg.num_users + 1, dtype=np.int64),
            "age_band": AGE_BANDS[age],
            "gender": GENDERS[gender],
            "location": LOCATIONS[location],
        }
    )
    # Titles describe content only (no id), so a re-post has the very same title.
    serial = rng.permutation(cfg.num_items) + 1
    titles = np.array(
        [
            f"{TITLE_WORDS_A[rng.integers(len(TITLE_WORDS_A))]} {TITLE_WORDS_B[c % len(TITLE_WORDS_B)]} "
            f"{TITLE_WORDS_C[rng.integers(len(TITLE_WORDS_C))]} no. {serial[i]}"
            for i, c in enumerate(item_category)
        ],
        dtype=object,
    )
    for j in unsafe:
        titles[j] = f"{titles[j]} ({UNSAFE_PHRASES[rng.integers(len(UNSAFE_PHRASES))]})"
    for j in clickbait:
        titles[j] = f"{CLICKBAIT_PHRASES[rng.integers(len(CLICKBAIT_PHRASES))]}: {titles[j]}"
    source = np.concatenate([pool, originals])
    items = pd.DataFrame(
        {
            "item_id": np.arange(1, len(source) + 1, dtype=np.int64),
            "category": np.char.add("cat_", item_category[source].astype(str)),
            "duration_seconds": duration[source],
            "title": titles[source],
        }
    )
    truth = SyntheticTruth(
        inactive_users=inactive + 1,
        one_off_users=one_off + 1,
        duplicate_of={int(c) + 1: int(o) + 1 for c, o in zip(copies, originals)},
        unsafe_items=unsafe + 1,
        clickbait_items=clickbait + 1,
        repeated_events=int(len(repeats)),
    )
    return SyntheticData(
        events, users, items, user_latent, item_latent[source], user_latent_end=user_latent_end, truth=truth
    )
