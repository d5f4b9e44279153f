"""The training run's tuning step: the search space from the config, the choice, what it changes.

The values a person used to copy by hand from validation grids (the ordering blend weights, the
item affinity's L2 penalty, which heavy-ranker ensemble members count and how much, the candidate
generator's logQ strength and sampled negatives) are
chosen by the training run itself (``configs.TuningConfig``):

1. ``grid(config)`` lists every combination of the configured candidate values, each a mapping of
   dotted config keys (``serving.ordering.affinity_weight``) to a value; combinations the config
   would refuse (retrieval + affinity weight above 1) are left out;
2. a tuner (``evaluation/tuning.py``: it needs the served funnel, a layer above this one) scores each
   on the validation part and returns a ``record``: every trial's parameters and metric, the chosen
   one and the metric's name;
3. ``train_all(tune=...)`` (``models/train.py``) applies the choice to the config before it writes the
   manifest, so the exported ordering serves it, and keeps the record in the manifest (``tuning``)
   and in MLflow (``tuning.json``, the chosen values as ``tuning.chosen.*`` params);
4. ``retrained_grid(config)``: the candidate generator's knobs (``logq_strength``,
   ``sampled_negatives``), one retraining each; ``evaluation.tuning.train_tuned`` searches them;
5. ``at_edge(config, chosen)``: the chosen values that are the smallest or largest of their range
   where the knob could go further: the best may lie outside what was searched, so widen the range.

The record's shape (what reports plot)::

    {"metric": "ndcg_at_10", "part": "validation", "users": 812,
     "trials": [{"params": {"serving.ordering.retrieval_weight": 0.1, ...}, "ndcg_at_10": 0.071}, ...],
     "chosen": {"serving.ordering.retrieval_weight": 0.1, ...}, "best": 0.083, "seconds": 21.4,
     "at_edge": [{"knob": "item_affinity.reg_weight", "value": 500.0, "side": "largest"}],
     "candidate_generator": {...}}   # only with retrained knobs: the same shape, one trial per
                                     # retrained candidate generator (its best blend's metric)

"""

from __future__ import annotations

import itertools
from typing import Any

from configs import TUNING_DOMAINS, Config, with_overrides

# The tunable config keys, in grid order, and the TuningConfig field listing each one's candidates.
KNOBS = (
    ("serving.ordering.retrieval_weight", "retrieval_weight"),
    ("serving.ordering.affinity_weight", "affinity_weight"),
    ("item_affinity.reg_weight", "reg_weight"),
    ("item_affinity.dropout", "affinity_dropout"),
    ("heavy_ranker.member_weights", "member_weights"),
)


# Knobs that retrain the candidate generator per value (``evaluation.tuning.train_tuned``).
RETRAINED_KNOBS = (
    ("candidate_generator.logq_strength", "logq_strength"),
    ("candidate_generator.sampled_negatives", "sampled_negatives"),
)


def metric_name(k: int) -> str:
    return f"ndcg_at_{k}"


def current(config: Config, key: str) -> Any:
    """The configured value of a dotted key."""
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def grid(config: Config) -> list[dict[str, Any]]:
    """Every combination of the tuning candidates (a knob without candidates keeps its configured
    value), in a fixed order; combinations whose blend weights sum above 1 are left out."""
    tc = config.tuning
    axes = [(key, list(getattr(tc, field)) or [current(config, key)]) for key, field in KNOBS]
    out = []
    for values in itertools.product(*(candidates for _, candidates in axes)):
        params = {key: value for (key, _), value in zip(axes, values)}
        if params["serving.ordering.retrieval_weight"] + params["serving.ordering.affinity_weight"] > 1.0 + 1e-9:
            continue
        out.append(params)
    return out


def retrained_grid(config: Config) -> list[dict[str, Any]]:
    """Every combination of the candidate-generator candidates (``RETRAINED_KNOBS``), in a fixed
    order; ``[]`` when none is listed (nothing to retrain). A knob without candidates keeps its
    configured value."""
    tc = config.tuning
    if not any(getattr(tc, field) for _, field in RETRAINED_KNOBS):
        return []
    if tc.logq_strength and not config.candidate_generator.logq_correction:
        raise ValueError("tuning.logq_strength lists candidates, but candidate_generator.logq_correction is off")
    axes = [(key, list(getattr(tc, field)) or [current(config, key)]) for key, field in RETRAINED_KNOBS]
    return [
        {key: value for (key, _), value in zip(axes, values)}
        for values in itertools.product(*(candidates for _, candidates in axes))
    ]


def best_trial(trials: list[dict], metric: str) -> dict:
    """The trial with the highest ``metric``; the first such in grid order on a tie (the grid lists
    smaller weights first, so a tie keeps the simpler blend)."""
    if not trials:
        raise ValueError("no tuning trial to choose from")
    return max(trials, key=lambda t: (t[metric], -trials.index(t)))


def configured(config: Config, trial: dict, metric: str) -> dict:
    """``trial`` with each of its knobs at the configured value and ``metric`` 0: for a search that
    measured nothing (no validation user), whose first trial would replace the config for no reason."""
    return {**trial, "params": {key: current(config, key) for key in trial["params"]}, metric: 0.0}


# The item affinity's fit: its penalty and dropout change a served list only through the blend's
# affinity weight.
AFFINITY_WEIGHT = "serving.ordering.affinity_weight"
AFFINITY_FIT = ("item_affinity.reg_weight", "item_affinity.dropout")


def affinity_unused(chosen: dict[str, Any]) -> bool:
    """Whether ``chosen`` gives the item affinity no weight in the blend: every (penalty, dropout) pair
    then scored the same lists, so the search measured nothing about them."""
    return AFFINITY_WEIGHT in chosen and float(chosen[AFFINITY_WEIGHT]) == 0.0


def choose(config: Config, trials: list[dict], metric: str) -> dict:
    """``best_trial``, except that the item affinity's penalty and dropout stay as configured where the
    best blend gives the affinity no weight: all pairs tied exactly, and the first of the grid would
    replace the configured pair for no measured reason, although the version still serves its weights
    (the fallback's ``fresh_history`` answers users the models never saw with them) and refits them."""
    best = best_trial(trials, metric)
    if not affinity_unused(best["params"]):
        return best
    kept = {key: current(config, key) for key in AFFINITY_FIT if key in best["params"]}
    return {**best, "params": {**best["params"], **kept}}


def at_edge(config: Config, chosen: dict[str, Any]) -> list[dict[str, Any]]:
    """The chosen values that sit at the end of their searched range while the knob's domain
    (``configs.TUNING_DOMAINS``) goes further: ``[{"knob", "value", "side": "smallest" | "largest"}]``.

    A knob searched over one value, or not chosen in ``chosen``, is not judged; nor are list-valued
    knobs (the member weights), nor the item affinity's penalty and dropout where ``chosen`` gives the
    affinity no weight (``affinity_unused``: the search could not tell their values apart). Each knob
    is judged on its own list, whatever the others chose: a blend of retrieval 0.5 and affinity 0.5
    with retrieval searched up to 0.5 is flagged, since retrieval 0.6 with affinity 0.4 was never
    tried."""
    tc = config.tuning
    out = []
    for key, field in (*KNOBS, *RETRAINED_KNOBS):
        if key not in chosen or field not in TUNING_DOMAINS:  # it holds the scalar knobs only
            continue
        if key in AFFINITY_FIT and affinity_unused(chosen):
            continue
        candidates = [float(v) for v in getattr(tc, field)]
        if len(set(candidates)) < 2:
            continue
        value, (low, high, _, _) = float(chosen[key]), TUNING_DOMAINS[field]
        if value == max(candidates) and value < high:
            out.append({"knob": key, "value": chosen[key], "side": "largest"})
        elif value == min(candidates) and value > low:
            out.append({"knob": key, "value": chosen[key], "side": "smallest"})
    return out


def edge_text(edges: list[dict[str, Any]]) -> str:
    """One line for people, "" when nothing is at an edge."""
    parts = [f"{e['knob'].rsplit('.', 1)[-1]} {e['value']:g} is the {e['side']} value searched" for e in edges]
    return ("; ".join(parts) + ": widen its range in tuning to see whether the best lies beyond") if parts else ""


def describe(params: dict[str, Any]) -> str:
    """One line for people: ``retrieval_weight 0.2, member_weights [0.25, 0.75]`` (a knob's last
    name; numbers and lists of numbers, such as member weights, in their shortest form)."""

    def text(value: Any) -> str:
        if isinstance(value, (list, tuple)):
            return "[" + ", ".join(text(v) for v in value) + "]"
        return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)

    return ", ".join(f"{key.rsplit('.', 1)[-1]} {text(value)}" for key, value in params.items())


def as_overrides(params: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys -> the nested mapping ``configs.with_overrides`` merges."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def apply(config: Config, params: dict[str, Any]) -> Config:
    """``config`` with the chosen values, validated like a loaded file."""
    return with_overrides(config, as_overrides(params))


def chosen_config(config: Config, manifest: dict) -> Config:
    """``config`` with the values a version's tuning step chose (unchanged if it did not tune), e.g.
    so variants trained later agree with the version on everything the rankers depend on."""
    tuning = manifest.get("tuning") or {}
    return apply(config, tuning.get("chosen", {}))
