"""The funnel's stages as plain Python classes: Triton's thin ``model.py`` files wrap them.

Each stage is built from its artifact folder (a Triton model version folder holding the stage's
artifacts and the run's ``manifest.json``) and maps a dict of numpy arrays to a dict of numpy
arrays. Each class declares its tensors (``inputs``, ``outputs``; ``serving/interface.py``), which
``tests/test_interface.py`` holds ``triton_repo/<stage>/config.pbtxt`` to. Tests use these classes directly,
without a server.

    feature_lookup  user_id            -> user_categorical, user_continuous, user_known, seen_items
    query_tower     user features      -> query_embedding
    retrieval       query_embedding    -> candidate_ids (encoded), retrieval_scores
    filtering       candidates, seen, excluded -> filtered_ids (exclude_item_ids: optional request context;
                    takedowns from the live store)
    light_ranker    user features, ids -> light_ids (the best ``light_ranker_k``), light_scores in [0, 1]
    heavy_ranker    user features, ids -> heavy_scores in [0, 1] (weighted sum of the signal heads)
    ordering        scores, seen, k, known -> item_ids (raw), scores, model_version, served_by, stage_counts
                    (final score with the optional item-to-item affinity of the user's history,
                    exploration, business rules: ``serving/ordering.py``)

Unknown users still flow through the candidate stages of the ensemble (with out-of-vocabulary
features: the towers' and rankers' full work, unused) and ``ordering`` answers them from their fresh
history or the popularity fallback; an ensemble cannot branch, and this keeps one code path for every
request. The fused funnel (``serving/fused.py``), one process, skips those stages for them. Either
way their ``stage_counts`` count 0 for retrieval, the filters and the light ranker: no candidate of those
stages was served.
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from serving.fast_inference import ServingFunction
from serving.interface import EXCLUDE, FUNNEL_OUTPUTS, MANIFEST, SEEN, USER_FEATURES, USER_ID, K, Tensor
from serving.item_aliases import ItemAliases
from serving.request import RequestError, RequestLimits, scalar
from workflows.local_parquet import read_parquet

OOV_INDEX = 2  # NVTabular Categorify: 0 padding, 1 null, 2 out-of-vocabulary


def load_manifest(artifacts: str | Path) -> dict:
    return json.loads((Path(artifacts) / MANIFEST).read_text())


def live_store_of(artifacts: str | Path) -> str | None:
    """The live store (``workflows/live_store.py``) of the repository ``<repo>/<stage>/<version>``
    holding ``artifacts``: ``$FUNNEL_STORE_URL``, else ``<repo>-live.sqlite`` beside it; None for a
    folder outside an exported repository (a stage built from a copy: no live events, no takedowns)."""
    from workflows.live_store import STORE_ENV, store_location

    if os.environ.get(STORE_ENV):
        return os.environ[STORE_ENV]
    repository = Path(artifacts).resolve().parent.parent
    return store_location(repository) if (repository / "export.json").exists() else None


def takedown_list(artifacts: str | Path, live_store: str | None, refresh_s: float):
    """The takedowns (``workflows/live_store.py``) a stage in ``artifacts`` reads, re-read every
    ``refresh_s``: from ``live_store``, else the repository's own store (``live_store_of``); None for a
    folder outside an exported repository."""
    location = live_store or live_store_of(artifacts)
    if not location:
        return None
    from workflows.live_store import LiveStore, TakedownList

    return TakedownList(LiveStore(location), refresh_s)


def user_known(inputs: dict) -> bool:
    """The feature lookup's verdict on a request: whether the models saw its user."""
    return bool(np.asarray(inputs["user_known"]).reshape(-1)[0])


def user_vocabulary(manifest: dict) -> np.ndarray:
    """Each categorical user feature's number of encoded ids (the schema's cardinality, in
    ``features["user_categorical"]`` order): a valid id is below it. Unbounded where the schema
    records none."""
    cardinality = {c["name"]: c.get("cardinality") for c in manifest.get("schema", [])}
    return np.array(
        [cardinality.get(n) or np.iinfo(np.int64).max for n in manifest["features"]["user_categorical"]],
        dtype=np.int64,
    )


def checked_user_features(features: dict, vocabulary: np.ndarray, categorical, continuous) -> tuple:
    """One request's user features as flat arrays, after refusing (``RequestError``, so the client
    gets ``INVALID_ARGUMENT``) the wrong count, a categorical id outside its feature's vocabulary (an
    embedding lookup out of range is TensorFlow's ``INTERNAL``) or a continuous value that is not
    finite (it would score every candidate NaN). The feature lookup stage only produces valid ones;
    this guards the stage models when called on their own."""
    categorical = np.asarray(categorical, dtype=np.int64).reshape(-1)
    continuous = np.asarray(continuous, dtype=np.float32).reshape(-1)
    names_cat, names_cont = features["user_categorical"], features["user_continuous"]
    if len(categorical) != len(names_cat) or len(continuous) != len(names_cont):
        raise RequestError(
            f"expected {len(names_cat)} categorical and {len(names_cont)} continuous user features, "
            f"got {len(categorical)} and {len(continuous)}"
        )
    bad = np.flatnonzero((categorical < 0) | (categorical >= vocabulary))
    if bad.size:
        j = int(bad[0])
        raise RequestError(
            f"user feature {names_cat[j]} = {int(categorical[j])} is outside its vocabulary [0, {int(vocabulary[j])})"
        )
    bad = np.flatnonzero(~np.isfinite(continuous))
    if bad.size:
        j = int(bad[0])
        raise RequestError(f"user feature {names_cont[j]} = {float(continuous[j])} is not finite")
    return categorical, continuous


def activity_slots(manifest: dict) -> tuple[list[int], np.ndarray]:
    """The version's activity windows (seconds) and where their features sit in ``user_continuous``
    (empty for a version trained without them)."""
    from configs import duration_seconds
    from workflows.activity import column_names

    windows = manifest["config"].get("workflow", {}).get("features", {}).get("activity_windows", [])
    seconds = [duration_seconds(w) for w in windows]
    names, continuous = column_names(seconds), list(manifest["features"]["user_continuous"])
    if not seconds or not set(names) <= set(continuous):
        return [], np.zeros(0, dtype=np.int64)
    return seconds, np.array([continuous.index(n) for n in names], dtype=np.int64)


def encode_items(raw_sorted: np.ndarray, encoded: np.ndarray, raw_ids: np.ndarray) -> np.ndarray:
    """Encoded ids of the ``raw_ids`` the catalog (``raw_sorted`` -> ``encoded``) holds; others dropped."""
    raw_ids = np.asarray(raw_ids, dtype=np.int64).reshape(-1)
    if raw_sorted.size == 0 or raw_ids.size == 0:
        return np.zeros(0, dtype=np.int64)
    at = np.minimum(np.searchsorted(raw_sorted, raw_ids), raw_sorted.size - 1)
    return encoded[at[raw_sorted[at] == raw_ids]]


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
        self.user_vocabulary = user_vocabulary(self.manifest)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def run_batch(self, batch: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """The outputs of several requests at once: each exactly what ``run`` gives it alone.

        This default runs them one by one; stages with a model call (query tower, retrieval, the
        rankers) override it with one call for the whole batch, which is what Triton's dynamic
        batcher (``serving/triton_model.py``) pays for. A malformed request raises ``RequestError``
        for the whole batch: the adapter then serves the batch one request at a time, so only that
        request fails."""
        return [self.run(inputs) for inputs in batch]

    def close(self) -> None:
        """Close every store or connection this stage opened; a stage that opened none has nothing to
        close. Idempotent. Inside Triton ``StageModel.finalize`` calls it; code that runs stages in its
        own process (offline evaluation, notebooks, benchmarks) calls it when done with them
        (``evaluation.offline.close_funnel``), or their SQLite/PostgreSQL connections stay open until
        garbage collection."""


# TensorFlow's switch for growing its GPU memory on demand instead of mapping the whole device.
TF_GPU_GROWTH_ENV = "TF_FORCE_GPU_ALLOW_GROWTH"


def import_tf():
    """TensorFlow, its threads set for serving (one per op, two between ops) before its first op, and
    its GPU memory (where there is a GPU) grown on demand, so several stage processes share one GPU."""
    import sys

    # Two packages TensorFlow's import loads that a stage never uses: JAX, tried for TFLite's
    # converter (tensorflow/lite/python/util.py), and Keras, loaded eagerly for ``tf.keras`` (both
    # inside try/except ImportError). A stage calls its SavedModel's serving signature through
    # ``tf.saved_model.load`` (serving/fast_inference.py), which needs neither. Marking them absent
    # during the import takes 0.5 s (JAX) and 0.3-0.7 s (Keras) off its 4.3 s of CPU, paid by every
    # TF stub at every server start, rollout and restart. The marks go again afterwards: code that
    # runs the stages in its own process (a notebook, the tests) can still import both; ``tf.keras``
    # is a lazy loader that imports Keras on first use.
    hidden = [] if "tensorflow" in sys.modules else [m for m in ("jax", "keras") if m not in sys.modules]
    # On a GPU, TensorFlow maps almost all of the device's memory in the first process that uses it,
    # and every stage stub is a process of its own (query tower, both rankers, each instance and each
    # version served side by side in a rollout): the first one loaded would leave the others none.
    # Growing on demand, each takes what its model needs. Read when TF first sets up the GPU (after
    # this, in a stub); an operator's own setting ("false") is kept. No effect without a GPU.
    os.environ.setdefault(TF_GPU_GROWTH_ENV, "true")
    for module in hidden:
        sys.modules[module] = None
    try:
        import tensorflow as tf
    finally:
        for module in hidden:
            if module in sys.modules and sys.modules[module] is None:
                del sys.modules[module]

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


def single_threaded_faiss():
    """faiss, its OpenMP threads set to one in this process: a stage searches one query per request,
    so more threads only add spin-wait overhead (measured: HNSW top-300 over 50k vectors 2.6 ms with 2
    threads, 0.34 ms with 1); concurrency comes from requests and stage processes. Retrieval and the
    ordering stage's history query (each in a stub process of its own) search with it."""
    import faiss

    faiss.omp_set_num_threads(1)
    return faiss


class FeatureLookup(Stage):
    """Reads the user's encoded features and history from the online store, and merges in what the
    user did since the export from the live store (``workflows/live_store.py``): ``seen_items`` is
    the export's history plus every live item, so what a user just watched is filtered out, feeds
    the item affinity, and lets a user the models never saw be served from their fresh history. The
    export's history covers the users the active-users filter kept out of training too: the fallback
    serving them skips what they clicked, and their history counts as theirs for the fresh history."""

    name = "feature_lookup"
    inputs = (USER_ID,)
    outputs = (*USER_FEATURES, Tensor("user_known", "BOOL", (1,)), SEEN)

    def __init__(self, artifacts, live_store: str | None = None):
        super().__init__(artifacts)
        from configs import LiveConfig
        from serving.online_store import OnlineStore

        self.store = OnlineStore(
            self.artifacts / "online_store.sqlite",
            self.features["user_categorical"],
            self.features["user_continuous"],
        )
        self.live_config = LiveConfig(**self.serving.get("live", {}))
        self.raw_items, self.encoded_items = self.store.items()
        self.aliases = ItemAliases.load(self.artifacts)  # a live event may name a duplicate's id
        self.activity_windows, self.activity_slots = activity_slots(self.manifest)
        # Live events before the end of the training data are already in the export's recent events.
        self.activity_since = float(self.manifest.get("data_summary", {}).get("cutoff", -np.inf))
        self.clock = time.time  # "now" of the windowed activity features; a test or replay sets its own
        location = live_store or live_store_of(self.artifacts)
        self.live = None
        if location:
            from workflows.live_store import LiveStore

            self.live = LiveStore(location)

    def close(self) -> None:
        """Close the online store and the live store (both idempotent)."""
        self.store.close()
        if self.live is not None:
            self.live.close()

    def live_events(self, user_id: int):
        """The user's newest live events (``workflows.live_store.UserEvents``, raw ids): one indexed query."""
        from workflows.live_store import UserEvents

        if self.live is None:
            return UserEvents(np.zeros(0, np.int64), np.zeros(0), np.zeros(0, object), np.zeros(0))
        return self.live.user_events(user_id, self.live_config.max_live_events)

    def activity_events(self, user_id: int, live=None) -> tuple[np.ndarray, np.ndarray]:
        """``(timestamps, clicks)`` the windowed activity features count for this user: the export's
        recent events plus the live views and clicks after the end of the training data (``live``:
        the user's ``live_events``, read here when not given)."""
        from workflows.activity import live_activity

        times, clicks = self.store.recent_events(user_id)
        live = self.live_events(user_id) if live is None else live
        if len(live):
            keep = live.ts >= self.activity_since
            live_times, live_clicks = live_activity(live.events[keep], live.ts[keep])
            times, clicks = np.concatenate([times, live_times]), np.concatenate([clicks, live_clicks])
        return times, clicks

    def user_activity(self, user_id: int, now: float | None = None, live=None) -> np.ndarray:
        """The encoded windowed activity features (``workflows/activity.py``) of the user at ``now``
        (default ``self.clock()``), in the order of ``activity_slots``: the training rows' definition."""
        from workflows.activity import user_activity

        times, clicks = self.activity_events(user_id, live)
        return user_activity(times, clicks, self.clock() if now is None else now, self.activity_windows)

    def run(self, inputs):
        user_id = scalar(inputs, "user_id", int)
        found = self.store.user_features(user_id)
        recent = self.live_events(user_id)
        live_seen = encode_items(self.raw_items, self.encoded_items, self.aliases.canonical_ids(recent.item_ids))
        if found is None:
            unknown = unknown_user(self.features)
            cat, cont = unknown["user_categorical"], unknown["user_continuous"]
        else:
            cat, cont = found
        # A user the models never saw may still have a history in the store: one the active-users
        # filter dropped from training (fallback_history.parquet), never to be served it back.
        seen = self.store.history(user_id)
        if live_seen.size:
            seen = np.union1d(seen, live_seen)
        if self.activity_slots.size:  # kept current: counted now, not read from the export
            cont = np.array(cont, dtype=np.float32)
            cont[self.activity_slots] = self.user_activity(user_id, live=recent)
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
        self._tf = import_tf()
        # The saved graph (serving/fast_inference.py): ~40x less per-request overhead than eager.
        self._predict = ServingFunction(self._tf, self.artifacts / "query_tower")
        if len(self._predict.output_names) != 1:
            raise RuntimeError(f"the query tower has outputs {self._predict.output_names}, expected one embedding")

    def run(self, inputs):
        batch = user_batch(
            self.features, self.user_vocabulary, inputs["user_categorical"], inputs["user_continuous"], 1, self._tf
        )
        (embedding,) = self._predict(batch).values()
        return {"query_embedding": np.asarray(embedding, dtype=np.float32).reshape(-1)}

    def run_batch(self, batch):
        """One tower call embeds every user of the batch (one row each)."""
        if len(batch) < 2:
            return super().run_batch(batch)
        users = users_batch(self.features, self.user_vocabulary, batch, [1] * len(batch), tf=self._tf)
        (embeddings,) = self._predict(users).values()
        embeddings = np.asarray(embeddings, dtype=np.float32).reshape(len(batch), -1)
        return [{"query_embedding": row} for row in embeddings]


def unknown_user(features: dict) -> dict:
    """Encoded features of a user the models never saw (every categorical out-of-vocabulary)."""
    return {
        "user_categorical": np.full(len(features["user_categorical"]), OOV_INDEX, dtype=np.int64),
        "user_continuous": np.zeros(len(features["user_continuous"]), dtype=np.float32),
    }


def users_batch(features: dict, vocabulary: np.ndarray, requests: list[dict], rows: list[int], tf) -> dict:
    """A Merlin model input dict holding each request's user features repeated ``rows[i]`` times, in
    request order: the rows of ``user_batch`` for each request, concatenated."""
    names_cat, names_cont = features["user_categorical"], features["user_continuous"]
    categorical, continuous = [], []
    for inputs in requests:
        cat, cont = checked_user_features(features, vocabulary, inputs["user_categorical"], inputs["user_continuous"])
        categorical.append(cat)
        continuous.append(cont)
    rows = np.asarray(rows, dtype=np.int64)
    categorical = np.repeat(np.stack(categorical), rows, axis=0)
    continuous = np.repeat(np.stack(continuous), rows, axis=0)
    batch = {n: tf.constant(np.ascontiguousarray(categorical[:, j])) for j, n in enumerate(names_cat)}
    batch.update({n: tf.constant(np.ascontiguousarray(continuous[:, j])) for j, n in enumerate(names_cont)})
    return batch


def user_batch(
    features: dict, vocabulary: np.ndarray, categorical: np.ndarray, continuous: np.ndarray, rows: int, tf
) -> dict:
    """A Merlin model input dict holding one user's features repeated ``rows`` times."""
    categorical, continuous = checked_user_features(features, vocabulary, categorical, continuous)
    names_cat, names_cont = features["user_categorical"], features["user_continuous"]
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
        # The index's search setting (IVF nprobe / HNSW efSearch) is the one the training run chose
        # for its recall target (models/item_index.py); load_index applies it.
        self._faiss = single_threaded_faiss()
        self.index, self.index_meta = item_index.load_index(self.artifacts, expected_version=self.version)
        self.k = int(self.serving["retrieval_k"])
        # The largest query norm whose inner product with every item stays within float32, with a
        # factor 2 to spare for rounding: faiss sums in float32.
        largest = item_index.max_norm(self.index)
        self.max_query_norm = float(np.finfo(np.float32).max) / 2 / largest if largest > 0 else np.inf

    def checked_query(self, inputs) -> np.ndarray:
        """The request's query embedding, refused (``RequestError``) where faiss could not score it."""
        query = np.asarray(inputs["query_embedding"], dtype=np.float32).reshape(-1)
        if query.shape[0] != self.index_meta["dim"]:
            raise RequestError(f"query_embedding has {query.shape[0]} dims, index has {self.index_meta['dim']}")
        if not np.isfinite(query).all():  # faiss would answer arbitrary items or none
            raise RequestError("query_embedding must be finite")
        # Past float32's range the inner products overflow to inf or NaN, which faiss drops or ranks
        # arbitrarily: a short, wrong list (16 of retrieval_k for a query of 3e38s).
        norm = float(np.linalg.norm(query.astype(np.float64)))
        if norm > self.max_query_norm:
            raise RequestError(
                f"query_embedding has norm {norm:.3g}: its inner products with the items would overflow "
                f"float32 (at most {self.max_query_norm:.3g})"
            )
        return query

    def run(self, inputs):
        query = self.checked_query(inputs)
        ids, scores = self._search(self.index, query, min(self.k, self.index.ntotal))
        return {"candidate_ids": ids.astype(np.int64), "retrieval_scores": scores.astype(np.float32)}

    def run_batch(self, batch):
        """One faiss search for every query of the batch."""
        if len(batch) < 2:
            return super().run_batch(batch)
        try:
            queries = [self.checked_query(inputs) for inputs in batch]
        except RequestError:
            return super().run_batch(batch)  # the malformed one raises its own error
        # Exact search scores several queries with one BLAS matrix product from faiss's
        # distance_compute_blas_threshold (20) queries on; its sums round differently from the
        # per-query path in the last bit, and a batch must score exactly what one request alone gets.
        self._faiss.cvar.distance_compute_blas_threshold = max(
            self._faiss.cvar.distance_compute_blas_threshold, len(batch) + 1
        )
        scores, ids = self.index.search(np.ascontiguousarray(np.stack(queries)), min(self.k, self.index.ntotal))
        keep = ids >= 0
        return [
            {"candidate_ids": i[m].astype(np.int64), "retrieval_scores": s[m].astype(np.float32)}
            for i, s, m in zip(ids, scores, keep)
        ]


class Filtering(Stage):
    """Drops candidates the user has already seen, those the request excludes (its context) and those
    taken down since the export (``workflows/live_store.py``), so the light ranker keeps its
    ``light_ranker_k`` among items that can be served. (The ordering stage drops takedowns again: a
    takedown that reaches it between the two stages' reads, and the paths without the light ranker.)"""

    name = "filtering"
    inputs = (EXCLUDE, Tensor("candidate_ids", "INT64"), SEEN)
    outputs = (Tensor("filtered_ids", "INT64"),)

    def __init__(self, artifacts, live_store: str | None = None):
        super().__init__(artifacts)
        from configs import LiveConfig

        items = read_parquet(self.artifacts / "item_features.parquet", columns=["item_id", "item_id_raw"])
        self.encoded_of = pd.Series(items["item_id"].to_numpy(), index=items["item_id_raw"].to_numpy())
        self.aliases = ItemAliases.load(self.artifacts)  # excluding either copy of an item excludes it
        self.limits = RequestLimits.from_serving(self.serving)
        refresh_s = LiveConfig(**self.serving.get("live", {})).takedown_refresh_s
        self.takedowns = takedown_list(self.artifacts, live_store, refresh_s)
        # (the list as last read, its encoded ids): encoded again only when the list is re-read, not per request
        self._taken = (None, np.zeros(0, np.int64))

    def close(self) -> None:
        """Close the live store the takedowns are read from (idempotent)."""
        if self.takedowns is not None:
            self.takedowns.store.close()

    def encoded(self, raw_ids: np.ndarray) -> np.ndarray:
        """The encoded ids of the raw ids ``raw_ids`` the catalog holds (a duplicate's id as its item's)."""
        raw_ids = self.aliases.canonical_ids(raw_ids)
        return self.encoded_of.reindex(raw_ids).dropna().to_numpy(np.int64) if raw_ids.size else raw_ids

    def taken_down(self) -> np.ndarray:
        """The encoded ids of the items taken down now. ``TakedownList.ids`` returns the same array until
        it re-reads the store, so the encoding (a pandas reindex, ~0.1 ms for 100 ids) runs once per
        read, not in every request."""
        ids = self.takedowns.ids()
        if ids is not self._taken[0]:
            self._taken = (ids, self.encoded(ids))
        return self._taken[1]

    def run(self, inputs):
        candidates = np.asarray(inputs["candidate_ids"], dtype=np.int64).reshape(-1)
        seen = np.asarray(inputs["seen_items"], dtype=np.int64).reshape(-1)
        keep = ~np.isin(candidates, seen)
        # ids the catalog does not hold cannot be candidates anyway
        dropped = self.encoded(self.limits.excluded(inputs))
        if self.takedowns is not None:  # before the light ranker's cut: a taken-down item takes no slot
            dropped = np.concatenate([dropped, self.taken_down()])
        if dropped.size:
            keep &= ~np.isin(candidates, dropped)
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
        self._tf = import_tf()
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
        items = read_parquet(self.artifacts / "item_features.parquet")
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
        users = user_batch(
            self.features, self.user_vocabulary, inputs["user_categorical"], inputs["user_continuous"], len(ids), tf
        )
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

    def requests_batch(self, batch: list[dict], ids: list[np.ndarray]) -> dict:
        """The model's input batch for several requests at once: request ``i``'s user features
        repeated for its candidates ``ids[i]``, the requests' rows one after the other."""
        every = np.concatenate(ids)
        if every.size and (every.min() < 0 or every.max() >= self.catalog_rows):
            raise RequestError("candidate ids hold an item id outside the catalog")
        users = users_batch(self.features, self.user_vocabulary, batch, [len(i) for i in ids], self._tf)
        out = {n: t for n, t in users.items() if n in self.model_features}
        for name, table in self.item_columns.items():
            out[name] = self._tf.constant(table[every])
        return out


def split_rows(values: np.ndarray, ids: list[np.ndarray]) -> list[np.ndarray]:
    """``values`` (one per row of a ``requests_batch``) cut back into one array per request."""
    return np.split(np.asarray(values).reshape(-1), np.cumsum([len(i) for i in ids])[:-1])


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
        return self._keep_best(ids, scores)

    def _keep_best(self, ids: np.ndarray, scores: np.ndarray) -> dict:
        order = np.argsort(-scores, kind="stable")[: self.keep]
        return {"light_ids": ids[order], "light_scores": scores[order].astype(np.float32)}

    def run_batch(self, batch):
        """One model call scores the candidates of every request of the batch."""
        from models.heads import head_outputs

        ids = [np.asarray(inputs["filtered_ids"], dtype=np.int64).reshape(-1) for inputs in batch]
        if len(batch) < 2 or sum(len(i) for i in ids) == 0:
            return super().run_batch(batch)
        target = self.manifest["light_ranker"]["target"]
        scores = head_outputs(self._predict(self.requests_batch(batch, ids)), [target])[target]
        return [self._keep_best(i, s) for i, s in zip(ids, split_rows(scores, ids))]


class HeavyRanker(_RankerStage):
    """Scores the light ranker's survivors with the multi-task DCN: the weighted sum of its heads.

    An ensemble (the manifest's ``heavy_ranker.members``, ``models/heavy_ranker.py``) is averaged
    per head before the sum (weighted by ``member_weights`` where the tuning step chose them; a
    member weighted 0 is not loaded); every member takes the same input batch."""

    name = "heavy_ranker"
    artifact = "heavy_ranker"
    inputs = (*USER_FEATURES, Tensor("light_ids", "INT64"))
    outputs = (Tensor("heavy_scores", "FP32"),)

    def __init__(self, artifacts):
        super().__init__(artifacts)
        from models.heads import served_members

        spec = self.manifest["heavy_ranker"]
        self.weights = {k: float(v) for k, v in spec["weights"].items()}
        served = served_members(spec)  # a member weighted 0 by the tuning step is not loaded
        self.members = [
            self._predict if name == self.artifact else ServingFunction(self._tf, self.artifacts / name)
            for name, _ in served
        ]
        self.member_weights = None if served[0][1] is None else [w for _, w in served]

    def load_members(self, folder) -> list:
        """Every member of this version, also those weighted 0 (which serving does not load), from
        ``folder`` (the version's registry folder): what the tuning step weighs."""
        names = self.manifest["heavy_ranker"].get("members", [self.artifact])
        return [ServingFunction(self._tf, Path(folder) / name) for name in names]

    def member_heads(self, inputs, ids: np.ndarray, members: list) -> list[dict]:
        """Each of ``members``' head scores for the request's candidates ``ids``."""
        if ids.size == 0:
            return [{t: np.zeros(0, dtype=np.float32) for t in self.weights} for _ in members]
        return self._heads(self.checked_batch(inputs, ids), members)

    def _heads(self, batch: dict, members: list) -> list[dict]:
        from models.heads import head_outputs

        return [head_outputs(member(batch), list(self.weights)) for member in members]

    def run(self, inputs):
        ids = np.asarray(inputs["light_ids"], dtype=np.int64).reshape(-1)
        if ids.size == 0:
            return {"heavy_scores": np.zeros(0, dtype=np.float32)}
        return {"heavy_scores": self._scores(self.checked_batch(inputs, ids))}

    def _scores(self, batch: dict) -> np.ndarray:
        from models.heads import combine, ensemble_heads

        return combine(ensemble_heads(self._heads(batch, self.members), self.member_weights), self.weights)

    def run_batch(self, batch):
        """One call of each ensemble member scores the candidates of every request of the batch."""
        ids = [np.asarray(inputs["light_ids"], dtype=np.int64).reshape(-1) for inputs in batch]
        if len(batch) < 2 or sum(len(i) for i in ids) == 0:
            return super().run_batch(batch)
        scores = self._scores(self.requests_batch(batch, ids))
        return [{"heavy_scores": s if len(s) else np.zeros(0, dtype=np.float32)} for s in split_rows(scores, ids)]


class Ordering(Stage):
    """Orders the heavy ranker's candidates by final score (``serving/ordering.py``: optionally blended
    with retrieval and with the item-to-item affinity of the user's history, sampled for exploration,
    capped per category), keeps k, maps ids back to raw ids.

    Users the models never saw get the recency-weighted popularity fallback; a known user whose list
    the filters left shorter than k gets the rest from it (``topped_up``).
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

    def __init__(
        self,
        artifacts,
        policy=None,
        seed: int | None = None,
        live_store: str | None = None,
        retrieval_artifacts: str | Path | None = None,
    ):
        super().__init__(artifacts)
        from configs import LiveConfig, OrderingConfig

        items = read_parquet(self.artifacts / "item_features.parquet")
        self.raw_ids = np.full(int(items["item_id"].max()) + 1, -1, dtype=np.int64)
        self.raw_ids[items["item_id"].values] = items["item_id_raw"].values
        self.catalog_size = int(len(items))
        self.popularity = read_parquet(self.artifacts / "popularity.parquet")
        self.limits = RequestLimits.from_serving(self.serving)
        self.aliases = ItemAliases.load(self.artifacts)  # takedowns and excluded ids may name either copy
        self.items = items
        self.affinity = None  # EASE item-item weights (models/item_affinity.py), where exported
        if (self.artifacts / "item_affinity.json").exists():
            from models import item_affinity

            self.affinity, _ = item_affinity.load(self.artifacts, expected_version=self.version)
        self.live_config = LiveConfig(**self.serving.get("live", {}))
        by_raw = np.argsort(items["item_id_raw"].to_numpy())
        self.raw_sorted = items["item_id_raw"].to_numpy(np.int64)[by_raw]
        self.encoded_sorted = items["item_id"].to_numpy(np.int64)[by_raw]
        self.catalog_ids = np.sort(items["item_id"].to_numpy(np.int64))
        # Takedowns (workflows/live_store.py): re-read every takedown_refresh_s, applied to every path.
        self.takedowns = takedown_list(self.artifacts, live_store, self.live_config.takedown_refresh_s)
        self._item_vectors = None  # the history query's item vectors, loaded on first use
        # The retrieval stage's folder of this version: beside this one unless the caller says where.
        self.retrieval_artifacts = (
            Path(retrieval_artifacts)
            if retrieval_artifacts is not None
            else self.artifacts.parent.parent / "retrieval" / str(self.version)
        )
        # The export's policy; exported before ordering was configurable: the defaults (sorted by
        # the heavy-ranker score).
        self._configure(policy or OrderingConfig(**self.serving.get("ordering", {})), seed)

    def with_policy(self, policy, seed: int | None = None) -> Ordering:
        """This stage ordering by ``policy`` (``configs.OrderingConfig``) instead: a copy sharing the
        loaded tables, the served stage unchanged. ``seed`` makes exploration repeatable (served
        requests get a fresh draw each). The copy shares the live store too: closing either closes it."""
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

    def capped(self, raw_ids: np.ndarray, k: int) -> np.ndarray:
        """Positions of the first ``k`` of a best-first list of raw item ids under the policy's
        ``max_per_category``, so every list the stage serves keeps the business rule (an id outside
        the catalog counts as category -1); the first ``k`` positions without a cap."""
        raw_ids = np.asarray(raw_ids, dtype=np.int64).reshape(-1)
        if self.categories is None or raw_ids.size == 0:
            return np.arange(min(k, raw_ids.size))
        from serving.ordering import cap_per_category

        at = np.minimum(np.searchsorted(self.raw_sorted, raw_ids), self.raw_sorted.size - 1)
        categories = np.where(self.raw_sorted[at] == raw_ids, self.categories[self.encoded_sorted[at]], -1)
        # No list holds more than the cap times the categories: stop there, not at the end of the list.
        fits = self.policy.max_per_category * len(np.unique(categories))
        return cap_per_category(np.arange(raw_ids.size), categories, self.policy.max_per_category, min(k, fits))

    def retrieval_percentile(self, inputs, ids: np.ndarray) -> np.ndarray:
        """Where retrieval placed each of ``ids`` among the candidates it returned (0 if it did not)."""
        from serving.ordering import percentile_among

        candidates = np.asarray(inputs["candidate_ids"], dtype=np.int64).reshape(-1)
        scores = np.asarray(inputs["retrieval_scores"], dtype=np.float32).reshape(-1)
        if len(candidates) != len(scores):
            raise RequestError(f"got {len(scores)} retrieval_scores for {len(candidates)} candidate_ids")
        if not np.isfinite(scores).all():  # a NaN sorts last: every candidate's percentile would shift, silently
            raise RequestError("retrieval_scores must be finite")
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

    def close(self) -> None:
        """Close the live store the takedowns are read from (idempotent; shared with ``with_policy`` copies)."""
        if self.takedowns is not None:
            self.takedowns.store.close()

    def taken_down(self) -> np.ndarray:
        """Raw ids of the items taken down now (``workflows/live_store.py``; none without a store), a
        duplicate's id read as its canonical item's."""
        if self.takedowns is None:
            return np.zeros(0, np.int64)
        return self.aliases.canonical_ids(self.takedowns.ids())

    def fresh_history_ready(self, seen: np.ndarray) -> bool:
        """Whether a user the models never saw has enough history for personal recommendations: live
        events, plus the export's history of a user the active-users filter kept out of training;
        ``fresh_history_min_items`` distinct catalog items (an id in a hole of the encoding, which a
        direct call could pass, tells the models nothing)."""
        in_catalog = np.unique(seen[self.raw_ids[seen] >= 0])
        return len(in_catalog) >= self.live_config.fresh_history_min_items and (
            self.affinity is not None or self.item_vectors() is not None
        )

    def item_vectors(self):
        """The retrieval index's vectors (``models.item_index.ItemVectors``) of this version, for the
        history query where the catalog has no item affinity; None outside an exported repository."""
        if self._item_vectors is None:
            folder = self.retrieval_artifacts
            if not (folder / "item_index.json").exists():
                self._item_vectors = False
            else:
                from models.item_index import ItemVectors, load_index

                single_threaded_faiss()  # this stub's first faiss search is the history query's
                index, _ = load_index(folder, expected_version=self.version)
                self._item_vectors = (index, ItemVectors(index))
        return self._item_vectors or None

    def from_fresh_history(
        self, seen: np.ndarray, k: int, drop_raw: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, str] | None:
        """The best ``k`` raw ids for a history ``seen`` (encoded ids) of a user the models never saw,
        skipping ``seen`` and the raw ids ``drop_raw``: by the item affinity to the history over the
        whole catalog (``fresh_history``), or, without affinity weights, by the inner product with
        the mean of the history's item vectors among retrieval's candidates (``history_query``).
        None where the index holds none of the history's items (no query to ask with)."""
        if self.affinity is not None:
            from models.item_affinity import scores as affinity_scores

            candidates = self.catalog_ids
            scores = affinity_scores(self.affinity, seen, candidates)
            served_by = "fresh_history"
        else:
            from models.item_index import search

            index, vectors = self.item_vectors()
            history = vectors.vectors(seen)
            if not len(history):  # the mean of no vectors is NaN, and faiss answers it with nothing
                return None
            query = history.mean(axis=0).astype(np.float32)
            want = min(int(self.serving["retrieval_k"]) + len(seen) + len(drop_raw), index.ntotal)
            candidates, scores = search(index, query, want)
            served_by = "history_query"
        keep = ~np.isin(candidates, seen) & ~np.isin(self.raw_ids[candidates], drop_raw)
        candidates, scores = candidates[keep], np.asarray(scores, dtype=np.float64)[keep]
        order = np.argsort(-scores, kind="stable")
        order = order[self.capped(self.raw_ids[candidates[order]], k)]
        # Served scores in [0, 1]: the rank among the candidates (raw affinities are unbounded).
        out_scores = 1.0 - np.arange(len(order)) / max(len(candidates), 1)
        return self.raw_ids[candidates[order]], out_scores, served_by

    def topped_up(self, inputs, item_ids, scores, k: int, taken: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
        """A list of fewer than ``k`` items (a known user's, or a new user's fresh history's) filled
        from the popularity fallback: the most popular items not in the user's history, the request's
        ``exclude_item_ids``, the takedowns or the list already, under the category cap, scored below
        the list's last item. An empty list filled so is the fallback's answer (``served_by``), with
        the fallback's popularity scores, as an unknown user is served; a catalog with no such item
        left stays short."""
        from models.fallback import top_popular

        seen = inputs.get("seen_items")
        seen = np.zeros(0, np.int64) if seen is None else np.asarray(seen, dtype=np.int64).reshape(-1)
        seen = seen[(seen >= 0) & (seen < len(self.raw_ids))]
        excluded = self.aliases.canonical_ids(self.limits.excluded(inputs))
        drop = np.concatenate([np.asarray(item_ids, dtype=np.int64), self.raw_ids[seen], excluded, taken])
        popular, popular_scores = top_popular(self.popularity, len(self.popularity), exclude=drop)
        combined = np.concatenate([np.asarray(item_ids, dtype=np.int64), np.asarray(popular, dtype=np.int64)])
        order = self.capped(combined, k)
        if len(item_ids):  # the model's items keep their scores; the filled ones go below the last, best first
            last, n = float(scores[-1]), len(popular)
            filled = last * (1.0 - np.arange(1, n + 1) / (n + 1))
        else:
            # The whole list is the fallback's: its own popularity scores, as an unknown user gets them
            # (before 2026-12-07 a rank score, 1 - i / (n + 1): ~0.99 where the unknown user got ~0.4).
            filled = np.asarray(popular_scores, dtype=np.float64)
        combined_scores = np.concatenate([np.asarray(scores, dtype=np.float64).reshape(-1), filled])
        return combined[order], combined_scores[order], "model" if len(item_ids) else "fallback"

    def run(self, inputs):
        from models.fallback import top_popular

        k = self.limits.k(inputs)
        known = user_known(inputs)
        candidates = np.asarray(inputs["candidate_ids"]).reshape(-1)
        filtered = np.asarray(inputs["filtered_ids"]).reshape(-1)
        ranked = np.asarray(inputs["light_ids"], dtype=np.int64).reshape(-1)
        scores = np.asarray(inputs["heavy_scores"], dtype=np.float32).reshape(-1)
        if len(ranked) != len(scores):
            raise RequestError(f"got {len(scores)} heavy_scores for {len(ranked)} light_ids")
        taken = self.taken_down()
        seen = inputs.get("seen_items")
        if known:
            from serving.ordering import order_candidates

            # The ensemble passes the light ranker's ids; a direct call could pass anything, and a
            # negative id would index from the end of the tables: another film, silently.
            outside = (ranked < 0) | (ranked >= len(self.raw_ids))
            if outside.any() or (self.raw_ids[ranked] < 0).any():
                raise RequestError("light_ids hold an item id outside the catalog")
            if not np.isfinite(scores).all():
                raise RequestError("heavy_scores must be finite")
            if taken.size:  # taken down since the export: never served, whatever the model thinks
                keep = ~np.isin(ranked, encode_items(self.raw_sorted, self.encoded_sorted, taken))
                ranked, scores = ranked[keep], scores[keep]
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
            if len(item_ids) < k:  # filters, exclusions or takedowns left fewer than k candidates
                item_ids, out_scores, served_by = self.topped_up(inputs, item_ids, out_scores, k, taken)
        else:
            seen = np.zeros(0, np.int64) if seen is None else np.asarray(seen, dtype=np.int64).reshape(-1)
            if seen.size and (seen.min() < 0 or seen.max() >= len(self.raw_ids)):
                raise RequestError("seen_items hold an item id outside the catalog")
            excluded = self.aliases.canonical_ids(self.limits.excluded(inputs))
            drop = np.concatenate([excluded, taken])
            fresh = self.from_fresh_history(seen, k, drop) if self.fresh_history_ready(seen) else None
            if fresh is not None:
                item_ids, out_scores, served_by = fresh
                # The history query reads retrieval_k neighbours, which may be fewer than k (or than a
                # category cap needs): the rest from the fallback, as for a known user's short list.
                if len(item_ids) < k:
                    item_ids, out_scores, filled = self.topped_up(inputs, item_ids, out_scores, k, taken)
                    served_by = served_by if filled == "model" else filled
            else:  # popularity, without what the user just did (live events) or may not see
                drop = np.concatenate([drop, self.raw_ids[seen]])
                pool = k  # the k most popular left; under a category cap, more until k fit the rule
                while True:
                    item_ids, out_scores = top_popular(self.popularity, pool + drop.size)
                    keep = ~np.isin(item_ids, drop)
                    item_ids, out_scores = np.asarray(item_ids)[keep], np.asarray(out_scores)[keep]
                    order = self.capped(item_ids, k)
                    if len(order) == k or pool + drop.size >= len(self.popularity):
                        break
                    pool *= 4
                item_ids, out_scores = item_ids[order], out_scores[order]
                served_by = "fallback"
        # What produced the served list: a user the models never saw is served from their history or
        # the popularity fallback, never from the candidate stages' lists (computed on out-of-vocabulary
        # features, unused), so those stages count 0 for them.
        # (Before 2026-12-07 the counts were the unused lists', e.g. 588 -> 300 -> 300 -> 200 -> 10.)
        if known:
            counts = [self.catalog_size, len(candidates), len(filtered), len(ranked), len(item_ids)]
        else:
            counts = [self.catalog_size, 0, 0, 0, len(item_ids)]
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
