"""The heavy ranker: a larger multi-task DCN-v2 on every user and item feature.

Last model of the funnel. It sees only the ``serving.light_ranker_k`` candidates the light ranker
kept, so it can afford more: every column tagged USER or ITEM (ids, attributes, and whatever
point-in-time activity or popularity features the dataset pipeline adds - selected by tag, so new
features are picked up without touching this file), two cross layers and a wider MLP.

Multi-task: one sigmoid head per signal in ``heavy_ranker.targets`` (default click,
``duration_watch``, like), trained jointly on every training impression (the shown-and-skipped ones
are the real negatives). The final score is a weighted sum of the heads (``models/heads.py`` ``combine``)::

    score = sum_i w_i * P(signal_i)        with the weights normalised to sum to 1, so score in [0, 1]

Why a weighted sum of several signals rather than P(click) alone: each signal is biased on its own.
Clicks are frequent but reward clickbait (a click says the thumbnail worked, not the item); a
duration-aware watch says the item kept its promise but is rarer and favours short items; a like is
the most explicit but rarest and noisiest. Summing calibrated probabilities lets one signal's bias be
outvoted by the others, and the weights are the product decision of how much each outcome is worth.
The default is measured rather than guessed: ``online/retention.py`` relates each signal to simulated
users coming back and derives the weights (on the synthetic world only clicks did: 1.0 click, 0
watch, 0 like, which beat the hand weights 0.4/0.4/0.2 in an A/B test; docs/online-loop.md). All heads
are trained whatever their weight, and the weights live in the config and the manifest, so changing
the trade-off needs no retraining.

Ensemble: ``heavy_ranker.members`` lists the models the stage averages, per head, before the
weighted sum. Each member has its own seed; a member with ``hard_negatives: n`` also trains on, per
user, the ``n`` unrated items the item affinity ranks highest (``models/negative_sampling.py``
``affinity_negatives``), labelled 0. Why: one DCN's ranking of the candidates varies with its seed
(on MovieLens-100K the funnel's NDCG@10 moved 0.327-0.332 between seeds), and averaging members
that saw different negatives cancels much of that; the members trained against the affinity's
favourites rank worse alone but disagree most usefully with the affinity the ordering blends in
(README, "Offline evaluation"). Member ``i`` is saved as ``member_artifact(i)``.

A target missing from the data falls back to its ``fallback`` label (``duration_watch`` ->
``watched``, the plain 75%-watched label) or, without one, is dropped with a warning; the remaining
weights are renormalised. Which targets were used is recorded in the manifest.
"""

from __future__ import annotations

import logging

import numpy as np
from merlin.io import Dataset
from merlin.schema import Schema, Tags

from configs import EmbeddingConfig, HeavyRankerConfig, TrainingConfig
from models.ranker import binary_targets, build_dcn, fit, head_aucs

log = logging.getLogger(__name__)

# What a configured target falls back to when the data does not have it (yet).
TARGET_FALLBACKS = {"duration_watch": "watched"}


def heavy_features(schema: Schema) -> list[str]:
    """Every user and item feature of the schema (by tag, so new features are picked up)."""
    return schema.select_by_tag([Tags.USER, Tags.ITEM]).excluding_by_tag(Tags.TARGET).column_names


def resolve_targets(schema: Schema, config: HeavyRankerConfig) -> dict[str, float]:
    """``{label column: weight}`` for the configured targets present in the data, weights summing to 1.

    Missing targets use their fallback label or are dropped (also when the fallback is configured as a
    target of its own); both cases are logged by name.
    """
    present = set(schema.column_names)
    configured = {target.name for target in config.targets}
    weights: dict[str, float] = {}
    missing = []
    for target in config.targets:
        name = target.name
        if name not in present:
            fallback = TARGET_FALLBACKS.get(name)
            # A fallback that is a configured target itself keeps its own weight, whatever the order of
            # the list: checked against the weights gathered so far, [duration_watch, watched] merged
            # both weights into watched and [watched, duration_watch] dropped duration_watch's.
            if fallback in present and fallback not in configured:
                log.warning("heavy ranker: target %r is not in the data; using %r instead", name, fallback)
                name = fallback
            else:
                missing.append(name)
                continue
        weights[name] = weights.get(name, 0.0) + float(target.weight)
    if missing:
        log.warning("heavy ranker: target(s) %s not in the data and dropped; training on %s", missing, list(weights))
    total = sum(weights.values())
    if not weights:
        raise ValueError(
            f"heavy_ranker.targets {[t.name for t in config.targets]}: none is in the data (columns: {sorted(present)})"
        )
    if total <= 0:
        weighted = [t.name for t in config.targets if t.weight > 0]
        raise ValueError(
            f"heavy_ranker.targets: those in the data ({list(weights)}) all have weight 0, and the weighted "
            f"ones {weighted} are not in the data (columns: {sorted(present)}); give a present target a weight"
        )
    return {name: w / total for name, w in weights.items()}


def member_artifact(index: int) -> str:
    """Directory of ensemble member ``index`` in a model version (the first keeps the plain name)."""
    return "heavy_ranker" if index == 0 else f"heavy_ranker_{index}"


def with_hard_negatives(train: Dataset, affinity_weights, per_user: int, seed: int, targets=()) -> Dataset:
    """``train`` plus ``per_user`` affinity hard negatives per user (every label column 0), shuffled.

    The label columns are those tagged as targets plus ``targets`` (the heads trained, whose columns
    need not carry the tags)."""
    from merlin.core.dispatch import concat

    from models.negative_sampling import affinity_negatives

    if affinity_weights is None:
        raise ValueError(
            "heavy_ranker.members[].hard_negatives needs the item affinity weights, which this "
            "version does not have (item_affinity.max_items); set hard_negatives: 0"
        )
    frame = train.to_ddf().compute()
    # An untagged target was taken for a user-side column: the negatives copied it from the user's
    # first positive row (labelled 1 there) instead of 0.
    tagged = train.schema.select_by_tag(Tags.TARGET).column_names
    labels = [c for c in dict.fromkeys([*tagged, *targets]) if c in frame.columns]
    item_columns = train.schema.select_by_tag(Tags.ITEM).excluding_by_tag(Tags.TARGET).column_names
    negatives = affinity_negatives(frame, affinity_weights, per_user, labels, item_columns, seed=seed)
    both = concat([frame, negatives], ignore_index=True)
    both = both.take(np.random.default_rng(seed).permutation(len(both))).reset_index(drop=True)
    log.info(
        "heavy ranker: %d affinity hard negatives (%d per user) beside %d training rows",
        len(negatives),
        per_user,
        len(frame),
    )
    return Dataset(both, schema=train.schema)


def train_heavy_ranker_members(
    train: Dataset,
    valid: Dataset,
    config: HeavyRankerConfig,
    embeddings: EmbeddingConfig,
    training: TrainingConfig,
    seed: int = 42,
    affinity_weights=None,
    callbacks=(),
    verbose: int = 1,
    member_callbacks=None,
):
    """Train every member of ``config.members``; return ``(models, metrics, spec)``.

    ``member_callbacks(artifact)`` gives callbacks for one member only (the MLflow epoch logger, so
    that each member's per-epoch metrics are logged under its own name, not interleaved).

    ``models`` are ``(artifact name, model)`` pairs; ``metrics`` are the first member's, with each
    further member's under ``member<i>_<metric>``; ``spec`` lists the members' artifacts.
    """
    models, metrics, spec = [], {}, None
    for index, member in enumerate(config.members):
        member_seed = seed + index
        member_train = train
        if member.hard_negatives:
            member_train = with_hard_negatives(
                train, affinity_weights, member.hard_negatives, member_seed, list(resolve_targets(train.schema, config))
            )
        artifact = member_artifact(index)
        own = list(member_callbacks(artifact)) if member_callbacks else []
        model, member_metrics, spec = train_heavy_ranker(
            member_train,
            valid,
            config,
            embeddings,
            training,
            seed=member_seed,
            callbacks=[*callbacks, *own],
            verbose=verbose,
        )
        models.append((artifact, model))
        prefix = "" if index == 0 else f"member{index}_"
        metrics.update({prefix + k: v for k, v in member_metrics.items()})
    spec["members"] = [name for name, _ in models]
    spec["hard_negatives"] = [m.hard_negatives for m in config.members]
    return models, metrics, spec


def train_heavy_ranker(
    train: Dataset,
    valid: Dataset,
    config: HeavyRankerConfig,
    embeddings: EmbeddingConfig,
    training: TrainingConfig,
    seed: int = 42,
    callbacks=(),
    verbose: int = 1,
):
    """Train on all impressions; return ``(model, metrics, spec)``.

    ``spec`` is what serving needs: the feature list, the targets and their weights.
    """
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed)
    weights = resolve_targets(train.schema, config)
    targets = list(weights)
    features = heavy_features(train.schema)
    columns = features + targets
    schema = binary_targets(train.schema.select_by_name(columns), targets)
    train_ds = Dataset(train.to_ddf()[columns], schema=schema)
    valid_ds = Dataset(valid.to_ddf()[columns], schema=schema)
    model = build_dcn(train_ds.schema, features, targets, config.cross_depth, config.deep_layers, embeddings)
    history = fit(
        model,
        train_ds,
        valid_ds,
        epochs=config.epochs,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        patience=training.early_stopping_patience,
        monitor="val_loss",
        mode="min",
        callbacks=callbacks,
        verbose=verbose,
    )
    aucs = head_aucs(model, valid_ds, features, targets)
    metrics = {f"auc_{t}": v for t, v in aucs.items()}
    metrics["epochs_run"] = len(history.history.get("loss", []))
    log.info("heavy ranker: valid AUC per head %s after %d epochs", aucs, metrics["epochs_run"])
    spec = {"features": features, "targets": targets, "weights": weights}
    return model, metrics, spec
