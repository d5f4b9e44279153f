"""Train every stage of the funnel for one processed dataset and publish one registry version.

    candidate_generator  two-tower (query tower + item embeddings -> ANN index)
    item_affinity        EASE item-item weights the ordering stage can blend in (models/item_affinity.py)
    light_ranker         small DCN-v2 on a few features, sampled negatives (keeps the top N)
    heavy_ranker         multi-task DCN-v2 on every user/item feature (weighted sum of heads), one or
                         an ensemble of members (heavy_ranker.members)
    fallback             recency-weighted popularity

Every stage is seeded from ``config.seed``, stops early on its validation metric and logs its
per-epoch metrics to the run's MLflow store (``models/tracking.py``); the training log prints the
parameters and bytes of every embedding table (``models/embeddings.py``).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pyarrow.parquet as pq
from merlin.io import Dataset
from merlin.schema import Tags
from tqdm.auto import tqdm

from configs import Config
from models import item_affinity, item_index, registry, tuning
from models.candidate_generator import item_embeddings, query_embeddings, train_candidate_generator
from models.embeddings import log_tables
from models.fallback import recency_weighted_popularity, with_new_items
from models.heads import with_member_weights
from models.heavy_ranker import train_heavy_ranker_members
from models.light_ranker import train_light_ranker
from models.saving import save_for_serving
from models.tracking import tracked_run
from workflows.adapt import config_for_dataset
from workflows.dedup import duplicate_ids
from workflows.local_parquet import read_parquet_dispatched as read_parquet
from workflows.pipeline import ProcessedData

log = logging.getLogger(__name__)

STAGES = ["candidate_generator", "item_affinity", "light_ranker", "heavy_ranker", "fallback"]


def feature_lists(schema) -> dict[str, list[str]]:
    """Which columns are user/item categorical/continuous features, in a fixed order serving reuses."""

    def names(entity, kind):
        of_kind = set(schema.select_by_tag(kind).column_names)
        return [c for c in schema.select_by_tag(entity).column_names if c in of_kind]

    return {
        "user_categorical": names(Tags.USER, Tags.CATEGORICAL),
        "user_continuous": names(Tags.USER, Tags.CONTINUOUS),
        "item_categorical": names(Tags.ITEM, Tags.CATEGORICAL),
        "item_continuous": names(Tags.ITEM, Tags.CONTINUOUS),
    }


# What the rankers' training depends on besides the data: a version that agrees on all of it has
# the rankers another training would give.
RANKER_INPUTS = (
    "seed",
    "embeddings",
    "training",
    "light_ranker",
    "heavy_ranker",
    "item_affinity",
)  # hard negatives read the affinity
NOT_RANKER_INPUTS = ("member_weights", "mlflow_tracking_uri", "mlflow_experiment")  # keys of those sections


def train_all(
    data: ProcessedData,
    config: Config,
    registry_dir: str | Path,
    verbose: int = 1,
    rankers_from: registry.ModelVersion | None = None,
    tune=None,
) -> registry.ModelVersion:
    """Train the candidate generator, both rankers and the fallback; publish them as one version.

    ``tune(version_dir, config) -> record`` (``evaluation/tuning.py``) is the tuning step: with
    ``tuning.enabled`` it runs once every stage is saved, scores the ``tuning`` grid on the
    validation part and returns every trial and the chosen values (``models/tuning.py``); the
    chosen values go into the manifest's config (so the export serves them), the record into the
    manifest's ``tuning`` and MLflow. ``None`` publishes the configured values as they are.

    ``rankers_from`` copies both rankers from that version instead of training them again, for
    variants that change only the candidate generator (the offline evaluation's mitigation table);
    it must have been trained on the same data with the same ``RANKER_INPUTS``.
    """
    train, valid = data.train(), data.valid()
    # The dataset spec's objective, and settings the data lacks a column for (workflows/adapt.py).
    config, notes = config_for_dataset(config, data.summary, train.schema.column_names)
    for note in notes:
        log.warning("adapted to the dataset: %s", note)
    features = feature_lists(train.schema)
    # The validation part too: every stage stops early on it (the rankers' best epoch restored) and
    # the manifest keeps its metrics, so rankers_from must not cross data that differ only there.
    fingerprint = registry.fingerprint(data.train_dir, data.valid_dir, data.workflow_dir)
    if rankers_from is not None:
        check_rankers_reusable(rankers_from.manifest, config, fingerprint)
    patience = config.training.early_stopping_patience
    keras_verbose = verbose
    # Before any training: an index the catalog cannot have failed only once the candidate generator had trained.
    # Read through Merlin's dispatch: cudf on a GPU machine, pandas otherwise.
    item_table = read_parquet(data.item_features)
    item_index.check_ann(len(item_table), config.serving.exact_index_max_items, config.serving.ann)
    # The same for a history event the training events lack (read once the candidate generator had trained).
    _check_history_event(pq.read_schema(data.train_events).names, config.training.history_event)
    # And for item affinity weights the catalog is too large for (fitted once the candidate generator had trained).
    _check_item_affinity(int(item_table["item_id"].max()) + 1, config, trains_rankers=rankers_from is None)

    with (
        registry.VersionWriter(registry_dir) as out,
        tracked_run(config.training, registry_dir, config.to_dict(), run_name=f"version-{out.version}") as run,
        tqdm(total=len(STAGES), desc="funnel stages", disable=verbose != 1) as progress,
    ):
        version = out.version
        run.set_tags({"registry_version": version, "data_fingerprint": fingerprint})
        sizes = {}

        progress.set_postfix_str("candidate_generator")
        tt_model, tt_metrics = train_candidate_generator(
            train,
            valid,
            config.candidate_generator,
            seed=config.seed,
            verbose=keras_verbose,
            embeddings=config.embeddings,
            patience=patience if config.candidate_generator.early_stopping else None,
            callbacks=[run.callback("candidate_generator")],
            catalog=item_table,
        )
        sizes["candidate_generator"] = log_tables(tt_model, "candidate_generator")
        save_for_serving(tt_model.query_encoder, out.tmp / "query_tower")
        (out.tmp / "query_tower.json").write_text(json.dumps({"version": version}))
        # Not served: the checklist re-embeds catalog items with it to verify the index's vectors (index_vectors).
        save_for_serving(tt_model.candidate_encoder, out.tmp / registry.ITEM_TOWER)
        item_inputs = Dataset(item_table.drop(columns=["item_id_raw"]))
        ids, vectors = item_embeddings(tt_model, item_inputs)
        queries = None
        if len(ids) > config.serving.exact_index_max_items:  # an ANN index: tuned to a recall on validation queries
            queries = query_embeddings(tt_model, valid, config.serving.ann.queries, seed=config.seed)
        index, index_info = item_index.build_index(
            ids,
            vectors,
            config.serving.exact_index_max_items,
            k=config.serving.retrieval_k,
            queries=queries,
            ann=config.serving.ann,
            seed=config.seed,
        )
        item_index.save_index(index, out.tmp, version, index_info)
        progress.update()

        # The item affinity before the rankers: the heavy ranker's hard negatives are drawn with it.
        progress.set_postfix_str("item_affinity")
        events = read_parquet(data.train_events)
        history = _history(events, config.training.history_event)
        history.columns = ["user_id_raw", "item_id_raw"]
        affinity = train_item_affinity(history, item_table, config, out.tmp, version)
        progress.update()

        if rankers_from is None:
            stored = _as_stored(config)
            trained_with = {key: stored[key] for key in RANKER_INPUTS}
            progress.set_postfix_str("light_ranker")
            light_model, light_metrics = train_light_ranker(
                train,
                valid,
                config.light_ranker,
                config.embeddings,
                config.training,
                seed=config.seed,
                callbacks=[run.callback("light_ranker")],
                verbose=keras_verbose,
            )
            sizes["light_ranker"] = log_tables(light_model, "light_ranker")
            save_for_serving(light_model, out.tmp / "light_ranker")
            progress.update()

            progress.set_postfix_str("heavy_ranker")
            affinity_weights = None
            if affinity and any(m.hard_negatives for m in config.heavy_ranker.members):
                affinity_weights = item_affinity.load(out.tmp)[0]
            heavy_models, heavy_metrics, heavy_spec = train_heavy_ranker_members(
                train,
                valid,
                config.heavy_ranker,
                config.embeddings,
                config.training,
                seed=config.seed,
                affinity_weights=affinity_weights,
                member_callbacks=lambda artifact: [run.callback(artifact)],  # heavy_ranker, heavy_ranker_1, ...
                verbose=keras_verbose,
            )
            sizes["heavy_ranker"] = log_tables(heavy_models[0][1], "heavy_ranker")
            for name, heavy_model in heavy_models:
                save_for_serving(heavy_model, out.tmp / name)
            progress.update()
        else:
            source = rankers_from.manifest
            for stage in ("light_ranker", "heavy_ranker"):
                sizes[stage] = source["model_sizes"][stage]
            for name in ["light_ranker", *source["heavy_ranker"].get("members", ["heavy_ranker"])]:
                shutil.copytree(rankers_from.path / name, out.tmp / name)
            light_metrics, heavy_metrics = source["metrics"]["light_ranker"], source["metrics"]["heavy_ranker"]
            heavy_spec = source["heavy_ranker"]
            trained_with = ranker_inputs(source)
            run.set_tags({"rankers_from_version": source["version"]})
            progress.update(2)

        progress.set_postfix_str("fallback")
        shutil.copy(data.user_features, out.tmp / "user_features.parquet")
        shutil.copy(data.item_features, out.tmp / "item_features.parquet")
        # A duplicate's raw id still arrives at serving (excluded ids, live events, takedowns).
        aliases = duplicate_ids(read_parquet(data.item_id_map))
        aliases.to_parquet(out.tmp / "item_aliases.parquet", index=False)
        history.to_parquet(out.tmp / "user_history.parquet", index=False)
        if data.fallback_events.exists():  # the history of the users active_users dropped (never trained on)
            dropped = _history(read_parquet(data.fallback_events), config.training.history_event)
            dropped.columns = ["user_id_raw", "item_id_raw"]
            dropped.to_parquet(out.tmp / "fallback_history.parquet", index=False)
        if data.recent_events.exists():  # the windowed activity features' events (serving counts them)
            shutil.copy(data.recent_events, out.tmp / "recent_events.parquet")
        # Only the catalog's items: the fallback serves raw ids, but a user's seen items (the export's
        # history, live events) reach serving as encoded ids, and an item outside the catalog (one that
        # workflow.features.id_freq_threshold sent to OOV) has none, so it was served again and again
        # to a user who had just watched it.
        in_catalog = events[events["item_id"].isin(item_table["item_id_raw"])]
        popularity = recency_weighted_popularity(in_catalog, config.serving.fallback_window_days)
        content = config.serving.fallback_content_column
        if content:
            if content not in item_table.columns:
                raise ValueError(
                    f"serving.fallback_content_column {content!r} is not an item feature "
                    f"(item features: {list(item_table.columns)})"
                )
            catalog = item_table[["item_id_raw", content]].rename(columns={"item_id_raw": "item_id"})
            popularity = with_new_items(popularity, catalog, content, config.serving.fallback_new_item_weight)
        popularity.to_parquet(out.tmp / "popularity.parquet", index=False)
        progress.update()

        metrics = {"candidate_generator": tt_metrics, "light_ranker": light_metrics, "heavy_ranker": heavy_metrics}
        manifest = dict(
            data_fingerprint=fingerprint,
            data_summary=data.summary,
            schema=_schema_summary(train.schema),
            config=config.to_dict(),
            # What the rankers were trained with: the tuning step may change some of it afterwards
            # for serving (the item affinity's penalty), so "config" can differ from it.
            ranker_inputs=trained_with,
            item_aliases=int(len(aliases)),  # serving/item_aliases.py; absent in older versions
            metrics=metrics,
            features=features,
            light_ranker={"features": list(config.light_ranker.features), "target": config.light_ranker.target},
            heavy_ranker=with_member_weights(heavy_spec, config.heavy_ranker.member_weights),
            model_sizes={
                k: {"total_params": v["total_params"], "embedding_params": v["embedding_params"]}
                for k, v in sizes.items()
            },
            item_tower={"path": registry.ITEM_TOWER, "inputs": list(tt_model.candidate_encoder.schema.column_names)},
            item_embedding_dim=int(vectors.shape[1]),
            num_indexed_items=int(len(ids)),
            item_index=index_info,  # exact, or the ANN setting chosen for a recall (and its measured curve)
            item_affinity=affinity,
        )
        if tune is not None and config.tuning.enabled:
            progress.set_postfix_str("tuning")
            out.write_manifest(**manifest)  # the funnel the tuner loads reads it
            record = tune(out.tmp, config)
            config = tuning.apply(config, record["chosen"])
            chosen_fit = (config.item_affinity.reg_weight, config.item_affinity.dropout)
            if affinity and chosen_fit != (affinity["reg_weight"], affinity["dropout"]):
                affinity = train_item_affinity(history, item_table, config, out.tmp, version)
            manifest.update(
                config=config.to_dict(),
                item_affinity=affinity,
                tuning=record,
                heavy_ranker=with_member_weights(heavy_spec, config.heavy_ranker.member_weights),
            )
            _log_tuning(run, record)
        out.write_manifest(**manifest)
        for stage, stage_metrics in metrics.items():
            run.log_metrics({f"{stage}.final.{k}": v for k, v in stage_metrics.items()})
        run.log_artifact(out.tmp / registry.MANIFEST)
        run.log_json("embedding_tables.json", sizes)
        if index_info.get("recall_at_k") is not None:
            run.log_metrics({"item_index.recall_at_k": index_info["recall_at_k"]})
    log.info("published model version %s", version)
    return registry.ModelVersion(out.path)


def _history(events, event: str):
    """``(user_id, item_id)`` pairs of the training events that count as history
    (``training.history_event``)."""
    _check_history_event(list(events.columns), event)
    if event != "impression":
        events = events[events[event] > 0]
    return events[["user_id", "item_id"]].drop_duplicates()


def _check_history_event(columns: list[str], event: str) -> None:
    if event != "impression" and event not in columns:
        raise ValueError(f"training.history_event {event!r} is not a column of the training events ({columns})")


def _check_item_affinity(num_items: int, config: Config, trains_rankers: bool) -> None:
    """Refuse what ``train_item_affinity`` and the heavy ranker's hard negatives would refuse for a
    catalog above ``item_affinity.max_items``: the affinity in the blend, or hard negatives drawn with
    it (where the rankers are trained here)."""
    ac = config.item_affinity
    if num_items <= ac.max_items:
        return
    if config.serving.ordering.affinity_weight > 0:
        raise ValueError(
            f"item_affinity needs a dense {num_items} x {num_items} weight matrix, above "
            f"item_affinity.max_items={ac.max_items}; raise the limit or set serving.ordering.affinity_weight: 0"
        )
    if trains_rankers and any(m.hard_negatives for m in config.heavy_ranker.members):
        raise ValueError(
            "heavy_ranker.members[].hard_negatives needs the item affinity weights, which this catalog "
            f"({num_items} items) is too large for (item_affinity.max_items={ac.max_items}); set hard_negatives: 0"
        )


def _log_tuning(run, record: dict) -> None:
    """The search in MLflow: the chosen values as params (the config's own params were logged
    before tuning, and MLflow params cannot change), each trial's metric as a step, the record."""
    metric = record["metric"]
    run.log_params({f"tuning.chosen.{k}": v for k, v in record["chosen"].items()})
    for step, trial in enumerate(record["trials"]):
        run.log_metrics({f"tuning.{metric}": trial[metric]}, step=step)
    run.log_metrics({f"tuning.best.{metric}": record["best"]})
    run.log_json("tuning.json", record)


def train_item_affinity(history, item_table, config: Config, directory: Path, version: int) -> dict | None:
    """Fit and save the item-item weights; ``None`` (and nothing saved) when the catalog is above
    ``item_affinity.max_items`` and the ordering does not use them, an error when it does."""
    ac = config.item_affinity
    num_items = int(item_table["item_id"].max()) + 1
    if num_items > ac.max_items and config.serving.ordering.affinity_weight == 0:
        log.info(
            "item_affinity skipped: %d items > item_affinity.max_items=%d (unused: affinity_weight 0)",
            num_items,
            ac.max_items,
        )
        return None
    weights = item_affinity.fit_from_history(history, item_table, ac.reg_weight, ac.max_items, ac.dropout)
    item_affinity.save(weights, directory, version, ac.reg_weight, ac.dropout)
    return {"items": num_items, "reg_weight": ac.reg_weight, "dropout": ac.dropout}


def _as_stored(config: Config) -> dict:
    """``config`` as a manifest stores it (JSON: lists, not tuples), so the two compare equal."""
    return json.loads(json.dumps(config.to_dict()))


def ranker_inputs(manifest: dict) -> dict:
    """The ``RANKER_INPUTS`` sections a version's rankers were trained with: its manifest's
    ``ranker_inputs`` (before the tuning step changed any of them for serving), or, for a version
    written before that record, its config."""
    return manifest.get("ranker_inputs") or {key: manifest["config"].get(key) for key in RANKER_INPUTS}


def check_rankers_reusable(manifest: dict, config: Config, fingerprint: str) -> None:
    """Refuse to reuse the rankers of the version ``manifest`` describes for ``config`` when they
    were trained on other data or with other ranker settings (``RANKER_INPUTS``). A version whose
    tuning step chose another item affinity to serve lends its rankers both to a run configured as
    they were trained (the next candidate generator of a search) and to one configured as the
    version serves (a variant of it, such as the mitigation table's)."""
    if manifest["data_fingerprint"] != fingerprint:
        raise ValueError(f"rankers_from version {manifest['version']} was trained on other data")
    ours = _as_stored(config)

    def trained(config_dict: dict, key: str):
        # Not inputs: the member weights are a serving choice the tuning step makes after training,
        # and where MLflow logs a run changes nothing a ranker learns.
        value = config_dict.get(key)
        return {k: v for k, v in value.items() if k not in NOT_RANKER_INPUTS} if isinstance(value, dict) else value

    differ = [
        key
        for key in RANKER_INPUTS
        if trained(ours, key) not in (trained(ranker_inputs(manifest), key), trained(manifest["config"], key))
    ]
    if differ:
        raise ValueError(f"rankers_from version {manifest['version']} has other ranker settings: {differ}")


def _schema_summary(schema) -> list[dict]:
    """Column names, tags and (for categoricals) cardinalities of the training data."""
    out = []
    for col in schema:
        entry = {"name": col.name, "tags": sorted(str(t.value) if hasattr(t, "value") else str(t) for t in col.tags)}
        if col.int_domain is not None:
            entry["cardinality"] = int(col.int_domain.max) + 1
        out.append(entry)
    return out
