"""The funnel's stages as plain Python classes: Triton's thin ``model.py`` files wrap them.

Each stage is built from its artifact folder (a Triton model version folder holding the stage's
artifacts and the run's ``manifest.json``) and maps a dict of numpy arrays to a dict of numpy
arrays. Each class declares its tensors (``inputs``, ``outputs``; ``serving/interface.py``), which
``tests/test_interface.py`` holds ``triton_repo/<stage>/config.pbtxt`` to. Tests use these classes directly,
without a server.

    feature_lookup  user_id            -> user_categorical, user_continuous, user_known, seen_items
    query_tower     user features      -> query_embedding
    retrieval       query_embedding    -> candidate_ids (encoded), retrieval_scores
    filtering       candidates, seen, excluded -> filtered_ids (exclude_item_ids: optional request context)
    light_ranker    user features, ids -> light_ids (the best ``light_ranker_k``), light_scores in [0, 1]
    heavy_ranker    user features, ids -> heavy_scores in [0, 1] (weighted sum of the signal heads)
    ordering        scores, seen, k, known -> item_ids (raw), scores, model_version, served_by, stage_counts
                    (final score with the optional item-to-item affinity of the user's history,
                    exploration, business rules: ``serving/ordering.py``)

Unknown users still flow through the candidate stages (with out-of-vocabulary features, cheap) and
``ordering`` answers them from the popularity fallback; an ensemble cannot branch, and this keeps
one code path for every request.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd

from serving.fast_inference import ServingFunction
from serving.interface import EXCLUDE, FUNNEL_OUTPUTS, MANIFEST, SEEN, USER_FEATURES, USER_ID, K, Tensor
from serving.request import RequestError, RequestLimits, scalar

OOV_INDEX = 2  # NVTabular Categorify: 0 padding, 1 null, 2 out-of-vocabulary


def load_manifest(artifacts: str | Path) -> dict:
    return json.loads((Path(artifacts) / MANIFEST).read_text())


class Stage:
    """A step of the funnel: ``run`` maps the ``inputs`` tensors to the ``outputs`` tensors."""

    name = "stage"
    inputs: tuple[Tensor, ...] = ()
    outputs: tuple[Tensor, ...] = ()

    def __init__(self, artifacts: str | Path):
        self.artifacts = Path(artifacts)
        self.manifest = load_manifest(self.artifacts)
        self.version = int(self.manifest["version"])
        self.features = self.manifest["features"]
        self.serving = self.manifest["config"]["serving"]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


def _import_tf():
    import tensorflow as tf

    # Per-request batches are small (one user, a few hundred candidates) and several stage processes
    # share the cores: one thread per op avoids oversubscription. Two inter-op threads, not one: with a
    # single one TF's executor can wait forever on a cond inside a function (tensorflow#38969), the
    # suspected cause of stage stubs seen stuck while loading under load (2 full test runs in a row).
    # Must precede TF's first op.
    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(2)
    except RuntimeError:  # already initialised in this process (tests import stages directly)
        pass
    return tf


class FeatureLookup(Stage):
    """Reads the user's encoded features and history from the online store."""

    name = "feature_lookup"
    inputs = (USER_ID,)
    outputs = (*USER_FEATURES, Tensor("user_known", "BOOL", (1,)), SEEN)

    def __init__(self, artifacts):
        super().__init__(artifacts)
        from serving.online_store import OnlineStore

        self.store = OnlineStore(
            self.artifacts / "online_store.sqlite",
            self.features["user_categorical"],
            self.features["user_continuous"],
        )

    def run(self, inputs):
        user_id = scalar(inputs, "user_id", int)
        found = self.store.user_features(user_id)
        if found is None:
            unknown = unknown_user(self.features)
            cat, cont = unknown["user_categorical"], unknown["user_continuous"]
            seen = np.zeros(0, dtype=np.int64)
        else:
            cat, cont = found
            seen = self.store.history(user_id)
        return {
            "user_categorical": cat,
            "user_continuous": cont,
            "user_known": np.array([found is not None]),
            "seen_items": seen,
        }


class QueryTower(Stage):
    """Embeds the user with the candidate generator's query tower."""

    name = "query_tower"
    inputs = USER_FEATURES
    outputs = (Tensor("query_embedding", "FP32"),)

    def __init__(self, artifacts):
        super().__init__(artifacts)
        from models.item_index import check_versions

        tower_version = json.loads((self.artifacts / "query_tower.json").read_text())["version"]
        check_versions(manifest=self.version, query_tower=tower_version)
        self._tf = _import_tf()
        # The saved graph (serving/fast_inference.py): ~40x less per-request overhead than eager.
        self._predict = ServingFunction(self._tf, self.artifacts / "query_tower")
        if len(self._predict.output_names) != 1:
            raise RuntimeError(f"the query tower has outputs {self._predict.output_names}, expected one embedding")

    def run(self, inputs):
        batch = user_batch(self.features, inputs["user_categorical"], inputs["user_continuous"], rows=1, tf=self._tf)
        (embedding,) = self._predict(batch).values()
        return {"query_embedding": np.asarray(embedding, dtype=np.float32).reshape(-1)}


def unknown_user(features: dict) -> dict:
    """Encoded features of a user the models never saw (every categorical out-of-vocabulary)."""
    return {
        "user_categorical": np.full(len(features["user_categorical"]), OOV_INDEX, dtype=np.int64),
        "user_continuous": np.zeros(len(features["user_continuous"]), dtype=np.float32),
    }


def user_batch(features: dict, categorical: np.ndarray, continuous: np.ndarray, rows: int, tf) -> dict:
    """A Merlin model input dict holding one user's features repeated ``rows`` times."""
    categorical = np.asarray(categorical, dtype=np.int64).reshape(-1)
    continuous = np.asarray(continuous, dtype=np.float32).reshape(-1)
    names_cat, names_cont = features["user_categorical"], features["user_continuous"]
    if len(categorical) != len(names_cat) or len(continuous) != len(names_cont):
        raise RequestError(
            f"expected {len(names_cat)} categorical and {len(names_cont)} continuous user features, "
            f"got {len(categorical)} and {len(continuous)}"
        )
    # 1-D columns, as in the SavedModel's serving signature: a ranker whose item ids are hashed
    # (more ids than embeddings.max_rows) accepts nothing else.
    batch = {n: tf.constant(np.full(rows, v, dtype=np.int64)) for n, v in zip(names_cat, categorical)}
    batch.update({n: tf.constant(np.full(rows, v, dtype=np.float32)) for n, v in zip(names_cont, continuous)})
    return batch


class Retrieval(Stage):
    """Approximate nearest neighbours of the query embedding in the item index."""

    name = "retrieval"
    inputs = (Tensor("query_embedding", "FP32"),)
    outputs = (Tensor("candidate_ids", "INT64"), Tensor("retrieval_scores", "FP32"))

    def __init__(self, artifacts):
        super().__init__(artifacts)
        from models import item_index

        self._search = item_index.search
        # One query per request: OpenMP threads only add spin-wait overhead (measured: HNSW top-300
        # over 50k vectors 2.6 ms with 2 threads, 0.34 ms with 1); concurrency comes from requests.
        import faiss

        faiss.omp_set_num_threads(1)
        self.index, self.index_meta = item_index.load_index(self.artifacts, expected_version=self.version)
        self.k = int(self.serving["retrieval_k"])

    def run(self, inputs):
        query = np.asarray(inputs["query_embedding"], dtype=np.float32).reshape(-1)
        if query.shape[0] != self.index_meta["dim"]:
            raise RequestError(f"query_embedding has {query.shape[0]} dims, index has {self.index_meta['dim']}")
        ids, scores = self._search(self.index, query, min(self.k, self.index.ntotal))
        return {"candidate_ids": ids.astype(np.int64), "retrieval_scores": scores.astype(np.float32)}


class Filtering(Stage):
    """Drops candidates the user has already seen and those the request excludes (its context)."""

    name = "filtering"
    inputs = (EXCLUDE, Tensor("candidate_ids", "INT64"), SEEN)
    outputs = (Tensor("filtered_ids", "INT64"),)

    def __init__(self, artifacts):
        super().__init__(artifacts)
        items = pd.read_parquet(self.artifacts / "item_features.parquet", columns=["item_id", "item_id_raw"])
        self.encoded_of = pd.Series(items["item_id"].to_numpy(), index=items["item_id_raw"].to_numpy())
        self.limits = RequestLimits.from_serving(self.serving)

    def run(self, inputs):
        candidates = np.asarray(inputs["candidate_ids"], dtype=np.int64).reshape(-1)
        seen = np.asarray(inputs["seen_items"], dtype=np.int64).reshape(-1)
        keep = ~np.isin(candidates, seen)
        excluded = self.limits.excluded(inputs)
        if excluded.size:  # ids the catalog does not hold cannot be candidates anyway
            keep &= ~np.isin(candidates, self.encoded_of.reindex(excluded).dropna().to_numpy(np.int64))
        return {"filtered_ids": candidates[keep]}


class _RankerStage(Stage):
    """Shared by both rankers: loads a DCN SavedModel and builds its input batch for candidate ids.

    The model's feature list comes from the manifest (``<artifact>`` section), so a batch holds
    exactly the inputs the saved model was traced with: user features repeated per candidate, item
    features looked up by encoded item id.
    """

    artifact = ""

    def __init__(self, artifacts):
        super().__init__(artifacts)
        self._tf = _import_tf()
        # The saved graph (serving/fast_inference.py): ~60x less per-request overhead than eager.
        self._predict = ServingFunction(self._tf, self.artifacts / self.artifact)
        self.model_features = list(self.manifest[self.artifact]["features"])
        servable = {name for names in self.features.values() for name in names}
        unservable = [f for f in self.model_features if f not in servable]
        if unservable:
            raise RuntimeError(
                f"{self.artifact} was trained on {unservable}, which are neither user nor item features "
                f"serving can look up ({sorted(servable)})"
            )
        items = pd.read_parquet(self.artifacts / "item_features.parquet")
        size = int(items["item_id"].max()) + 1
        self.catalog_rows = size
        self.item_columns = {}
        for name in self.features["item_categorical"]:
            if name in self.model_features:
                table = np.full(size, OOV_INDEX, dtype=np.int64)
                table[items["item_id"].values] = items[name].values
                self.item_columns[name] = table
        for name in self.features["item_continuous"]:
            if name in self.model_features:
                table = np.zeros(size, dtype=np.float32)
                table[items["item_id"].values] = items[name].values
                self.item_columns[name] = table
        unfed = sorted(set(self._predict.input_names) - set(self.model_features))
        if unfed:
            raise RuntimeError(f"{self.artifact}'s saved signature takes {unfed}, which its manifest does not list")

    def batch(self, inputs, ids: np.ndarray) -> dict:
        """The model's input batch: the request's user features repeated, the candidates' item features."""
        tf = self._tf
        users = user_batch(self.features, inputs["user_categorical"], inputs["user_continuous"], len(ids), tf)
        batch = {n: t for n, t in users.items() if n in self.model_features}
        for name, table in self.item_columns.items():
            batch[name] = tf.constant(table[ids])
        return batch

    def checked_batch(self, inputs, ids: np.ndarray) -> dict:
        """``batch`` after refusing candidate ids outside the catalog."""
        if ids.min() < 0 or ids.max() >= self.catalog_rows:
            raise RequestError("candidate ids hold an item id outside the catalog")
        return self.batch(inputs, ids)

    def predict(self, inputs, ids: np.ndarray) -> dict:
        """The model's outputs (``{head: scores}``) for the candidates ``ids`` of the request's user."""
        return self._predict(self.checked_batch(inputs, ids))


class LightRanker(_RankerStage):
    """Scores every filtered candidate with the small DCN and keeps the best ``light_ranker_k``."""

    name = "light_ranker"
    artifact = "light_ranker"
    inputs = (*USER_FEATURES, Tensor("filtered_ids", "INT64"))
    outputs = (Tensor("light_ids", "INT64"), Tensor("light_scores", "FP32"))

    def __init__(self, artifacts):
        super().__init__(artifacts)
        self.keep = int(self.serving["light_ranker_k"])

    def run(self, inputs):
        from models.heads import head_outputs

        ids = np.asarray(inputs["filtered_ids"], dtype=np.int64).reshape(-1)
        if ids.size == 0:
            return {"light_ids": np.zeros(0, dtype=np.int64), "light_scores": np.zeros(0, dtype=np.float32)}
        target = self.manifest["light_ranker"]["target"]
        scores = head_outputs(self.predict(inputs, ids), [target])[target]
        order = np.argsort(-scores, kind="stable")[: self.keep]
        return {"light_ids": ids[order], "light_scores": scores[order].astype(np.float32)}


class HeavyRanker(_RankerStage):
    """Scores the light ranker's survivors with the multi-task DCN: the weighted sum of its heads.

    An ensemble (the manifest's ``heavy_ranker.members``, ``models/heavy_ranker.py``) is averaged
    per head before the sum; every member takes the same input batch."""

    name = "heavy_ranker"
    artifact = "heavy_ranker"
    inputs = (*USER_FEATURES, Tensor("light_ids", "INT64"))
    outputs = (Tensor("heavy_scores", "FP32"),)

    def __init__(self, artifacts):
        super().__init__(artifacts)
        spec = self.manifest["heavy_ranker"]
        self.weights = {k: float(v) for k, v in spec["weights"].items()}
        self.members = [self._predict] + [
            ServingFunction(self._tf, self.artifacts / name) for name in spec.get("members", [self.artifact])[1:]
        ]

    def run(self, inputs):
        from models.heads import combine, head_outputs

        ids = np.asarray(inputs["light_ids"], dtype=np.int64).reshape(-1)
        if ids.size == 0:
            return {"heavy_scores": np.zeros(0, dtype=np.float32)}
        batch = self.checked_batch(inputs, ids)
        targets = list(self.weights)
        members = [head_outputs(member(batch), targets) for member in self.members]
        heads = {t: np.mean([m[t] for m in members], axis=0) for t in targets}
        return {"heavy_scores": combine(heads, self.weights)}


class Ordering(Stage):
    """Orders the heavy ranker's candidates by final score (``serving/ordering.py``: optionally blended
    with retrieval and with the item-to-item affinity of the user's history, sampled for exploration,
    capped per category), keeps k, maps ids back to raw ids.

    Users the models never saw get the recency-weighted popularity fallback.
    """

    name = "ordering"
    inputs = (
        EXCLUDE,
        Tensor("candidate_ids", "INT64"),
        Tensor("filtered_ids", "INT64"),
        Tensor("light_ids", "INT64"),
        Tensor("heavy_scores", "FP32"),
        Tensor("retrieval_scores", "FP32"),
        SEEN,
        K,
        Tensor("user_known", "BOOL", (1,)),
    )
    outputs = FUNNEL_OUTPUTS

    def __init__(self, artifacts, policy=None, seed: int | None = None):
        super().__init__(artifacts)
        from configs import OrderingConfig

        items = pd.read_parquet(self.artifacts / "item_features.parquet")
        self.raw_ids = np.full(int(items["item_id"].max()) + 1, -1, dtype=np.int64)
        self.raw_ids[items["item_id"].values] = items["item_id_raw"].values
        self.catalog_size = int(len(items))
        self.popularity = pd.read_parquet(self.artifacts / "popularity.parquet")
        self.limits = RequestLimits.from_serving(self.serving)
        self.items = items
        self.affinity = None  # EASE item-item weights (models/item_affinity.py), where exported
        if (self.artifacts / "item_affinity.json").exists():
            from models import item_affinity

            self.affinity, _ = item_affinity.load(self.artifacts, expected_version=self.version)
        # The export's policy; exported before ordering was configurable: the defaults (sorted by
        # the heavy-ranker score).
        self._configure(policy or OrderingConfig(**self.serving.get("ordering", {})), seed)

    def with_policy(self, policy, seed: int | None = None) -> Ordering:
        """This stage ordering by ``policy`` (``configs.OrderingConfig``) instead: a copy sharing the
        loaded tables, the served stage unchanged. ``seed`` makes exploration repeatable (served
        requests get a fresh draw each)."""
        other = copy.copy(self)
        other._configure(policy, seed)
        return other

    def _configure(self, policy, seed: int | None) -> None:
        if policy.affinity_weight > 0 and self.affinity is None:
            raise RuntimeError(
                "serving.ordering.affinity_weight > 0, but this export has no item affinity "
                "weights (the catalog was above item_affinity.max_items when it was trained)"
            )
        categories = None
        if policy.max_per_category > 0:
            column = policy.category_column
            if column not in self.items.columns:
                raise RuntimeError(
                    f"serving.ordering.category_column {column!r} is not an item feature ({sorted(self.items.columns)})"
                )
            categories = np.full(len(self.raw_ids), -1, dtype=np.int64)
            categories[self.items["item_id"].values] = self.items[column].values
        self.policy, self.categories = policy, categories
        self.rng = np.random.default_rng(seed)

    def retrieval_percentile(self, inputs, ids: np.ndarray) -> np.ndarray:
        """Where retrieval placed each of ``ids`` among the candidates it returned (0 if it did not)."""
        from serving.ordering import percentile_among

        candidates = np.asarray(inputs["candidate_ids"], dtype=np.int64).reshape(-1)
        scores = np.asarray(inputs["retrieval_scores"], dtype=np.float32).reshape(-1)
        if len(candidates) != len(scores):
            raise RequestError(f"got {len(scores)} retrieval_scores for {len(candidates)} candidate_ids")
        if len(candidates) == 0:
            return np.zeros(len(ids))
        by_id = np.argsort(candidates)
        sorted_ids, sorted_scores = candidates[by_id], scores[by_id]
        at = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
        item_scores = np.where(sorted_ids[at] == ids, sorted_scores[at], -np.inf)
        return percentile_among(item_scores, scores)

    def affinity_percentile(self, inputs, ids: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Where each of ``ids`` falls among ``candidates`` (the heavy ranker's) by the affinity of
        the user's history (``seen_items``) to it: 1 = the strongest of them."""
        from models.item_affinity import scores as affinity_scores
        from serving.ordering import percentile_among

        if inputs.get("seen_items") is None:
            raise RequestError("missing input 'seen_items' (the item affinity reads the user's history)")
        history = np.asarray(inputs["seen_items"], dtype=np.int64).reshape(-1)
        try:
            reference = affinity_scores(self.affinity, history, candidates)
            item_scores = reference if ids is candidates else affinity_scores(self.affinity, history, ids)
        except ValueError as e:
            raise RequestError(str(e)) from None
        return percentile_among(item_scores, reference)

    def run(self, inputs):
        from models.fallback import top_popular

        k = self.limits.k(inputs)
        known = bool(np.asarray(inputs["user_known"]).reshape(-1)[0])
        candidates = np.asarray(inputs["candidate_ids"]).reshape(-1)
        filtered = np.asarray(inputs["filtered_ids"]).reshape(-1)
        ranked = np.asarray(inputs["light_ids"], dtype=np.int64).reshape(-1)
        scores = np.asarray(inputs["heavy_scores"], dtype=np.float32).reshape(-1)
        if len(ranked) != len(scores):
            raise RequestError(f"got {len(scores)} heavy_scores for {len(ranked)} light_ids")
        if known:
            from serving.ordering import order_candidates

            policy = self.policy
            pct = self.retrieval_percentile(inputs, ranked) if policy.retrieval_weight > 0 else None
            affinity = self.affinity_percentile(inputs, ranked, ranked) if policy.affinity_weight > 0 else None
            order, out_scores = order_candidates(
                scores,
                pct,
                k,
                retrieval_weight=policy.retrieval_weight,
                affinity_pct=affinity,
                affinity_weight=policy.affinity_weight,
                exploration_temperature=policy.exploration_temperature,
                max_per_category=policy.max_per_category,
                categories=None if self.categories is None else self.categories[ranked],
                rng=self.rng,
            )
            item_ids, served_by = self.raw_ids[ranked[order]], "model"
        else:
            excluded = self.limits.excluded(inputs)
            item_ids, out_scores = top_popular(self.popularity, k + excluded.size)
            keep = ~np.isin(item_ids, excluded)
            item_ids, out_scores = np.asarray(item_ids)[keep][:k], np.asarray(out_scores)[keep][:k]
            served_by = "fallback"
        counts = [self.catalog_size, len(candidates), len(filtered), len(ranked), len(item_ids)]
        return {
            "item_ids": np.asarray(item_ids, dtype=np.int64),
            "scores": np.clip(np.asarray(out_scores, dtype=np.float32), 0.0, 1.0),
            "model_version": np.array([str(self.version).encode()], dtype=np.object_),
            "served_by": np.array([served_by.encode()], dtype=np.object_),
            "stage_counts": np.array(counts, dtype=np.int64),
        }


STAGES = {
    cls.name: cls for cls in (FeatureLookup, QueryTower, Retrieval, Filtering, LightRanker, HeavyRanker, Ordering)
}
# The order a request flows through them (the ensemble in triton_repo/funnel/config.pbtxt).
FUNNEL = list(STAGES)
