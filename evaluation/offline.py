"""Offline evaluation: score recommenders on one split with full ranking, slices and bias measures.

``evaluate_scores`` takes dense scores ``[num_users, num_items]``, ``evaluate_scorer`` a peer's
``scores(user_rows)`` (called per chunk of users, so no users x items matrix is ever whole),
``evaluate_top_k`` ranked lists (the funnel as served); all remove training items, compute every
ranking metric at each K with bootstrap intervals, slice them by user attributes, and measure
popularity bias.
``served_top_k`` runs the exported Triton funnel's stage classes in-process, in the ensemble's
order, so the lists evaluated are the lists the server would return.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from evaluation import metrics as m
from evaluation import popularity_bias as pb


@dataclass
class Interactions:
    """A split re-indexed to dense rows (users) and columns (items) shared by every recommender."""

    train: pd.DataFrame
    test: pd.DataFrame
    user_ids: np.ndarray  # raw id of each row
    item_ids: np.ndarray  # raw id of each column
    also_seen: pd.DataFrame | None = None  # e.g. the validation part: excluded from ranking, not trained on

    @classmethod
    def from_split(cls, train: pd.DataFrame, test: pd.DataFrame, also_seen: pd.DataFrame | None = None) -> Interactions:
        user_ids = np.sort(pd.concat([train["user_id"], test["user_id"]]).unique())
        item_ids = np.sort(train["item_id"].unique())  # items never trained on cannot be recommended
        return cls(train, test, user_ids, item_ids, also_seen)

    def rows(self, users) -> np.ndarray:
        return np.searchsorted(self.user_ids, np.asarray(users))

    def cols(self, items) -> np.ndarray:
        return np.searchsorted(self.item_ids, np.asarray(items))

    def _per_user(self, frame: pd.DataFrame) -> list[np.ndarray]:
        # Only the split's users and the trained items have rows and columns: ``searchsorted`` would
        # put an unknown id (a user only in ``also_seen``) on its neighbour's row.
        frame = frame[frame["item_id"].isin(self.item_ids) & frame["user_id"].isin(self.user_ids)]
        rows, cols = self.rows(frame["user_id"]), self.cols(frame["item_id"])
        out = [np.zeros(0, dtype=np.int64)] * len(self.user_ids)
        for r, group in pd.Series(cols).groupby(rows):
            out[r] = np.unique(group.to_numpy())
        return out

    @cached_property
    def seen(self) -> list[np.ndarray]:
        """Items each user may not be recommended: training items (plus ``also_seen``, as RecBole
        excludes train and validation items when it ranks for the test part)."""
        history = self.train if self.also_seen is None else pd.concat([self.train, self.also_seen])
        return self._per_user(history)

    @cached_property
    def relevant(self) -> list[set]:
        """Held-out items of each user, minus those seen in training (full ranking never shows them);
        as columns, so only items the training part holds (``relevant_counts`` counts the others)."""
        return [set(t.tolist()) - set(s.tolist()) for t, s in zip(self._per_user(self.test), self.seen)]

    @cached_property
    def relevant_counts(self) -> np.ndarray:
        """Each user's number of held-out items not seen before, including items the training part
        never saw: no model can recommend those, but they count in recall's and NDCG's denominators,
        as RecBole counts them (its vocabulary holds every item of the dataset)."""
        history = self.train if self.also_seen is None else pd.concat([self.train, self.also_seen])
        test = self.test[["user_id", "item_id"]].drop_duplicates()
        test = test[test["user_id"].isin(self.user_ids)]
        before = test.merge(
            history[["user_id", "item_id"]].drop_duplicates(), on=["user_id", "item_id"], how="left", indicator=True
        )
        new = before[before["_merge"] == "left_only"]
        return new.groupby("user_id").size().reindex(self.user_ids, fill_value=0).to_numpy().astype(np.int64)

    @cached_property
    def in_training(self) -> np.ndarray:
        """Whether each user has a training row: a peer (``evaluation/peers.py``) scores a user without
        one from nothing (EASE: every item 0; ALS: its initial factors; Pop: the same list for all), so
        EASE and ALS serve such a user the popularity list (``evaluate_scorer``'s ``cold_user_scores``)."""
        return np.isin(self.user_ids, self.train["user_id"].unique())

    def setup_counts(self) -> dict[str, int]:
        """The report's counts of who and what is evaluated: users with a held-out item (every
        recommender's figures average over them), those of them without a training row (the funnel
        serves its fallback, the peers the popularity list), and held-out positives of items the
        training part never saw (in every denominator; no list can hold them)."""
        evaluated = self.relevant_counts > 0
        return {
            "users evaluated": int(evaluated.sum()),
            "users evaluated without a training row": int((evaluated & ~self.in_training).sum()),
            "held-out positives": int(self.relevant_counts.sum()),
            "held-out positives of items the training part never saw": int(
                self.relevant_counts.sum() - sum(len(r) for r in self.relevant)
            ),
        }

    def matrix(self):
        from evaluation.peers import interaction_matrix

        return interaction_matrix(
            self.rows(self.train["user_id"]), self.cols(self.train["item_id"]), len(self.user_ids), len(self.item_ids)
        )

    def item_popularity(self) -> np.ndarray:
        counts = self.train.groupby("item_id")["user_id"].nunique()
        return counts.reindex(self.item_ids, fill_value=0).to_numpy()


@dataclass
class Result:
    name: str
    metrics: dict[str, float]  # e.g. "ndcg@10" -> value, "ndcg@10_low"/"_high" -> interval
    slices: pd.DataFrame = field(default_factory=pd.DataFrame)
    bias: dict = field(default_factory=dict)
    # figure -> why this protocol cannot support it (the report prints "not applicable" and the reason)
    not_applicable: dict[str, str] = field(default_factory=dict)
    # metric -> one value per evaluated user, in the same user order for every recommender of a split
    # (the report's paired intervals of the difference between two recommenders)
    per_user: dict[str, np.ndarray] = field(default_factory=dict)


def evaluate_top_k(
    name: str,
    top: np.ndarray,
    data: Interactions,
    ks=(10, 20),
    user_attributes: pd.DataFrame | None = None,
    liked_scores: list | None = None,
    n_bootstrap: int = 500,
) -> Result:
    """Metrics of ranked column indices ``top`` ``[num_users, max(ks)]`` against the test split.
    ``liked_scores``: each user's held-out columns and their scores (``[(cols, scores)]``), for the
    preference-aware parity; without them it is not measured."""
    relevant, counts = data.relevant, data.relevant_counts
    if not any(len(r) for r in relevant):
        raise ValueError("no user has a relevant item the training part holds: there is nothing to measure")
    has_test = counts > 0
    values = {}
    per_user = {}
    for k in ks:
        for metric, fn in m.RANKING_METRICS.items():
            pu = fn(top, relevant, k=k, per_user=True, num_relevant=counts)
            mean, low, high = m.bootstrap_ci(pu, n_resamples=n_bootstrap)
            values[f"{metric}@{k}"], values[f"{metric}@{k}_low"], values[f"{metric}@{k}_high"] = mean, low, high
            per_user[f"{metric}@{k}"] = pu
    result = Result(name, values, per_user={key: np.asarray(v) for key, v in per_user.items()})
    if user_attributes is not None:
        frame = pd.DataFrame(per_user)
        attrs = user_attributes.set_index("user_id").reindex(data.user_ids[has_test]).reset_index(drop=True)
        result.slices = slice_table(frame, attrs)
        groups = result.slices.groupby("attribute")["value"].nunique() if len(result.slices) else pd.Series()
        for attr in groups[groups < 2].index:
            result.not_applicable[f"slice gap by {attr}"] = "every evaluated user is in one group"
    k = max(ks)
    popularity = data.item_popularity()
    top_k = top[:, :k]

    def measure(key: str, fn) -> None:
        """``bias[key] = fn()``, or None with the reason when the protocol cannot support it."""
        try:
            result.bias[key] = fn()
        except m.NotApplicable as reason:
            result.bias[key] = None
            result.not_applicable[key] = str(reason)

    measure("item_share_curve", lambda: pb.item_share_curve(top_k))
    measure("gini", lambda: pb.gini(top_k, len(data.item_ids)))
    measure("coverage", lambda: pb.catalog_coverage(top_k, len(data.item_ids)))
    measure("popularity_lift", lambda: _nanmean(pb.popularity_lift(top_k, data.seen, popularity)))
    if liked_scores is not None:
        popular = popularity >= np.quantile(popularity, 0.8)
        measure("preference_parity", lambda: pb.preference_parity_of_liked(liked_scores, popular))
        parity = result.bias.pop("preference_parity")
        result.bias["preference_parity"], result.bias["preference_parity_users"] = parity or (None, 0)
    return result


def _nanmean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).any():
        raise m.NotApplicable("no user has both a training profile and a recommendation")
    return float(np.nanmean(values[np.isfinite(values)]))


def evaluate_scores(name: str, scores: np.ndarray, data: Interactions, ks=(10, 20), **kwargs) -> Result:
    return evaluate_scorer(name, lambda rows: scores[rows], data, ks, **kwargs)


# Users scored at once by ``evaluate_scorer``: a chunk's scores stay near 256 MB (float64) however
# large the catalog; one users x items matrix took 80 GB at 200,000 users and 50,000 items.
CHUNK_CELLS = 1 << 25


def evaluate_scorer(name: str, score_rows, data: Interactions, ks=(10, 20), cold_user_scores=None, **kwargs) -> Result:
    """``evaluate_scores`` for a scorer ``score_rows(user_rows) -> [len(user_rows), num_items]``,
    called per chunk of users: each chunk's top lists and its users' held-out items' scores are kept,
    the rest of its scores dropped. The preference parity counts users with a training row only
    (``Interactions.in_training``).

    ``cold_user_scores`` (for a scorer that ranks from the user's own history: EASE, ALS): the scorer of
    users without a training row, the popularity list, as the funnel's fallback serves them. Their own
    scores carry no preference (EASE: every item 0; ALS: an untrained factor), so their list was the
    lowest item columns (the tie rule) or noise, and its chance hits counted."""
    num_users, num_items = len(data.user_ids), len(data.item_ids)
    chunk = max(1, CHUNK_CELLS // max(num_items, 1))
    tops, liked_scores, relevant, seen, in_training = [], [], data.relevant, data.seen, data.in_training
    for start in range(0, num_users, chunk):
        rows = np.arange(start, min(start + chunk, num_users))
        scores = np.asarray(score_rows(rows))
        cold = ~in_training[rows]
        if cold_user_scores is not None and cold.any():
            scores = scores.copy()
            scores[cold] = np.asarray(cold_user_scores(rows[cold]))
        try:
            tops.append(m.full_ranking_top_k(scores, max(ks), exclude=[seen[u] for u in rows]))
        except ValueError as error:  # NaN scores: say whose, and rows from the first user, not the chunk's
            raise ValueError(f"{name}, users from row {start}: {error}") from error
        for i, u in enumerate(rows):
            cols = np.array(sorted(relevant[u]), dtype=np.int64)
            # A user without a training row is left out of the parity (-inf: unscorable), as the funnel
            # leaves out the users it does not know: EASE scored every item of theirs 0, a tie on each pair.
            liked = scores[i, cols] if in_training[u] else np.full(len(cols), -np.inf)
            liked_scores.append((cols, liked))
    top = np.concatenate(tops) if tops else np.zeros((0, min(max(ks), num_items)), dtype=np.int64)
    return evaluate_top_k(name, top, data, ks, liked_scores=liked_scores, **kwargs)


# A numeric attribute with more distinct values than this (an age, a lifetime value) is sliced by its
# quartiles: one group per value would be groups of one user each, and a best-worst gap of 0 to 1.
MAX_VALUE_GROUPS = 10


def attribute_groups(values: pd.Series) -> np.ndarray:
    """Each user's group of one attribute: its value as text, or for a numeric attribute with many
    values its quartile (``Q1: 3.2 to 10``, ends included from the second on)."""
    numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
    if not numeric or values.nunique() <= MAX_VALUE_GROUPS:
        return values.astype(str).values
    bins = pd.qcut(values, 4, duplicates="drop")
    labels = {iv: f"Q{i + 1}: {iv.left:.4g} to {iv.right:.4g}" for i, iv in enumerate(bins.cat.categories)}
    return bins.map(labels).astype(object).where(bins.notna(), "nan").astype(str).values


def slice_table(per_user: pd.DataFrame, attributes: pd.DataFrame) -> pd.DataFrame:
    """Mean of each metric by each attribute value (numeric attributes with many values: by
    quartile, ``attribute_groups``), with the best-worst gap per attribute."""
    rows = []
    for attr in attributes.columns:
        grouped = per_user.groupby(attribute_groups(attributes[attr]))
        means, counts = grouped.mean(), grouped.size()
        for value, row in means.iterrows():
            rows.append({"attribute": attr, "value": value, "users": int(counts[value]), **row.to_dict()})
    return pd.DataFrame(rows)


def slice_gaps(slices: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Best and worst slice of ``metric`` per attribute: the gap the report calls out. An attribute
    with one group has no gap and is left out (``Result.not_applicable`` says so)."""
    out = []
    for attr, group in slices.groupby("attribute") if len(slices) else ():
        if group["value"].nunique() < 2:
            continue
        best, worst = group.loc[group[metric].idxmax()], group.loc[group[metric].idxmin()]
        out.append(
            {
                "attribute": attr,
                "best": best["value"],
                "best_value": best[metric],
                "worst": worst["value"],
                "worst_value": worst[metric],
                "gap": best[metric] - worst[metric],
            }
        )
    return pd.DataFrame(out, columns=["attribute", "best", "best_value", "worst", "worst_value", "gap"])


def ensemble_order(repo: str | Path, ensemble: str = "funnel") -> list[str]:
    """Stage names in the order the ensemble's steps list them."""
    text = (Path(repo) / ensemble / "config.pbtxt").read_text()
    return re.findall(r'model_name:\s*"([^"]+)"', text)


def load_funnel(repo: str | Path, version: int, live_store: str | None = None, seed: int = 0) -> list:
    """The exported funnel's stage objects, in the order of the version's own ensemble
    (``funnel_v<version>``; ``funnel`` in a repository without one), or the fused funnel's own where
    the version was exported fused (``serving/fused.py``), their clock at the end of the training
    data (``at_training_end``). Not ``funnel``'s order alone: during a rollout from the seven stage
    models to the fused funnel, ``funnel`` has one step, ``fused_funnel``, while the staged version
    is still served (its ``funnel_v<version>``).

    Live events and takedowns come from the repository's own store (``<repo>-live.sqlite`` beside
    it), or ``live_store``: never from ``$FUNNEL_STORE_URL``. Set where the evaluation or the training
    runs (the serving image, a shell that ingests events), it had the stages read that deployment's
    store, and its takedowns and users' live clicks changed the offline figures.

    An exploring ordering (``serving.ordering.exploration_temperature`` > 0) samples from ``seed``, so
    a replay repeats its figures; served, each request gets a fresh draw."""
    from serving.interface import FUSED, ensemble_name
    from serving.stages import STAGES
    from workflows.live_store import store_beside

    store = live_store or store_beside(repo)
    if (Path(repo) / FUSED / str(version)).is_dir():
        from serving.fused import FusedFunnel

        stages = FusedFunnel(Path(repo) / FUSED / str(version), live_store=store).stages
    else:
        own = ensemble_name(version)
        order = ensemble_order(repo, own if (Path(repo) / own / "config.pbtxt").is_file() else "funnel")
        stages = [
            STAGES[name](Path(repo) / name / str(version), **({"live_store": store} if name in LIVE else {}))
            for name in order
        ]
    return at_training_end([_replayable(stage, seed) for stage in stages])


def close_funnel(stages: list) -> None:
    """Close the stores ``load_funnel``'s stages opened (the online store's and the live store's
    connections): call it when done with them, or the connections stay open until garbage collection.
    Idempotent; an ordering copy from ``with_policy`` shares its original's store, so closing either
    closes both."""
    for stage in stages:
        close = getattr(stage, "close", None)
        if close is not None:
            close()


@contextmanager
def opened_funnel(repo: str | Path, version: int, **kwargs):
    """``load_funnel(repo, version, **kwargs)``'s stages, closed (``close_funnel``) when the block ends."""
    stages = load_funnel(repo, version, **kwargs)
    try:
        yield stages
    finally:
        close_funnel(stages)


def _replayable(stage, seed: int):
    """An exploring ordering stage explores from fresh entropy as loaded (what serving wants): a copy
    drawing from ``seed`` instead, so a replay repeats."""
    policy = getattr(stage, "policy", None)
    if getattr(stage, "name", None) == "ordering" and getattr(policy, "exploration_temperature", 0) > 0:
        return stage.with_policy(policy, seed=seed)
    return stage


# The stages that read the live store (``live_store=``): what users just did, what was taken down.
LIVE = ("feature_lookup", "filtering", "ordering")


def at_training_end(stages: list) -> list:
    """``stages`` with the feature lookup's clock stopped at the end of the training data (its
    ``activity_since``, the manifest's cutoff), where an offline replay's requests stand: the start of
    the held-out period. The windowed activity features are counted back from that clock; at its
    default, the wall clock, a log that ended months before had every window empty, so evaluation and
    the tuning step scored users on features no request at the time would have had, and the tuning
    step's choice depended on the day the training ran."""
    for stage in stages:
        since = getattr(stage, "activity_since", None)
        if getattr(stage, "name", None) == "feature_lookup" and since is not None and np.isfinite(since):
            stage.clock = lambda since=float(since): since
    return stages


def run_funnel(stages: list, user_id: int, k: int) -> dict[str, np.ndarray]:
    """Every tensor the funnel produced for one request (what the ensemble passes between stages)."""
    x = {"user_id": np.array([user_id], dtype=np.int64), "k": np.array([k], dtype=np.int32)}
    for stage in stages:
        x.update(stage.run(x))
    return x


def final_scores(stages: list, outputs: dict, encoded_ids) -> np.ndarray:
    """The final score the ordering stage gives the encoded items ``encoded_ids`` for the request
    whose tensors are ``outputs``, whether or not retrieval and the light ranker would have passed
    them on: the heavy ranker's weighted score, blended with the item's retrieval percentile and its
    item-affinity percentile among the heavy ranker's candidates when ``serving.ordering`` weighs
    them (``serving/ordering.py``; exploration left out)."""
    from serving.ordering import final_scores as blend
    from serving.ordering import percentile_among

    by_name = {s.name: s for s in stages}
    ids = np.asarray(encoded_ids, dtype=np.int64)
    heavy = np.asarray(by_name["heavy_ranker"].run({**outputs, "light_ids": ids})["heavy_scores"], dtype=np.float64)
    ordering = by_name["ordering"]
    policy = ordering.policy
    pct = affinity = None
    if policy.retrieval_weight > 0:
        candidates, candidate_scores = (
            np.asarray(outputs[n]).reshape(-1) for n in ("candidate_ids", "retrieval_scores")
        )
        item_scores = _item_vectors(by_name["retrieval"].index).scores(outputs["query_embedding"], ids)
        # Retrieved items keep the very score search returned (recomputing it can differ in the last bit).
        returned = dict(zip(candidates.tolist(), candidate_scores.tolist()))
        item_scores = np.array([returned.get(i, s) for i, s in zip(ids.tolist(), item_scores.tolist())])
        pct = percentile_among(item_scores, candidate_scores)
    if policy.affinity_weight > 0:
        affinity = ordering.affinity_percentile(outputs, ids, np.asarray(outputs["light_ids"], dtype=np.int64))
    return np.asarray(blend(heavy, pct, policy.retrieval_weight, affinity, policy.affinity_weight), dtype=np.float64)


@lru_cache(maxsize=8)
def _item_vectors(index):
    """The index's vectors by id, built once per loaded index (``final_scores`` runs per user)."""
    from models.item_index import ItemVectors

    return ItemVectors(index)


def served_top_k(repo: str | Path, version: int, user_ids, k: int) -> list[np.ndarray]:
    """Raw item ids the exported funnel returns for each user (stage classes run in-process)."""
    with opened_funnel(repo, version) as stages:
        return [np.asarray(run_funnel(stages, user, k)["item_ids"]) for user in user_ids]


def columns_from_raw(lists: list[np.ndarray], data: Interactions, k: int) -> np.ndarray:
    """Raw item-id lists -> ``[num_users, k]`` column indices, -1 where shorter or unknown."""
    top = np.full((len(lists), k), -1, dtype=np.int64)
    for row, items in enumerate(lists):
        items = np.asarray(items)[:k]
        cols = data.cols(items)
        known = (cols < len(data.item_ids)) & (data.item_ids[np.minimum(cols, len(data.item_ids) - 1)] == items)
        top[row, : len(items)] = np.where(known, cols, -1)
    return top
