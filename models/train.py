"""Train every stage of the funnel for one processed dataset and publish one registry version.

    candidate_generator  two-tower (query tower + item embeddings -> ANN index)
    ranker               DCN-v2 on user x item features
    fallback             recency-weighted popularity
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from merlin.core.dispatch import read_dispatch
from merlin.io import Dataset
from merlin.schema import Tags

from configs import Config
from models import item_index, registry
from models.candidate_generator import item_embeddings, train_candidate_generator
from models.fallback import recency_weighted_popularity
from models.ranker import train_ranker
from workflows.pipeline import ProcessedData

log = logging.getLogger(__name__)
read_parquet = read_dispatch(fmt="parquet")


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


def train_all(data: ProcessedData, config: Config, registry_dir: str | Path, verbose: int = 1) -> registry.ModelVersion:
    """Train the candidate generator, the ranker and the fallback; publish them as one version."""
    train, valid = data.train(), data.valid()
    features = feature_lists(train.schema)

    with registry.VersionWriter(registry_dir) as out:
        version = out.version
        tt_model, tt_metrics = train_candidate_generator(
            train, valid, config.candidate_generator, seed=config.seed, verbose=verbose
        )
        tt_model.query_encoder.save(str(out.tmp / "query_tower"))
        (out.tmp / "query_tower.json").write_text(json.dumps({"version": version}))

        # Read through Merlin's dispatch: cudf on a GPU machine, pandas otherwise.
        item_table = read_parquet(data.item_features)
        item_inputs = Dataset(item_table.drop(columns=["item_id_raw"]))
        ids, vectors = item_embeddings(tt_model, item_inputs)
        index = item_index.build_index(ids, vectors, config.serving.exact_index_max_items)
        item_index.save_index(index, out.tmp, version)

        ranker_model, ranker_metrics = train_ranker(train, valid, config.ranker, seed=config.seed, verbose=verbose)
        ranker_model.save(str(out.tmp / "ranker"))

        shutil.copy(data.user_features, out.tmp / "user_features.parquet")
        shutil.copy(data.item_features, out.tmp / "item_features.parquet")
        events = read_parquet(data.train_events)
        history = events[["user_id", "item_id"]].drop_duplicates()
        history.columns = ["user_id_raw", "item_id_raw"]
        history.to_parquet(out.tmp / "user_history.parquet", index=False)
        popularity = recency_weighted_popularity(events, config.serving.fallback_window_days)
        popularity.to_parquet(out.tmp / "popularity.parquet", index=False)

        out.write_manifest(
            data_fingerprint=registry.fingerprint(data.train_dir, data.workflow_dir),
            data_summary=data.summary,
            config=config.to_dict(),
            metrics={"candidate_generator": tt_metrics, "ranker": ranker_metrics},
            features=features,
            item_embedding_dim=int(vectors.shape[1]),
            num_indexed_items=int(len(ids)),
        )
    log.info("published model version %s", version)
    return registry.ModelVersion(out.path)

