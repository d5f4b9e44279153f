"""The project's configuration: one typed place, loaded from YAML and validated.

Every tunable of the pipeline lives in a dataclass below; ``configs/default.yaml`` holds the values
the demo uses. ``load_config(path)`` reads a YAML file, rejects unknown keys and wrong types, and
fills anything not given from the dataclass defaults, so a config file only needs what it changes.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG_PATH = Path(__file__).with_name("default.yaml")


def _require(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Refuse ``value`` of ``name`` (a dotted config key) outside ``low``..``high`` (``None``: unbounded
    on that side; ``*_open``: the end itself is refused). NaN and inf are refused whatever the bounds:
    a number a config gives is finite."""
    ok = (
        math.isfinite(value)
        and (low is None or (low < value if low_open else low <= value))
        and (high is None or (value < high if high_open else value <= high))
    )
    if ok:
        return
    if low is not None and high is not None:
        what = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        what = f"{'>' if low_open else '>='} {low:g}" + ("" if isinstance(value, int) else " and finite")
    elif high is not None:
        what = f"{'<' if high_open else '<='} {high:g}" + ("" if isinstance(value, int) else " and finite")
    else:
        what = "a finite number"
    raise ValueError(f"{name} must be {what}, got {value}")


def _require_layers(name: str, layers: list[int], *, allow_empty: bool = False) -> None:
    """Layer widths: each >= 1 (a Dense layer of 0 units or fewer fails only when the model is built)."""
    if not layers and not allow_empty:
        raise ValueError(f"{name} must list at least one layer width, got {layers}")
    for i, width in enumerate(layers):
        _require(f"{name}[{i}]", width, 1)


def _require_training(section: str, config: Any) -> None:
    """``epochs``, ``batch_size`` and ``learning_rate`` of a model's config section."""
    _require(f"{section}.epochs", config.epochs, 1)
    _require(f"{section}.batch_size", config.batch_size, 1)
    _require(f"{section}.learning_rate", config.learning_rate, 0, low_open=True)


@dataclass
class SyntheticDataConfig:
    """Knobs of the seeded synthetic interaction log (``workflows/sources/synthetic.py``)."""

    num_users: int = 1000
    num_items: int = 600
    num_categories: int = 12
    latent_dim: int = 8
    events_per_user: float = 60.0  # mean impressions per user (lognormal around it)
    days: int = 30
    popularity_skew: float = 1.1  # Zipf exponent of the exposure policy (a power law over items)
    personalized_exposure: float = 0.7  # share of impressions the logging policy picks by preference
    exposure_sharpness: float = 5.0  # how sharply that share follows taste: softmax(sharpness * affinity)
    preference_strength: float = 3.0  # how sharply latent affinity drives clicks
    inactive_user_fraction: float = 0.05  # users with 1-2 events, all in the first half of the log
    one_off_user_fraction: float = 0.03  # users with exactly one event
    interest_drift: float = 0.0  # 0..1: how far each user's taste moves to a new one by the end
    duplicate_item_fraction: float = 0.03  # items re-posted under a second id (same content)
    unsafe_item_fraction: float = 0.02  # items whose title carries a denylisted phrase
    clickbait_item_fraction: float = 0.03  # items with boosted clicks but short watches
    repeated_event_fraction: float = 0.01  # exact copies of event rows (logging retries)
    long_item_watch_penalty: float = 0.5  # long items are watched to a smaller fraction (per log-minute)
    seed: int = 42

    def __post_init__(self) -> None:
        for name in ("num_users", "num_items", "num_categories", "latent_dim", "days"):
            _require(f"synthetic.{name}", getattr(self, name), 1)
        _require("synthetic.events_per_user", self.events_per_user, 0, low_open=True)  # its log is taken
        _require("synthetic.popularity_skew", self.popularity_skew, 0)
        for name in ("exposure_sharpness", "preference_strength", "long_item_watch_penalty"):
            _require(f"synthetic.{name}", getattr(self, name))
        for name in (
            "personalized_exposure",
            "inactive_user_fraction",
            "one_off_user_fraction",
            "interest_drift",
            "duplicate_item_fraction",
            "unsafe_item_fraction",
            "clickbait_item_fraction",
            "repeated_event_fraction",
        ):
            _require(f"synthetic.{name}", getattr(self, name), 0, 1)
        # Both kinds are drawn from one permutation of the users: past 1 together the one-off users
        # were silently fewer than asked.
        if self.inactive_user_fraction + self.one_off_user_fraction > 1:
            raise ValueError(
                "synthetic.inactive_user_fraction + synthetic.one_off_user_fraction must be at most 1, got "
                f"{self.inactive_user_fraction:g} + {self.one_off_user_fraction:g}"
            )
        _require("synthetic.seed", self.seed, 0)  # numpy's seeds are non-negative


@dataclass
class MovieLensConfig:
    """How MovieLens ratings become the raw schema's signals (``workflows/sources/movielens.py``)."""

    # A rating of at least this is a click. 3 (default): "chose the film and did not dislike it".
    # 1: every rating is a click, which is what protocols counting every rating a positive (RecBole)
    # score, so retrieval and the rankers' click heads learn the protocol's target.
    click_min_rating: int = 3

    def __post_init__(self) -> None:
        if not 1 <= self.click_min_rating <= 5:
            raise ValueError(f"movielens.click_min_rating must be 1..5, got {self.click_min_rating}")


@dataclass
class SplitConfig:
    """How events are split into train / validation (/ test) (``workflows/splits.py``).

    ``temporal`` (default): the last ``valid_fraction`` (+ ``test_fraction``) of time is held out.
    ``random``: RecBole's protocol, each user's interactions shuffled and cut ``ratios`` (80/10/10).
    ``explicit``: parquet files listing the ``user_id, item_id, timestamp`` of each part, so any
    external protocol can be reproduced.
    """

    kind: str = "temporal"
    valid_fraction: float = 0.1  # early stopping and the tuning step choose on this period
    test_fraction: float = 0.1  # the offline evaluation scores only this last one
    ratios: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    train_file: str = ""
    valid_file: str = ""
    test_file: str = ""
    seed: int = 42

    def __post_init__(self) -> None:
        kinds = ("temporal", "random", "explicit")
        if self.kind not in kinds:
            raise ValueError(f"workflow.split.kind must be one of {kinds}, got {self.kind!r}")
        if not 0.0 < self.valid_fraction < 1.0:
            raise ValueError(f"workflow.split.valid_fraction must be in (0, 1), got {self.valid_fraction}")
        if not 0.0 <= self.test_fraction < 1.0 - self.valid_fraction:
            raise ValueError(
                f"workflow.split.test_fraction must be in [0, 1 - valid_fraction), got {self.test_fraction}"
            )
        # Written so NaN fails (every comparison with NaN is False), here and in the checks below.
        if len(self.ratios) != 3 or not all(r >= 0 for r in self.ratios) or not abs(sum(self.ratios) - 1.0) <= 1e-6:
            raise ValueError(
                f"workflow.split.ratios must be three non-negative numbers summing to 1, got {self.ratios}"
            )
        # As valid_fraction > 0: a validation share of 0 left the validation part empty and the pipeline
        # stopped at the attribute join (KeyError); a training share of 0 trained on rounding leftovers
        # only, or on nothing ([0, 1, 0]: int(NaN) in the split).
        if self.kind == "random" and not (self.ratios[0] > 0 and self.ratios[1] > 0):
            raise ValueError(
                f"workflow.split.ratios: a random split needs training and validation shares above 0, got {self.ratios}"
            )
        if self.kind == "explicit" and not (self.train_file and self.valid_file):
            raise ValueError(
                "workflow.split.kind 'explicit' needs workflow.split.train_file and workflow.split.valid_file"
            )
        _require("workflow.split.seed", self.seed, 0)


@dataclass
class ActiveUsersConfig:
    """Train only on active users (``workflows/active_users.py``); the rest get the fallback.

    A user is active with at least ``min_events`` qualifying events (``event``: a signal column such
    as ``click``, or ``impression`` for any event) in the last ``days`` days of the training period.
    The seed's example is ``min_events: 10, days: 10`` on clicks.
    """

    enabled: bool = True
    min_events: int = 3
    days: float = 30.0
    event: str = "click"

    def __post_init__(self) -> None:
        if self.min_events < 1 or not self.days > 0:
            raise ValueError(f"active_users needs min_events >= 1 and days > 0, got {self.min_events}, {self.days}")
        # Any signal of the dataset spec (checked against the spec when the pipeline starts).
        if not self.event:
            raise ValueError("workflow.active_users.event must name a signal (e.g. click) or be 'impression'")


@dataclass
class RecencyWindowConfig:
    """Keep only the last ``days`` days of the log (``workflows/recency_window.py``); 0 keeps all."""

    days: float = 0.0

    def __post_init__(self) -> None:
        if not self.days >= 0:
            raise ValueError(f"workflow.recency_window.days must be >= 0, got {self.days}")


@dataclass
class DedupConfig:
    """Duplicate removal (``workflows/dedup.py``)."""

    identical_rows: bool = True  # drop exact copies of an event row (logging retries)
    aggregate_pairs: bool = True  # one row per (user, item) per split part, signals combined by max
    canonical_items: bool = True  # one item posted under several ids -> one canonical id
    signature_columns: list[str] = field(default_factory=lambda: ["title", "category", "duration_seconds"])

    def __post_init__(self) -> None:
        # No column: every item had the same (null) signature and none kept its own id, so
        # canonical_items removed the whole catalog.
        if self.canonical_items and not self.signature_columns:
            raise ValueError(
                "workflow.dedup.signature_columns must name at least one item column when canonical_items is on"
            )


@dataclass
class ContentFilterConfig:
    """Unsafe-content filter over the item table (``workflows/content_filter.py``).

    ``classifier`` is ``keyword`` (a case-insensitive whole-word denylist over ``columns``) or the
    dotted path ``package.module:function`` of any function ``(items_frame, config) -> bool series``.
    Items taken down at serving (``scripts/takedown.py``) are unsafe too: ``takedowns``.
    """

    enabled: bool = True
    classifier: str = "keyword"
    # The live store whose takedown list is excluded too (workflows/live_store.py: one concept with
    # serving's takedowns): a SQLite path or postgresql:// DSN; "" = $FUNNEL_STORE_URL if set, else none.
    takedowns: str = ""
    columns: list[str] = field(default_factory=lambda: ["title"])
    denylist: list[str] = field(
        default_factory=lambda: [
            "gore",
            "graphic violence",
            "nsfw",
            "explicit",
            "self-harm",
            "hate speech",
            "beheading",
            "scam",
            "terror attack",
        ]
    )

    def __post_init__(self) -> None:
        # An empty term is a pattern that matches every title: every item was flagged unsafe and the
        # whole catalog filtered out. Blanks around a term are never part of it.
        blank = [i for i, term in enumerate(self.denylist) if not term.strip()]
        if blank:
            raise ValueError(f"workflow.content_filter.denylist has empty terms (positions {blank}): {self.denylist}")
        self.denylist = [term.strip() for term in self.denylist]
        # The keyword classifier over no column stopped the pipeline at the filter step (AttributeError).
        if self.enabled and self.classifier == "keyword" and self.denylist and not self.columns:
            raise ValueError("workflow.content_filter.columns must name at least one item text column for the denylist")


@dataclass
class LabelConfig:
    """The duration-aware watch label ``duration_watch`` (``workflows/labels.py``).

    Positive when the watch fraction reaches the ``duration_watch_quantile`` of clicked training
    events of the same duration bucket (edges in seconds), so short clips do not win by being short.
    """

    duration_buckets: list[float] = field(default_factory=lambda: [60.0, 300.0, 1200.0])
    duration_watch_quantile: float = 0.5

    def __post_init__(self) -> None:
        if any(math.isnan(b) for b in self.duration_buckets) or sorted(self.duration_buckets) != list(
            self.duration_buckets
        ):
            raise ValueError(f"workflow.labels.duration_buckets must be increasing, got {self.duration_buckets}")
        if not 0.0 < self.duration_watch_quantile < 1.0:
            raise ValueError(
                f"workflow.labels.duration_watch_quantile must be in (0, 1), got {self.duration_watch_quantile}"
            )


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_seconds(text: str, key: str = "duration") -> int:
    """``"90s"``, ``"15m"``, ``"24h"``, ``"7d"`` -> seconds (a positive whole number of units)."""
    text = str(text).strip()
    number, unit = text[:-1], text[-1:]
    if unit not in DURATION_UNITS or not number.isdigit() or int(number) <= 0:
        raise ValueError(f"{key}: {text!r} is not a duration like 90s, 15m, 24h or 7d")
    return int(number) * DURATION_UNITS[unit]


@dataclass
class FeatureConfig:
    """Feature engineering (``workflows/features.py``, ``workflows/point_in_time.py``)."""

    def __post_init__(self) -> None:
        bad = set(self.point_in_time_features) - {"counts", "rates"}
        if bad or not self.point_in_time_features:
            raise ValueError(
                "workflow.features.point_in_time_features must be a non-empty subset of [counts, rates], "
                f"got {self.point_in_time_features}"
            )
        seconds = self.activity_window_seconds  # raises on a malformed window
        if len(set(seconds)) != len(seconds):
            raise ValueError(f"workflow.features.activity_windows has duplicate windows: {self.activity_windows}")
        for name in ("id_freq_threshold", "attribute_freq_threshold", "attribute_num_buckets"):
            _require(f"workflow.features.{name}", getattr(self, name), 0)

    point_in_time: bool = True  # user/item activity and popularity counts from strictly earlier events
    point_in_time_features: list[str] = field(default_factory=lambda: ["rates"])  # "counts" and/or "rates"
    time_features: bool = True  # hour of day, day of week (CONTEXT features)
    id_freq_threshold: int = 0  # ids seen fewer times map to the OOV index 2
    attribute_freq_threshold: int = 0
    attribute_num_buckets: int = 0  # > 0: hash rare/unseen attribute values into buckets (huge vocabularies)
    # Windowed activity (workflows/activity.py): the user's events and clicks in each of these windows
    # before the row's time (training) or before now (serving), e.g. [1h, 24h, 7d]. "<n>s|m|h|d"; [] = off
    # (the default: on the synthetic world they lowered the heavy ranker's validation AUC, docs/measurements.md).
    activity_windows: list[str] = field(default_factory=list)

    @property
    def activity_window_seconds(self) -> list[int]:
        """``activity_windows`` in seconds, in the configured order."""
        return [duration_seconds(w, "workflow.features.activity_windows") for w in self.activity_windows]


@dataclass
class NegativeSamplingConfig:
    """Sampled negatives for rankers (``workflows/negative_sampling.py``); ``none`` keeps impressions only."""

    kind: str = "none"  # none | uniform | popularity
    ratio: float = 1.0  # negatives per positive (click)
    valid: bool = False  # also add them to the validation part (early stopping, validation AUC)
    seed: int = 42

    def __post_init__(self) -> None:
        if self.kind not in ("none", "uniform", "popularity"):
            raise ValueError(f"workflow.negative_sampling.kind must be none/uniform/popularity, got {self.kind!r}")
        if not 0 < self.ratio < float("inf"):  # NaN or inf negatives per positive
            raise ValueError(f"workflow.negative_sampling.ratio must be > 0 and finite, got {self.ratio}")
        _require("workflow.negative_sampling.seed", self.seed, 0)


@dataclass
class ChecksConfig:
    """Correctness checks the pipeline runs (``workflows/checks.py``); a failed check raises."""

    enabled: bool = True
    point_in_time_probe: bool = True  # recompute features with perturbed future events (costs 2 passes)


@dataclass
class WorkflowConfig:
    """The dataset workflow (``workflows/pipeline.py`` and one module per step)."""

    watch_threshold: float = 0.75  # the "watched >= 75%" label
    split: SplitConfig = field(default_factory=SplitConfig)
    active_users: ActiveUsersConfig = field(default_factory=ActiveUsersConfig)
    recency_window: RecencyWindowConfig = field(default_factory=RecencyWindowConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    content_filter: ContentFilterConfig = field(default_factory=ContentFilterConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    negative_sampling: NegativeSamplingConfig = field(default_factory=NegativeSamplingConfig)
    checks: ChecksConfig = field(default_factory=ChecksConfig)

    def __post_init__(self) -> None:
        # A fraction of the item's duration (workflows/labels.py): at 0 or below every impression (and
        # sampled negative) was labelled watched, above 1 none could be.
        _require("workflow.watch_threshold", self.watch_threshold, 0, 1, low_open=True)


# The range each scalar knob the tuning step searches may take, by its TuningConfig field: (low, high,
# low allowed, high allowed). The knob's own config and TuningConfig's candidates are checked against
# it, and models.tuning.at_edge reads it to tell whether a choice at the end of the searched range
# could have gone further.
TUNING_DOMAINS: dict[str, tuple[float, float, bool, bool]] = {
    "retrieval_weight": (0.0, 1.0, True, True),
    "affinity_weight": (0.0, 1.0, True, True),
    "reg_weight": (0.0, float("inf"), False, False),
    "affinity_dropout": (0.0, 1.0, True, False),
    "logq_strength": (0.0, float("inf"), True, False),
    "sampled_negatives": (0.0, float("inf"), True, False),
}


def in_domain(value: float, domain: tuple[float, float, bool, bool]) -> bool:
    low, high, low_in, high_in = domain
    return (low < value or (low_in and value == low)) and (value < high or (high_in and value == high))


def domain_text(domain: tuple[float, float, bool, bool]) -> str:
    """``[0, 1)`` for people."""
    low, high, low_in, high_in = domain
    return f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def check_domain(name: str, value: float, knob: str) -> None:
    """Refuse a value of ``name`` (a dotted config key) outside the domain of tuning knob ``knob``."""
    domain = TUNING_DOMAINS[knob]
    if not in_domain(value, domain):
        raise ValueError(f"{name} must be in {domain_text(domain)}, got {value}")


@dataclass
class CandidateGeneratorConfig:
    """Two-tower retrieval model (``models/candidate_generator.py``)."""

    embedding_dim: int = 32
    tower_layers: list[int] = field(default_factory=lambda: [64, 32])
    epochs: int = 10
    batch_size: int = 1024
    learning_rate: float = 0.01
    logq_correction: bool = True
    # Scale of the correction: 1 subtracts exactly log(q) (the unbiased sampled softmax); above 1 the
    # towers keep more of the items' popularity (what accuracy-only protocols reward), below 1 less.
    logq_strength: float = 1.0
    # Mixed negative sampling (Yi et al. 2020): this many catalog items drawn uniformly per batch join
    # the in-batch negatives, so items that are rarely positives are negatives too; 0 = in-batch only.
    sampled_negatives: int = 0
    # Stop on the validation in-batch recall@10 (training.early_stopping_patience). Merlin measures
    # it on uncorrected logits, so with the logQ correction on it can stop a model that is still
    # improving: false trains the full ``epochs``.
    early_stopping: bool = True

    def __post_init__(self) -> None:
        _require("candidate_generator.embedding_dim", self.embedding_dim, 1)
        _require_layers("candidate_generator.tower_layers", self.tower_layers)  # the builder reads [-1]
        _require_training("candidate_generator", self)
        check_domain("candidate_generator.logq_strength", self.logq_strength, "logq_strength")
        check_domain("candidate_generator.sampled_negatives", self.sampled_negatives, "sampled_negatives")


@dataclass
class EmbeddingConfig:
    """How embedding tables are sized (``models/embeddings.py``).

    Recommendation models are memory-heavy and compute-light: the tables dominate. A table's width
    grows with the fourth root of its cardinality (a common rule of thumb), clipped to
    ``[min_dim, max_dim]``; a column with more than ``max_rows`` ids is hashed into ``max_rows``
    buckets so one huge id space cannot blow the memory budget.
    """

    min_dim: int = 16
    max_dim: int = 64
    multiplier: float = 2.0  # dim = multiplier * cardinality ** 0.25
    max_rows: int = 100_000  # hash ids above this cardinality into this many buckets

    def __post_init__(self) -> None:
        if not 1 <= self.min_dim <= self.max_dim:
            raise ValueError(f"embeddings: need 1 <= min_dim <= max_dim, got {self.min_dim}, {self.max_dim}")
        if self.max_rows < 16:
            raise ValueError(f"embeddings.max_rows must be >= 16, got {self.max_rows}")
        _require("embeddings.multiplier", self.multiplier, 0, low_open=True)


@dataclass
class TargetConfig:
    """One signal the heavy ranker predicts, and its weight in the final score."""

    name: str = "click"
    weight: float = 1.0


def _default_targets() -> list:
    # Why these weights: derived from which signals go with simulated users coming back, and chosen
    # over the hand weights 0.4/0.4/0.2 by an A/B test (online/retention.py, docs/online-loop.md).
    return [TargetConfig("click", 1.0), TargetConfig("duration_watch", 0.0), TargetConfig("like", 0.0)]


@dataclass
class LightRankerConfig:
    """Small DCN-v2 on a few features, trained with sampled negatives (``models/light_ranker.py``)."""

    features: list[str] = field(default_factory=lambda: ["user_id", "item_id", "category"])
    target: str = "click"
    negatives_per_positive: int = 4
    negative_sampling: str = "uniform"  # or "popularity" (frequency-weighted: "less popular = better")
    cross_depth: int = 1
    deep_layers: list[int] = field(default_factory=lambda: [32])
    epochs: int = 5
    batch_size: int = 1024
    learning_rate: float = 0.02

    def __post_init__(self) -> None:
        if self.negative_sampling not in ("uniform", "popularity"):
            raise ValueError(
                f"light_ranker.negative_sampling must be 'uniform' or 'popularity', got {self.negative_sampling!r}"
            )
        if self.negatives_per_positive < 1:
            raise ValueError(f"light_ranker.negatives_per_positive must be >= 1, got {self.negatives_per_positive}")
        if not self.features:
            raise ValueError("light_ranker.features must name at least one feature")
        _require("light_ranker.cross_depth", self.cross_depth, 1)  # Merlin's CrossBlock refuses depth <= 0
        _require_layers("light_ranker.deep_layers", self.deep_layers, allow_empty=True)
        _require_training("light_ranker", self)


@dataclass
class HeavyRankerMemberConfig:
    """One member of the heavy ranker's ensemble (``models/heavy_ranker.py``, "Ensemble")."""

    # Per training user, this many of the unrated items the item affinity ranks highest, as extra
    # negatives (``models/negative_sampling.py`` ``affinity_negatives``): the kind of candidates the
    # ranker sorts when serving. 0 = the dataset's negatives only. > 0 needs the item affinity.
    hard_negatives: int = 0

    def __post_init__(self) -> None:
        if self.hard_negatives < 0:
            raise ValueError(f"heavy_ranker.members[].hard_negatives must be >= 0, got {self.hard_negatives}")


@dataclass
class HeavyRankerConfig:
    """Larger multi-task DCN-v2 on every user and item feature (``models/heavy_ranker.py``)."""

    targets: list[TargetConfig] = field(default_factory=_default_targets)
    # The ensemble: each member trained with its own seed (seed + its position), scores averaged per
    # head. One member = one model.
    members: list[HeavyRankerMemberConfig] = field(default_factory=lambda: [HeavyRankerMemberConfig()])
    # How much each member counts in the average (one per member, >= 0; a member at 0 is not loaded
    # when serving). Empty = equal weights. Chosen by the tuning step from tuning.member_weights.
    member_weights: list[float] = field(default_factory=list)
    cross_depth: int = 2
    deep_layers: list[int] = field(default_factory=lambda: [128, 64])
    epochs: int = 5
    batch_size: int = 1024
    learning_rate: float = 0.005

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("heavy_ranker.targets must list at least one target")
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError(f"heavy_ranker.targets has duplicate names: {names}")
        if not all(0 <= t.weight < float("inf") for t in self.targets):  # NaN and inf too
            raise ValueError(f"heavy_ranker.targets weights must be finite and >= 0: {self.targets}")
        if sum(t.weight for t in self.targets) <= 0:
            raise ValueError("heavy_ranker.targets weights must not all be 0")
        if not self.members:
            raise ValueError("heavy_ranker.members must list at least one member")
        if self.member_weights:
            if len(self.member_weights) != len(self.members):
                raise ValueError(
                    f"heavy_ranker.member_weights has {len(self.member_weights)} weights for "
                    f"{len(self.members)} members: {self.member_weights}"
                )
            if not all(0 <= w < float("inf") for w in self.member_weights) or sum(self.member_weights) <= 0:
                raise ValueError(f"heavy_ranker.member_weights must be finite, >= 0, not all 0: {self.member_weights}")
        _require("heavy_ranker.cross_depth", self.cross_depth, 1)
        _require_layers("heavy_ranker.deep_layers", self.deep_layers, allow_empty=True)
        _require_training("heavy_ranker", self)


@dataclass
class TrainingConfig:
    """How every stage is trained (``models/train.py``, ``models/tracking.py``)."""

    early_stopping_patience: int = 2  # epochs without validation improvement before stopping
    # Which training events make a user's history: the "already seen" filter the online store serves
    # and what the item affinity (EASE) is fitted on and reads. "impression" = every logged event;
    # a 0/1 signal ("click", "like", ...) = only those, so an item shown but skipped can come back.
    history_event: str = "click"
    mlflow_tracking_uri: str = ""  # "" -> file:<registry>/../mlruns
    mlflow_experiment: str = "merlin-funnel"

    def __post_init__(self) -> None:
        # Keras' EarlyStopping: 0 stops at the first epoch without improvement; below 0 it stopped every
        # stage after its second epoch, improving or not.
        _require("training.early_stopping_patience", self.early_stopping_patience, 0)


@dataclass
class OrderingConfig:
    """How the ordering stage turns the heavy ranker's candidates into the served list
    (``serving/ordering.py``). The defaults sort by the heavy ranker's score alone."""

    retrieval_weight: float = 0.0  # share of the retrieval percentile in the final score, in [0, 1]
    # Share of the item-to-item affinity percentile (models/item_affinity.py); > 0 needs the
    # affinity weights (item_affinity.max_items). retrieval_weight + affinity_weight <= 1.
    affinity_weight: float = 0.0
    exploration_temperature: float = 0.0  # > 0: softmax (Plackett-Luce) sampling instead of sorting
    max_per_category: int = 0  # business rule: at most this many items of one category; 0 = off
    category_column: str = "category"  # the item feature the rule counts

    def __post_init__(self) -> None:
        check_domain("serving.ordering.retrieval_weight", self.retrieval_weight, "retrieval_weight")
        check_domain("serving.ordering.affinity_weight", self.affinity_weight, "affinity_weight")
        if self.retrieval_weight + self.affinity_weight > 1.0 + 1e-9:
            raise ValueError(
                "serving.ordering.retrieval_weight + affinity_weight must be <= 1 (the heavy ranker "
                f"keeps the rest), got {self.retrieval_weight} + {self.affinity_weight}"
            )
        if not self.exploration_temperature >= 0.0:
            raise ValueError(
                f"serving.ordering.exploration_temperature must be >= 0, got {self.exploration_temperature}"
            )
        if self.max_per_category < 0:
            raise ValueError(f"serving.ordering.max_per_category must be >= 0, got {self.max_per_category}")


@dataclass
class ItemAffinityConfig:
    """Item-to-item affinity weights (EASE, closed form; ``models/item_affinity.py``), trained with
    the funnel whenever the catalog has at most ``max_items`` items (so the offline evaluation can
    switch them on or off on one export); above it, only an ordering that uses them is refused."""

    reg_weight: float = 250.0  # EASE's L2 penalty (RecBole's default; 500 measured no better on MovieLens)
    # > 0: EDLAE, as if each history item were dropped with this probability (an extra penalty
    # dropout / (1 - dropout) x the item's count); 0 = plain EASE.
    dropout: float = 0.0
    max_items: int = 10_000  # dense items x items float32 weights: 10k items = 400 MB, an items^3 solve

    def __post_init__(self) -> None:
        check_domain("item_affinity.reg_weight", self.reg_weight, "reg_weight")
        check_domain("item_affinity.dropout", self.dropout, "affinity_dropout")
        if self.max_items < 1:
            raise ValueError(f"item_affinity.max_items must be >= 1, got {self.max_items}")


# The models serving.batching.stage_instances may name: the funnel's stages and the fused model
# (deployment/export.py STAGE_ARTIFACTS and serving/interface.py FUSED; tests/test_config.py holds them equal).
BATCHED_MODELS = (
    "feature_lookup",
    "query_tower",
    "retrieval",
    "filtering",
    "light_ranker",
    "heavy_ranker",
    "ordering",
    "fused_funnel",
)


@dataclass
class BatchingConfig:
    """How the funnel's stages batch concurrent requests (Triton's dynamic batcher), written into each
    stage's ``config.pbtxt`` at export (``deployment/export.py``, ``docs/serving.md``).

    ``enabled: false`` serves one request per ``execute()`` call (``max_batch_size: 0``). Enabled,
    each stage waits up to ``max_queue_delay_us`` for up to ``max_batch_size`` requests and serves
    them with one model call; a request's response is the one it gets alone."""

    enabled: bool = True
    max_batch_size: int = 64  # requests per execute() call at most
    max_queue_delay_us: int = 100  # how long a stage holds a request waiting for others to join it
    instances: int = 1  # instances (stub processes) of every stage...
    stage_instances: dict[str, int] = field(default_factory=dict)  # ...or per stage, e.g. {heavy_ranker: 2}
    # The A/B router's and the feedback endpoint's instances (not batched). The router's BLS call into
    # the funnel blocks its instance until the funnel answers: it serves this many requests at once.
    router_instances: int = 2
    feedback_instances: int = 1
    # Every stage inside one model (serving/fused.py): one hop per request instead of seven, for
    # CPU throughput; the stages then share that model's batches and instances (fused_funnel: N).
    fuse_stages: bool = False

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"serving.batching.max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"serving.batching.max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        counts = {
            "instances": self.instances,
            **{f"stage_instances.{stage}": count for stage, count in self.stage_instances.items()},
            "router_instances": self.router_instances,
            "feedback_instances": self.feedback_instances,
        }
        bad = {key: c for key, c in counts.items() if not isinstance(c, int) or isinstance(c, bool) or c < 1}
        if bad:
            raise ValueError(f"serving.batching instance counts must be integers >= 1, got {bad}")
        # Refused here, not only by the export: that runs after the training run this config drives.
        unknown = sorted(set(self.stage_instances) - set(BATCHED_MODELS))
        if unknown:
            raise ValueError(f"serving.batching.stage_instances names {unknown}; the models are {list(BATCHED_MODELS)}")

    def instances_of(self, stage: str) -> int:
        return int(self.stage_instances.get(stage, self.instances))


@dataclass
class LiveConfig:
    """What happened after the export, at serving: live events and takedowns
    (``workflows/live_store.py``; ``docs/live-features.md``)."""

    # A user the models never saw gets personal recommendations from their live history once it
    # holds this many distinct catalog items (item affinity, else a history query); before: popularity.
    fresh_history_min_items: int = 3
    max_live_events: int = 1000  # newest live events of a user one request reads (one indexed query)
    takedown_refresh_s: float = 1.0  # how stale a serving process's takedown list may get

    def __post_init__(self) -> None:
        if self.fresh_history_min_items < 1:
            raise ValueError(f"serving.live.fresh_history_min_items must be >= 1, got {self.fresh_history_min_items}")
        if self.max_live_events < 1:
            raise ValueError(f"serving.live.max_live_events must be >= 1, got {self.max_live_events}")
        if not 0.0 < self.takedown_refresh_s <= 4.0:  # takedowns promise 5 s end to end
            raise ValueError(f"serving.live.takedown_refresh_s must be in (0, 4], got {self.takedown_refresh_s}")


@dataclass
class AnnConfig:
    """The approximate item index above ``serving.exact_index_max_items`` (``models/item_index.py``).

    The training run builds it and then measures it: recall@``retrieval_k`` against exact search on
    ``queries`` validation queries (the query tower's embeddings of validation rows), and picks the
    cheapest search setting (IVF: lists probed; HNSW: ``efSearch``) that reaches ``target_recall``.
    The measured curve and the choice go into ``item_index.json`` and the manifest."""

    kind: str = "ivf"  # ivf: inverted lists, exact distances in the probed ones | hnsw: a graph
    target_recall: float = 0.9  # recall@retrieval_k against exact search the chosen setting must reach
    nlist: int = 0  # IVF lists; 0: about 2 * sqrt(items), a power of two
    nprobe: int = 0  # IVF lists a query scans; 0: the fewest that reach target_recall, measured
    ef_search: int = 0  # HNSW candidates kept while searching; 0: the fewest that reach target_recall
    queries: int = 1000  # validation queries the build measures recall on

    def __post_init__(self) -> None:
        if self.kind not in ("ivf", "hnsw"):
            raise ValueError(f"serving.ann.kind must be ivf or hnsw, got {self.kind!r}")
        if not 0.0 < self.target_recall <= 1.0:
            raise ValueError(f"serving.ann.target_recall must be in (0, 1], got {self.target_recall}")
        if min(self.nlist, self.nprobe, self.ef_search) < 0:
            raise ValueError("serving.ann.nlist, nprobe and ef_search must be >= 0 (0: chosen by the build)")
        if self.queries < 1:
            raise ValueError(f"serving.ann.queries must be >= 1, got {self.queries}")


@dataclass
class ServingConfig:
    """Sizes of the funnel's stages (``serving/``) and how the last one orders its list."""

    retrieval_k: int = 300  # candidates the ANN stage passes on
    light_ranker_k: int = 200  # candidates the light ranker keeps for the heavy ranker
    max_k: int = 100  # largest k a request may ask for
    max_excluded_items: int = 10_000  # longest exclude_item_ids a request may send (INVALID_ARGUMENT above)
    exact_index_max_items: int = 100_000  # exact inner-product search up to this catalog size...
    ann: AnnConfig = field(default_factory=AnnConfig)  # ...an approximate index, tuned to a recall, above it
    fallback_window_days: float = 7.0  # recency half-life of the popularity fallback
    fallback_content_column: str = "category"  # items never clicked get their category's popularity...
    fallback_new_item_weight: float = 0.5  # ...times this (models/fallback.py); "" column disables it
    ordering: OrderingConfig = field(default_factory=OrderingConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)  # deployment: read at export
    live: LiveConfig = field(default_factory=LiveConfig)  # live events and takedowns (workflows/live_store.py)
    # A stage applies its queued metric updates at most this often (serving/metrics.py
    # BackgroundRecorder; written into config.pbtxt at export): how stale a scrape may be, against
    # the stub-to-server round trips a busy stage spends on metrics. 0: every request at once.
    metrics_interval_s: float = 0.25

    def __post_init__(self):
        if self.max_k < 1:
            raise ValueError(f"serving.max_k must be >= 1, got {self.max_k}")
        # retrieval_k 0 or below failed in faiss at the first request; light_ranker_k 0 emptied every
        # list (-1 dropped the last candidate: serving/stages.py keeps ``[: light_ranker_k]``). No order
        # between them and max_k is assumed: the light ranker keeps what there is, and the ordering stage
        # tops a list shorter than k up from the fallback.
        _require("serving.retrieval_k", self.retrieval_k, 1)
        _require("serving.light_ranker_k", self.light_ranker_k, 1)
        _require("serving.exact_index_max_items", self.exact_index_max_items, 0)
        # A half-life of 0 made every fallback score NaN, a negative one weighted old clicks above new
        # ones; a new-item weight outside [0, 1] was refused only at the end of a training run.
        if not self.fallback_window_days > 0:  # inf: no decay, plain popularity
            raise ValueError(f"serving.fallback_window_days must be > 0, got {self.fallback_window_days}")
        if not 0.0 <= self.fallback_new_item_weight <= 1.0:
            raise ValueError(f"serving.fallback_new_item_weight must be in [0, 1], got {self.fallback_new_item_weight}")
        if not 0.0 <= self.metrics_interval_s <= 60.0:
            raise ValueError(f"serving.metrics_interval_s must be in [0, 60], got {self.metrics_interval_s}")
        if self.max_excluded_items < 0:
            raise ValueError(f"serving.max_excluded_items must be >= 0, got {self.max_excluded_items}")


# The largest holdout share an experiment may keep on the control model (1-2% is usual): the
# config, the assignment (serving/assignment.py) and the scripts all check against this one value.
MAX_HOLDOUT = 0.05

# Sections both arms of an A/B test share (online/ab_experiment.py): one synthetic world serves as
# both arms' data and users, and one experiment with one simulation runs them. A treatment override
# of them was dropped silently (the treatment trained and was tested exactly like the control).
SHARED_BY_ARMS = ("synthetic", "movielens", "online")


def check_treatment_overrides(overrides: dict[str, Any], where: str = "online.experiment.treatment_overrides") -> None:
    """Refuse overrides of sections the two arms cannot differ in (``SHARED_BY_ARMS``)."""
    shared = sorted(set(overrides) & set(SHARED_BY_ARMS))
    if shared:
        raise ValueError(
            f"{where}: {shared} cannot differ between the arms (one world, one experiment and one simulation "
            f"serve both; the treatment may override the other sections, not {list(SHARED_BY_ARMS)})"
        )


@dataclass
class ExperimentConfig:
    """An A/B test of two model versions inside the served funnel (``online/router.py``,
    ``online/ab_report.py``). Users are assigned by hashing ``salt:user_id``; ``holdout`` of them
    stay on the control model even after the treatment is rolled out to everyone else."""

    name: str = "logq-candidate-generator"
    salt: str = "ab-2026-11"
    holdout: float = 0.02
    treatment_share: float = 0.5  # of the non-holdout traffic
    alpha: float = 0.05
    power: float = 0.8
    min_detectable_ctr_lift: float = 0.02  # absolute CTR lift the sample size is planned for
    # What the treatment changes, as config overrides of the control's config (validated on load, Config).
    treatment_overrides: dict[str, Any] = field(
        default_factory=lambda: {"candidate_generator": {"logq_correction": False}}
    )

    def __post_init__(self) -> None:
        if self.name == "none":  # serving.assignment.NO_EXPERIMENT: the state without an experiment
            raise ValueError("online.experiment.name 'none' names the state without an experiment: choose another")
        if self.name == "":  # the feedback log's "unknown experiment", read by every experiment's analysis
            raise ValueError(
                "online.experiment.name must not be empty: '' marks rows of unknown experiment in the feedback log, "
                "which every other experiment's analysis reads as its own"
            )
        if not 0.0 <= self.holdout <= MAX_HOLDOUT:
            raise ValueError(
                f"online.experiment.holdout must be in [0, {MAX_HOLDOUT}] (1-2% is usual), got {self.holdout}"
            )
        if not 0.0 < self.treatment_share < 1.0:
            raise ValueError(f"online.experiment.treatment_share must be in (0, 1), got {self.treatment_share}")
        for key in ("alpha", "power"):  # a quantile of 0 or 1 is infinite: every test and sample size breaks
            if not 0.0 < getattr(self, key) < 1.0:
                raise ValueError(f"online.experiment.{key} must be in (0, 1), got {getattr(self, key)}")
        # The sample size divides by it: 0, NaN or inf crashed (or zeroed) the analysis at the end of the test.
        if not 0.0 < self.min_detectable_ctr_lift <= 1.0:
            raise ValueError(
                f"online.experiment.min_detectable_ctr_lift must be in (0, 1] (a CTR difference), "
                f"got {self.min_detectable_ctr_lift}"
            )
        if not isinstance(self.treatment_overrides, dict):
            raise TypeError("online.experiment.treatment_overrides must be a mapping of config overrides")


@dataclass
class SimulationConfig:
    """Simulated users (``online/simulator.py``): one request per active user per simulated day."""

    days: int = 5
    k: int = 10
    position_decay: float = 0.85  # P(examine position p) = position_decay ** p
    return_base: float = 0.4  # logit of returning after a day with no engagement at all
    return_per_click: float = 0.6  # each click raises the logit this much
    return_per_minute: float = 0.05  # each minute watched raises it this much
    concurrency: int = 4  # users served at once against the live server
    seed: int = 0

    def __post_init__(self) -> None:
        # position_decay ** p is a probability: outside [0, 1] a negative decay made every odd position
        # unexaminable and one above 1 examined every position, both silently.
        if not 0.0 <= self.position_decay <= 1.0:
            raise ValueError(f"online.simulation.position_decay must be in [0, 1], got {self.position_decay}")
        for name in ("return_base", "return_per_click", "return_per_minute"):
            if not math.isfinite(getattr(self, name)):  # a NaN logit never returns: everyone churned
                raise ValueError(f"online.simulation.{name} must be a finite number, got {getattr(self, name)}")
        if self.days < 1 or self.k < 1:
            raise ValueError(f"online.simulation.days and k must be >= 1, got {self.days}, {self.k}")
        if self.seed < 0:  # numpy's seeds are non-negative; refused here, not in the first worker thread
            raise ValueError(f"online.simulation.seed must be >= 0, got {self.seed}")
        _require("online.simulation.concurrency", self.concurrency, 1)  # 0 or below was served as 1


@dataclass
class OnlineConfig:
    """The online loop: the A/B experiment and the simulated users that drive it."""

    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)


@dataclass
class TuningConfig:
    """What the training run chooses by itself on the validation part (``evaluation/tuning.py``):
    every combination of the values listed below is scored by the served funnel's NDCG@``k`` on the
    validation users, the best one is written into the version's manifest (its ``config`` and a
    ``tuning`` record of every trial) and MLflow. The test part is never read.

    The ordering blend weights, the item affinity's L2 penalty and the heavy ranker's member weights
    are cheap: they re-score the heavy ranker's candidates of each validation user, computed once;
    nothing is retrained. The candidate
    generator's ``logq_strength`` and ``sampled_negatives`` are not: each combination retrains the
    candidate generator (the rankers are trained once and reused) and runs the blend search on it;
    the best combination is trained once more into the registry (``evaluation.tuning.train_tuned``).
    An empty list keeps the configured value (``serving.ordering``, ``item_affinity``,
    ``candidate_generator``)."""

    enabled: bool = True
    k: int = 10  # the metric is ndcg@k on the validation part
    retrieval_weight: list[float] = field(default_factory=lambda: [i / 10 for i in range(11)])  # 0, 0.1 ... 1
    affinity_weight: list[float] = field(default_factory=lambda: [0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    reg_weight: list[float] = field(default_factory=list)  # item_affinity.reg_weight candidates
    affinity_dropout: list[float] = field(default_factory=list)  # item_affinity.dropout candidates
    # Retrained per combination (candidate generator only): candidate_generator.logq_strength and
    # candidate_generator.sampled_negatives candidates.
    logq_strength: list[float] = field(default_factory=list)
    sampled_negatives: list[int] = field(default_factory=list)
    # heavy_ranker.member_weights candidates (one weight per ensemble member each; [1, 0] = the first
    # member alone): which members the ensemble serves. Cheap: each member scores the candidates once.
    member_weights: list[list[float]] = field(default_factory=list)
    max_users: int = 0  # validation users scored (a seeded sample); 0 = all of them

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"tuning.k must be >= 1, got {self.k}")
        for name, domain in TUNING_DOMAINS.items():
            if any(not in_domain(v, domain) for v in getattr(self, name)):
                raise ValueError(f"tuning.{name} values must be in {domain_text(domain)}, got {getattr(self, name)}")
        if self.max_users < 0:
            raise ValueError(f"tuning.max_users must be >= 0, got {self.max_users}")
        if any(int(n) != n for n in self.sampled_negatives):
            raise ValueError(f"tuning.sampled_negatives values must be integers, got {self.sampled_negatives}")
        for weights in self.member_weights:
            if (
                not isinstance(weights, (list, tuple))
                or not all(0 <= w < float("inf") for w in weights)  # NaN and inf too
                or sum(weights) <= 0
            ):
                raise ValueError(f"tuning.member_weights values must be lists of weights >= 0, not all 0: {weights}")


@dataclass
class Config:
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    movielens: MovieLensConfig = field(default_factory=MovieLensConfig)
    workflow: WorkflowConfig = field(default_factory=WorkflowConfig)
    candidate_generator: CandidateGeneratorConfig = field(default_factory=CandidateGeneratorConfig)
    embeddings: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    light_ranker: LightRankerConfig = field(default_factory=LightRankerConfig)
    heavy_ranker: HeavyRankerConfig = field(default_factory=HeavyRankerConfig)
    item_affinity: ItemAffinityConfig = field(default_factory=ItemAffinityConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    seed: int = 42

    def __post_init__(self) -> None:
        _require("seed", self.seed, 0)  # numpy's seeds are non-negative
        # Every simulated request asks for online.simulation.k items; the funnel refuses a k above
        # serving.max_k (serving/request.py RequestLimits.k), so every request of the A/B test failed.
        if self.online.simulation.k > self.serving.max_k:
            raise ValueError(
                f"online.simulation.k must be <= serving.max_k ({self.serving.max_k}), got {self.online.simulation.k}"
            )
        members = len(self.heavy_ranker.members)
        wrong = [w for w in self.tuning.member_weights if len(w) != members]
        if wrong:
            raise ValueError(
                f"tuning.member_weights candidates need one weight per heavy_ranker member ({members}): {wrong}"
            )
        # The blend search leaves out pairs above 1 (models.tuning.grid): with none left, the tuning step
        # failed ("no tuning trial to choose from") at the end of the training run, its work thrown away.
        if self.tuning.enabled:
            ordering = self.serving.ordering
            retrieval = self.tuning.retrieval_weight or [ordering.retrieval_weight]
            affinity = self.tuning.affinity_weight or [ordering.affinity_weight]
            if min(retrieval) + min(affinity) > 1.0 + 1e-9:
                raise ValueError(
                    f"tuning: no blend of retrieval_weight {retrieval} and affinity_weight {affinity} sums to "
                    "at most 1 (the heavy ranker keeps the rest): the blend search would have nothing to try"
                )
        # The treatment's config, built now: otherwise a typo in treatment_overrides surfaced only when
        # the A/B test reached the treatment, after the control had trained. (Its own overrides emptied:
        # the treatment config is not built again for them.)
        treatment = self.online.experiment.treatment_overrides
        if treatment:
            where = "online.experiment.treatment_overrides"
            check_treatment_overrides(treatment, where)
            values = self.to_dict()
            values["online"]["experiment"]["treatment_overrides"] = {}
            try:
                _build(Config, _merge(values, treatment), where)
            except (ValueError, TypeError) as e:
                if str(e).startswith(where):
                    raise
                raise type(e)(f"{where}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` as a number.

    PyYAML implements YAML 1.1, whose floats need a dot, so ``learning_rate: 1e-3`` was the string
    "1e-3" and refused ("expected float"). YAML 1.2 and the other YAML readers parse it as a float,
    which is what a config's author means."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class DuplicateKeyError(yaml.YAMLError, ValueError):
    """A mapping of a YAML file gives one key twice (a ``yaml.YAMLError``, so the callers that report
    broken YAML report it, and a ``ValueError`` like the loader's other refusals)."""


def _refuse_duplicate_keys(node: yaml.Node, where: str, seen_nodes: set[int]) -> None:
    """Raise ``DuplicateKeyError`` naming the dotted key path of the first key given twice in one
    mapping under ``node``. PyYAML keeps the last value without a word, so a section written twice
    (or a key repeated in a section) had its first values silently dropped."""
    if id(node) in seen_nodes:  # an alias: checked where its anchor is
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            path = f"{where}.{key}" if where else str(key)
            if key is not None and key != "<<":
                line = key_node.start_mark.line + 1
                if key in lines:
                    raise DuplicateKeyError(
                        f"{path}: key given twice (lines {lines[key]} and {line}); the second would silently "
                        "replace the first"
                    )
                lines[key] = line
            _refuse_duplicate_keys(value_node, path, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, f"{where}[{i}]", seen_nodes)


def load_yaml(text: str) -> Any:
    """Parse YAML ``text`` as the configs and dataset specs are read (``yaml.safe_load`` plus
    exponent floats without a dot, ``1e-3``), refusing a key given twice in one mapping."""
    loader = _YamlLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(node, "", set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def build_typed(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a mapping (e.g. parsed YAML), rejecting unknown keys and
    wrong types with the key's dotted path (``where`` prefixes it). Used for the config and for
    dataset specs (``workflows/spec.py``)."""
    return _build(cls, values, where)


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, checking keys and (simple) types."""
    here = where or "top level"  # the file itself: not an empty key path in the messages
    if not isinstance(values, dict):
        raise TypeError(f"{here}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"{here}: unknown key(s) {sorted(unknown)}; allowed: {sorted(names)}")
    kwargs = {}
    for key, value in values.items():
        hint = hints[key]
        path = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, path)
        else:
            kwargs[key] = _check_type(value, hint, path)
    return cls(**kwargs)


def _check_type(value: Any, hint: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(hint)):
            return None
        if len(options) == 1:
            return _check_type(value, options[0], path)
        return value
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise TypeError(f"{path}: expected a list, got {value!r}")
        if dataclasses.is_dataclass(item_type):
            return [_build(item_type, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return [_check_type(v, item_type, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:  # e.g. serving.batching.stage_instances: a list or null there is a mapping's error too
        key_type, value_type = typing.get_args(hint)
        if not isinstance(value, dict):
            raise TypeError(f"{path}: expected a mapping, got {value!r}")
        return {
            _check_type(k, key_type, f"{path} (key {k!r})"): _check_type(v, value_type, f"{path}.{k}")
            for k, v in value.items()
        }
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise TypeError(f"{path}: expected {hint.__name__}, got {value!r}")
    return value


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load and validate a YAML config; ``None`` loads ``configs/default.yaml``.

    ``overrides`` is a nested mapping merged over the file (used by tests and scripts to shrink sizes).
    """
    path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    values = load_yaml(path.read_text()) or {}
    if overrides:
        values = _merge(values, overrides)
    return _build(Config, values, "")


def _merge(base: dict[str, Any], extra: dict[str, Any], cls: type | None = None) -> dict[str, Any]:
    # Only a section (a dataclass of ``cls``) merges key by key; a mapping-typed value
    # (treatment_overrides, stage_instances) is replaced whole, as a config file giving it does.
    cls = cls or Config
    hints = typing.get_type_hints(cls)
    out = dict(base)
    for key, value in extra.items():
        hint = hints.get(key)
        if isinstance(value, dict) and isinstance(out.get(key), dict) and dataclasses.is_dataclass(hint):
            out[key] = _merge(out[key], value, hint)
        else:
            out[key] = value
    return out


def with_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """A copy of ``config`` with ``overrides`` merged in, validated exactly like a loaded file."""
    return _build(Config, _merge(config.to_dict(), overrides), "")
