"""The tuning step's scorer: the served funnel on the validation part, one grid of ordering choices.

``train_all(..., tune=validation_tuner(processed))`` (``models/train.py``) calls ``tune`` once every
stage of the new version is saved. It exports that version to a temporary repository, runs the
exported stages in-process (``evaluation/offline.py``, the served path) for each validation user
the models know, and keeps what the ordering stage sees: the heavy ranker's candidates and scores,
each candidate's retrieval percentile and item-affinity percentile. Every trial of
``models.tuning.grid`` then only re-blends and re-sorts those (``serving/ordering.py``), so a grid of
20 blends costs one pass of the funnel plus a few milliseconds per trial; an item-affinity penalty
(``tuning.reg_weight``, ``tuning.affinity_dropout``) refits the EASE weights (one solve) and
re-scores the same candidates; the heavy ranker's member weights (``tuning.member_weights``) have
each ensemble member score the same candidates once and re-average its heads per trial
(``models.heads.ensemble_heads``, as served).

What it reads: the processed dataset's ``valid/`` part (the light ranker's target, clicks by
default, gives the positives; items the user already had in training are not: the funnel filters
them) and the version's own artifacts. Never
the test part: ``ProcessedData.test`` and ``test/`` are not touched (``tests/test_tuning.py``); nor a
deployment's live store (``$FUNNEL_STORE_URL`` is set aside while the funnel runs), nor the wall clock
(``offline.load_funnel`` counts the windowed activity features at the end of the training data).

``train_tuned`` adds the knobs that need retraining (``tuning.logq_strength``,
``tuning.sampled_negatives``): one candidate generator per combination, the rankers trained once
and reused, each scored by its best blend on the same validation users; the winner is trained once
more into the registry, its manifest recording both searches.
"""

from __future__ import annotations

import glob
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from merlin.core.dispatch import concat

from configs import Config
from evaluation import offline
from evaluation.metrics import ndcg_at_k
from models import item_affinity, tuning
from models.columns import to_host
from models.registry import ModelVersion
from workflows.local_parquet import read_parquet_dispatched as read_parquet  # cudf on a GPU machine, else pandas

log = logging.getLogger(__name__)


RETRIEVAL, AFFINITY, REG, DROPOUT, MEMBERS = (key for key, _ in tuning.KNOBS)


def validation_tuner(processed):
    """The ``tune`` callable ``train_all`` takes, scoring on ``processed``'s validation part."""

    def tune(version_dir: Path, config: Config) -> dict:
        return tune_on_validation(version_dir, processed, config)

    return tune


def validation_positives(processed, model_dir: Path, signal: str = "click") -> dict[int, set]:
    """Raw user id -> raw item ids with a positive ``signal`` (the light ranker's target: clicks by
    default) in the validation part, minus the items the user already had in training (the funnel
    never serves those)."""
    files = sorted(glob.glob(str(Path(processed.valid_dir) / "*.parquet")))
    valid = concat([read_parquet(f, columns=["user_id", "item_id", signal]) for f in files])
    valid = valid[valid[signal] > 0][["user_id", "item_id"]]
    users = read_parquet(model_dir / "user_features.parquet", columns=["user_id", "user_id_raw"])
    items = read_parquet(model_dir / "item_features.parquet", columns=["item_id", "item_id_raw"])
    # Inner joins: users/items the models never saw (out-of-vocabulary ids) cannot be tuned for.
    raw = valid.merge(users, on="user_id").merge(items, on="item_id")[["user_id_raw", "item_id_raw"]]
    raw = raw.astype("int64").drop_duplicates()
    key = ["user_id_raw", "item_id_raw"]
    history = read_parquet(model_dir / "user_history.parquet", columns=key).astype("int64").drop_duplicates()
    history["in_training"] = 1
    fresh = raw.merge(history, on=key, how="left")
    fresh = fresh[fresh["in_training"].isna()]  # the funnel never serves what the user had in training
    out: dict[int, set] = {}
    for user, item in zip(to_host(fresh["user_id_raw"]).tolist(), to_host(fresh["item_id_raw"]).tolist()):
        out.setdefault(user, set()).add(item)
    return out


def tune_on_validation(version_dir: Path, processed, config: Config) -> dict:
    """Score every trial of ``models.tuning.grid(config)`` on the validation part; return the record
    (``models/tuning.py``) with the best trial's parameters as ``chosen``."""
    from deployment.export import export_repository

    started = time.perf_counter()
    tc = config.tuning
    metric = tuning.metric_name(tc.k)
    version_dir = Path(version_dir)
    relevant = validation_positives(processed, version_dir, config.light_ranker.target)
    users = np.array(sorted(relevant), dtype=np.int64)
    if tc.max_users and len(users) > tc.max_users:
        users = np.sort(np.random.default_rng(config.seed).choice(users, tc.max_users, replace=False))
    # load_funnel reads the temporary repository's own (empty) live store, never $FUNNEL_STORE_URL's.
    with tempfile.TemporaryDirectory(prefix="tuning-") as tmp:
        repo = export_repository(ModelVersion(version_dir), Path(tmp) / "repo")
        version = ModelVersion(version_dir).version
        stages = offline.load_funnel(repo, version)
        try:
            requests = _candidates(stages, users, tc.k)
        finally:
            # Only this pass reads the stores; the trials below use the loaded tables and models.
            offline.close_funnel(stages)
    ordering = stages[-1]
    if tc.member_weights:  # which ensemble members count: each member scores the candidates once
        _member_heads(stages, version_dir, requests)
    trials_params = tuning.grid(config)
    if ordering.affinity is None:  # no affinity weights exported (catalog above item_affinity.max_items)
        # The blend can only leave the affinity out: the grid at affinity weight 0 and the configured fit.
        # A grid that lists no 0 searched nothing and failed the training run; setting each listed blend's
        # affinity to 0 instead kept only the retrieval weights that fit beside the smallest listed affinity.
        without = replace(tc, affinity_weight=[0.0], reg_weight=[], affinity_dropout=[])
        log.info("tuning: no item affinity exported (item_affinity.max_items), so its weight is searched at 0 only")
        trials_params = tuning.grid(replace(config, tuning=without))
    fits = {(p[REG], p[DROPOUT]) for p in trials_params}
    affinities = _affinity_percentiles(version_dir, config, requests, fits, ordering)
    truth = [relevant[int(r["user"])] for r in requests]
    policy = replace(ordering.policy, exploration_temperature=0.0)  # the deterministic order
    trials = []
    heavy_by_weights = {}  # the heavy scores of each member weighting, computed once for all blends
    for params in trials_params:
        heavy = None
        if tc.member_weights:
            key = tuple(params[MEMBERS])
            if key not in heavy_by_weights:
                heavy_by_weights[key] = _heavy_scores(requests, params[MEMBERS], stages)
            heavy = heavy_by_weights[key]
        affinity = affinities.get((params[REG], params[DROPOUT]))
        top = _served_lists(requests, affinity, params, policy, ordering, tc.k, heavy)
        value = float(ndcg_at_k(top, truth, tc.k)) if requests else 0.0
        trials.append({"params": params, metric: value})
    best = tuning.choose(config, trials, metric)  # the configured affinity fit where the blend leaves it out
    if not requests:
        # Nothing to measure: every trial scored 0 and the first of the grid would replace the
        # configured values for no reason. Keep them.
        log.warning("tuning: no validation user with a click the models could serve; keeping the configured values")
        best = tuning.configured(config, best, metric)
    record = {
        "metric": metric,
        "part": "validation",
        "users": len(requests),
        "trials": trials,
        "chosen": best["params"],
        "best": best[metric],
        "seconds": round(time.perf_counter() - started, 2),
        "at_edge": tuning.at_edge(config, best["params"]) if requests else [],
    }
    log.info(
        "tuning: %d trials on %d validation users, chose %s (%s %.4f)",
        len(trials),
        len(requests),
        best["params"],
        metric,
        best[metric],
    )
    _warn_at_edge(record["at_edge"])
    return record


def _warn_at_edge(edges: list[dict]) -> None:
    if edges:
        log.warning("tuning: %s", tuning.edge_text(edges))


def _candidates(stages, users: np.ndarray, k: int) -> list[dict]:
    """For each known user: what the ordering stage receives (its candidates and the tensors the
    blend reads), from one pass of the exported funnel."""
    ordering = stages[-1]
    out = []
    for user in users.tolist():
        x = offline.run_funnel(stages, int(user), k)
        if not bool(np.asarray(x["user_known"]).reshape(-1)[0]):
            continue  # the fallback answers unknown users; no blend applies
        ranked = np.asarray(x["light_ids"], dtype=np.int64).reshape(-1)
        out.append(
            {
                "user": user,
                "ids": ranked,
                "heavy": np.asarray(x["heavy_scores"], dtype=np.float64).reshape(-1),
                "retrieval": ordering.retrieval_percentile(x, ranked),
                "history": np.asarray(x["seen_items"], dtype=np.int64).reshape(-1),
                "inputs": {name: x[name] for name in ("user_categorical", "user_continuous") if name in x},
            }
        )
    return out


def _member_heads(stages, version_dir: Path, requests: list[dict]) -> None:
    """Add each ensemble member's head scores of each request's candidates (``member_heads``), every
    member of the version loaded from its registry folder (the export may leave one out)."""
    heavy = next(s for s in stages if s.name == "heavy_ranker")
    members = heavy.load_members(version_dir)
    for r in requests:
        r["member_heads"] = heavy.member_heads(r["inputs"], r["ids"], members)


def _heavy_scores(requests: list[dict], weights: list[float], stages) -> list[np.ndarray]:
    """Each request's heavy-ranker scores with the ensemble members weighted by ``weights``
    (``heavy_ranker.member_weights``; empty = the plain mean), as the heavy ranker stage serves them."""
    from models.heads import combine, ensemble_heads

    heavy = next(s for s in stages if s.name == "heavy_ranker")
    used = [i for i, w in enumerate(weights) if w > 0] if weights else None
    out = []
    for r in requests:
        members = r["member_heads"] if used is None else [r["member_heads"][i] for i in used]
        heads = ensemble_heads(members, None if used is None else [weights[i] for i in used])
        out.append(np.asarray(combine(heads, heavy.weights), dtype=np.float64))
    return out


def _affinity_percentiles(version_dir: Path, config: Config, requests, fits: set, ordering) -> dict:
    """Each candidate's affinity percentile under each tried (L2 penalty, dropout) pair (the
    version's own weights for its configured pair, refitted ones for the others); nothing without
    affinity weights."""
    from serving.ordering import percentile_among

    if ordering.affinity is None:
        return {}
    out = {}
    history = items = None
    ac = config.item_affinity
    for reg, dropout in sorted(fits):
        if (reg, dropout) == (ac.reg_weight, ac.dropout):
            weights = ordering.affinity
        else:
            if history is None:
                history = read_parquet(version_dir / "user_history.parquet")
                items = read_parquet(version_dir / "item_features.parquet")
            weights = item_affinity.fit_from_history(history, items, reg, ac.max_items, dropout)
        pct = []
        for r in requests:
            scores = item_affinity.scores(weights, r["history"], r["ids"])
            pct.append(percentile_among(scores, scores))
        out[(reg, dropout)] = pct
    return out


def _served_lists(requests, affinity, params: dict, policy, ordering, k: int, heavy=None) -> np.ndarray:
    """``[users, k]`` raw item ids the ordering stage would serve under ``params`` (-1 padding);
    ``heavy``: each request's heavy-ranker scores under ``params`` (the served ones by default)."""
    from serving.ordering import order_candidates

    top = np.full((len(requests), k), -1, dtype=np.int64)
    for row, r in enumerate(requests):
        order, _ = order_candidates(
            r["heavy"] if heavy is None else heavy[row],
            r["retrieval"],
            k,
            retrieval_weight=params[RETRIEVAL],
            affinity_pct=None if affinity is None else affinity[row],
            affinity_weight=params[AFFINITY],
            max_per_category=policy.max_per_category,
            categories=None if ordering.categories is None else ordering.categories[r["ids"]],
        )
        items = ordering.raw_ids[r["ids"][order]]
        top[row, : len(items)] = items
    return top


def train_tuned(processed, config: Config, registry_dir: str | Path, verbose: int = 0, base=None):
    """``train_all`` with the tuning step, searching the retrained knobs first where the config lists
    candidates for them (``models.tuning.retrained_grid``); returns the published ``ModelVersion``.

    Each combination trains a candidate generator into a scratch registry (the first trains the
    rankers too, or takes them from ``base``, a version trained on the same data with the same
    ranker settings), then the blend search runs on it; the combination whose best blend scores
    highest on validation is trained once more into ``registry_dir`` with the blend search again.
    Without candidates, or with ``tuning.enabled`` off (the configured values trained once, as
    ``train_all`` publishes them), this is ``train_all(..., tune=validation_tuner(processed))``."""
    from models.tracking import tracking_uri
    from models.train import train_all

    tune = validation_tuner(processed)
    combos = tuning.retrained_grid(config) if config.tuning.enabled else []
    if not combos:
        return train_all(processed, config, registry_dir, verbose=verbose, rankers_from=base, tune=tune)
    started = time.perf_counter()
    metric = tuning.metric_name(config.tuning.k)
    trials = []
    measured = 0  # validation users any candidate generator's blend search scored
    # The trials train into a scratch registry but log to the run's own MLflow store, in an experiment
    # of their own (their runs are named after the scratch registry's versions). A store sits beside
    # its registry by default, so they went to the temporary folder's parent (/tmp/mlruns), outside the
    # work folder, where nothing looked and nothing removed them.
    store = tracking_uri(config.training, registry_dir)
    trials_experiment = f"{config.training.mlflow_experiment}-tuning-trials"
    with tempfile.TemporaryDirectory(prefix="tuning-retrained-") as scratch:
        rankers = base
        for params in combos:
            trial = tuning.apply(config, params)
            tracking = dict(mlflow_tracking_uri=store, mlflow_experiment=trials_experiment)
            trial = replace(trial, training=replace(trial.training, **tracking))
            variant = train_all(processed, trial, Path(scratch), verbose=verbose, rankers_from=rankers, tune=tune)
            rankers = rankers or variant
            record = variant.manifest["tuning"]
            measured += record["users"]
            trials.append({"params": params, metric: record["best"], "blend": record["chosen"]})
            log.info("tuning: candidate generator %s -> best blend %s %.4f", params, metric, record["best"])
        best = tuning.best_trial(trials, metric)
        if not measured:
            # Every candidate generator scored 0 on no user: the first of the grid would replace the
            # configured values for no reason (as in tune_on_validation). Keep them.
            log.warning("tuning: no validation user to compare candidate generators on; keeping the configured values")
            best = tuning.configured(config, best, metric)
        search = {
            "metric": metric,
            "part": "validation",
            "trials": trials,
            "chosen": best["params"],
            "best": best[metric],
            "seconds": round(time.perf_counter() - started, 2),
        }

        def tune_with_search(version_dir: Path, chosen_config: Config) -> dict:
            record = tune(version_dir, chosen_config)
            record["chosen"] = {**best["params"], **record["chosen"]}
            record["candidate_generator"] = search
            # tune() judged the blend's knobs; the retrained ones are judged here.
            retrained = tuning.at_edge(chosen_config, best["params"]) if measured else []
            record["at_edge"] = record["at_edge"] + retrained
            _warn_at_edge(retrained)
            return record

        return train_all(
            processed,
            tuning.apply(config, best["params"]),
            registry_dir,
            verbose=verbose,
            rankers_from=rankers,
            tune=tune_with_search,
        )
