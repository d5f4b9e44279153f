"""Everything downstream adapts to what a dataset has: the config's defaults are written for the raw
schema (a title, a category, watch time), and a spec may have none of them.

``adapt_workflow_config`` (before the pipeline runs) and ``config_for_dataset`` (before training, from
what the pipeline recorded in ``summary.json``) return a copy of the config with every setting the
data cannot support changed, and one note per change; the pipeline writes the notes to
``summary.json`` (``dataset.adaptations``) and the scripts print them:

    workflow.dedup.canonical_items      off when a signature column (title, ...) is not an item column
    workflow.content_filter.denylist    off (takedowns kept) when its text columns are not item columns
    workflow.negative_sampling          an implicit log (no outcome signal: every event a positive)
                                        gets popularity-sampled negatives, else no ranker has a negative
    heavy_ranker.targets                the spec's ``objective`` (its heads and weights), when it has one
    light_ranker.features               features the data lacks are left out; ``category`` becomes the
                                        first item categorical feature
    serving.fallback_content_column     the first item categorical feature when ``category`` is absent
    serving.ordering.category_column    the same, or "" when the items have no categorical feature

A setting that names something the data lacks and cannot be adapted (``active_users.event`` naming
a signal the spec does not have) is an error naming both; so is ``workflow.negative_sampling`` with a
continuous signal whose ``threshold`` is 0 or less (a sampled negative has every signal 0, which that
label would count as positive).
"""

from __future__ import annotations

import dataclasses

from configs import Config, NegativeSamplingConfig, WorkflowConfig, with_overrides
from workflows.spec import Layout, SpecError


def adapt_workflow_config(config: WorkflowConfig, layout: Layout, item_columns: list[str]) -> tuple:
    """``(config, notes)``: the workflow config with what ``layout`` cannot support switched off."""
    notes = []
    if config.active_users.enabled and config.active_users.event != "impression":
        if config.active_users.event not in layout.signals:
            raise SpecError(
                f"workflow.active_users.event is {config.active_users.event!r}, not a signal of this dataset "
                f"({list(layout.signals)}); use one of them or 'impression'"
            )
    dedup, content, negatives = config.dedup, config.content_filter, config.negative_sampling
    missing = [c for c in dedup.signature_columns if c not in item_columns]
    if dedup.canonical_items and missing:
        dedup = dataclasses.replace(dedup, canonical_items=False)
        notes.append(
            f"workflow.dedup.canonical_items off: signature column(s) {missing} are not item columns "
            f"(set workflow.dedup.signature_columns to columns of your item table to keep it)"
        )
    missing = [c for c in content.columns if c not in item_columns]
    if content.enabled and content.classifier == "keyword" and missing:
        # The denylist only: the live store's takedowns need no text column, and switching the whole
        # filter off put a taken-down item back into the next training run and export.
        content = dataclasses.replace(content, denylist=[], columns=[])
        notes.append(
            f"workflow.content_filter's keyword denylist off: text column(s) {missing} are not item columns "
            f"(set workflow.content_filter.columns to your item text columns to keep it); takedowns still apply"
        )
    if not layout.positive and negatives.kind == "none":
        negatives = NegativeSamplingConfig(kind="popularity", ratio=4.0, valid=True, seed=negatives.seed)
        notes.append(
            "workflow.negative_sampling: the log has no outcome signal (every event is a positive), so the "
            "rankers get 4 popularity-sampled negatives per event, in validation too"
        )
    # A sampled negative has every signal 0, and a continuous signal's label is ``value >= threshold``:
    # a threshold of 0 or less labelled every sampled negative positive for that signal.
    thresholds = layout.thresholds if negatives.kind != "none" else ()
    passing = [f"{name} (threshold {threshold:g})" for name, threshold in thresholds if threshold <= 0]
    if passing:
        raise SpecError(
            f"workflow.negative_sampling is {negatives.kind!r}, and sampled negatives have every signal 0, "
            f"which the label of {', '.join(passing)} counts as positive: give events.signals a threshold "
            f"above 0 or set workflow.negative_sampling.kind: none"
        )
    adapted = dataclasses.replace(config, dedup=dedup, content_filter=content, negative_sampling=negatives)
    return adapted, notes


def config_for_dataset(config: Config, summary: dict, columns: list[str] | None = None) -> tuple:
    """``(config, notes)``: the training and serving config adapted to a processed dataset.

    ``summary`` is the pipeline's ``summary.json``; without a ``dataset`` section (data processed
    before specs existed) the config is returned unchanged. ``columns``: the processed training
    data's columns (the light ranker's features are checked against them).
    """
    dataset = summary.get("dataset")
    if not dataset:
        return config, []
    layout = dataset["layout"]
    overrides: dict = {}
    notes = []
    objective = dataset.get("objective") or []
    current = [{"name": t.name, "weight": t.weight} for t in config.heavy_ranker.targets]
    if objective and objective != current:
        overrides["heavy_ranker"] = {"targets": objective}
        heads = ", ".join(f"{t['name']} {t['weight']:g}" for t in objective)
        notes.append(f"heavy_ranker.targets from the spec's objective: {heads}")
    item_categorical = list(layout["item_categorical"])
    substitute = item_categorical[0] if item_categorical else ""
    if columns is not None:
        wanted = list(config.light_ranker.features)
        kept = [f for f in wanted if f in columns]
        if kept != wanted:
            dropped = [f for f in wanted if f not in columns]
            note = f"light_ranker.features: {dropped} not in the data, left out"
            if "category" in dropped and substitute and substitute not in kept:
                kept.append(substitute)  # the light ranker's content feature: the first item categorical
                note += f"; {substitute!r} instead of 'category'"
            overrides["light_ranker"] = {"features": kept}
            notes.append(note)
    serving: dict = {}
    if config.serving.fallback_content_column and config.serving.fallback_content_column not in item_categorical:
        serving["fallback_content_column"] = substitute
        notes.append(
            f"serving.fallback_content_column {config.serving.fallback_content_column!r} is not an item "
            f"feature; using {substitute!r}"
        )
    category = config.serving.ordering.category_column
    if category and category not in item_categorical:
        serving["ordering"] = {"category_column": substitute}
        notes.append(f"serving.ordering.category_column {category!r} is not an item feature; using {substitute!r}")
    if serving:
        overrides["serving"] = serving
    return (with_overrides(config, overrides) if overrides else config), notes
