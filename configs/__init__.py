"""The project's configuration: one typed place, loaded from YAML and validated.

Every tunable of the pipeline lives in a dataclass below; ``configs/default.yaml`` holds the values
the demo uses. ``load_config(path)`` reads a YAML file, rejects unknown keys and wrong types, and
fills anything not given from the dataclass defaults, so a config file only needs what it changes.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG_PATH = Path(__file__).with_name("default.yaml")


@dataclass
class SyntheticDataConfig:
    """Knobs of the seeded synthetic interaction log (``workflows/sources/synthetic.py``)."""

    num_users: int = 1000
    num_items: int = 600
    num_categories: int = 12
    latent_dim: int = 8
    events_per_user: float = 60.0  # mean impressions per user (lognormal around it)
    days: int = 30
    popularity_skew: float = 1.0  # Zipf exponent of the exposure policy
    personalized_exposure: float = 0.7  # share of impressions the logging policy picks by preference
    preference_strength: float = 3.0  # how sharply latent affinity drives clicks
    seed: int = 42


@dataclass
class SplitConfig:
    """How events are split into train and validation."""

    kind: str = "temporal"  # only "temporal" for now: the last ``valid_fraction`` of time is validation
    valid_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.kind != "temporal":
            raise ValueError(f"split.kind must be 'temporal', got {self.kind!r}")
        if not 0.0 < self.valid_fraction < 1.0:
            raise ValueError(f"split.valid_fraction must be in (0, 1), got {self.valid_fraction}")


@dataclass
class WorkflowConfig:
    """The NVTabular feature workflow (``workflows/features.py``)."""

    watch_threshold: float = 0.75  # the "watched >= 75%" label
    split: SplitConfig = field(default_factory=SplitConfig)


@dataclass
class CandidateGeneratorConfig:
    """Two-tower retrieval model (``models/candidate_generator.py``)."""

    embedding_dim: int = 32
    tower_layers: list[int] = field(default_factory=lambda: [64, 32])
    epochs: int = 10
    batch_size: int = 1024
    learning_rate: float = 0.01
    logq_correction: bool = False


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


@dataclass
class TargetConfig:
    """One signal the heavy ranker predicts, and its weight in the final score."""

    name: str = "click"
    weight: float = 1.0


def _default_targets() -> list:
    # Why these weights: see models/heavy_ranker.py (click is frequent but noisy, a duration-aware
    # watch says the item kept its promise, a like is rare but the most explicit).
    return [TargetConfig("click", 0.4), TargetConfig("duration_watch", 0.4), TargetConfig("like", 0.2)]


@dataclass
class LightRankerConfig:
    """Small DCN-v2 on a few features, trained with sampled negatives (``models/light_ranker.py``)."""

    features: list[str] = field(default_factory=lambda: ["user_id", "item_id", "category"])
    target: str = "click"
    negatives_per_positive: int = 4
    negative_sampling: str = "popularity"  # "uniform" or "popularity" (frequency-weighted)
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


@dataclass
class HeavyRankerConfig:
    """Larger multi-task DCN-v2 on every user and item feature (``models/heavy_ranker.py``)."""

    targets: list[TargetConfig] = field(default_factory=_default_targets)
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
        if any(t.weight < 0 for t in self.targets):
            raise ValueError(f"heavy_ranker.targets weights must be >= 0: {self.targets}")
        if sum(t.weight for t in self.targets) <= 0:
            raise ValueError("heavy_ranker.targets weights must not all be 0")


@dataclass
class TrainingConfig:
    """How every stage is trained (``models/train.py``, ``models/tracking.py``)."""

    early_stopping_patience: int = 2  # epochs without validation improvement before stopping
    mlflow_tracking_uri: str = ""  # "" -> file:<registry>/../mlruns
    mlflow_experiment: str = "merlin-funnel"


@dataclass
class ServingConfig:
    """Sizes of the funnel's stages (``serving/``)."""

    retrieval_k: int = 300  # candidates the ANN stage passes on
    light_ranker_k: int = 100  # candidates the light ranker keeps for the heavy ranker
    max_k: int = 100  # largest k a request may ask for
    exact_index_max_items: int = 100_000  # exact inner-product search below this catalog size
    fallback_window_days: float = 7.0  # recency half-life of the popularity fallback
    fallback_content_column: str = "category"  # items never clicked get their category's popularity...
    fallback_new_item_weight: float = 0.5  # ...times this (models/fallback.py); "" column disables it


@dataclass
class Config:
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    workflow: WorkflowConfig = field(default_factory=WorkflowConfig)
    candidate_generator: CandidateGeneratorConfig = field(default_factory=CandidateGeneratorConfig)
    embeddings: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    light_ranker: LightRankerConfig = field(default_factory=LightRankerConfig)
    heavy_ranker: HeavyRankerConfig = field(default_factory=HeavyRankerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    seed: int = 42

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, checking keys and (simple) types."""
    if not isinstance(values, dict):
        raise TypeError(f"{where}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(names)}")
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
    origin = typing.get_origin(hint)
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise TypeError(f"{path}: expected a list, got {value!r}")
        if dataclasses.is_dataclass(item_type):
            return [_build(item_type, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return [_check_type(v, item_type, f"{path}[{i}]") for i, v in enumerate(value)]
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
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if overrides:
        values = _merge(values, overrides)
    return _build(Config, values, "")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
