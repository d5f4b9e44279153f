"""The whole offline evaluation of one dataset: peers and our funnel on the same split.

1. train the funnel (dataset pipeline -> models -> export) on the training period;
2. train the peers (Pop, EASE, ALS) on the same training positives;
3. evaluate every recommender on the held-out positives with full ranking, training items removed;
   our funnel is evaluated on the lists the exported funnel returns (the served path, in-process),
   and per stage: how many held-out positives survive retrieval and the filters;
4. mitigation: retrain the candidate generator with and without sampled negatives and with and
   without the logQ correction (the rankers are reused) and compare accuracy and popularity bias
   side by side;
5. ordering policies: the same export served with exploration or a per-category cap
   (``ORDERING_VARIANTS``), accuracy beside bias and list diversity, no retraining;
6. the rankers as classifiers: ROC-AUC and PR-AUC of every head on the validation part
   (``evaluation/rankers.py``);
7. write the report (HTML + Markdown + JSON).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from configs import Config
from evaluation import offline
from evaluation.peers import ALS, EASE, Popularity
from evaluation.rankers import ranker_table
from evaluation.report import write_report
from models.tuning import chosen_config
from workflows.local_parquet import read_parquet

log = logging.getLogger(__name__)

# Ordering policies measured on top of the served one (``serving.ordering``; ``serving/ordering.py``).
# Final scores lie in [0, 1], so a temperature of 0.05 makes a 0.05 lower score e times less likely.
ORDERING_VARIANTS = (
    ("per-category cap 3", {"max_per_category": 3}),
    ("per-category cap 2", {"max_per_category": 2}),
    ("exploration T=0.02", {"exploration_temperature": 0.02}),
    ("exploration T=0.05", {"exploration_temperature": 0.05}),
    ("exploration T=0.1", {"exploration_temperature": 0.1}),
)


def affinity_variant(served) -> tuple[str, dict]:
    """The ordering variant that switches the item affinity (``serving.ordering.affinity_weight``):
    off when the served policy uses it (its weight goes back to the heavy ranker), else on at 0.5
    (the heavy ranker's and retrieval's shares halved), so every report shows what it buys."""
    if served.affinity_weight > 0:
        return "item affinity off", {"affinity_weight": 0.0}
    return "item affinity 0.5", {"affinity_weight": 0.5, "retrieval_weight": served.retrieval_weight / 2}


def funnel_results(
    name: str,
    repo: Path,
    version: int,
    model_dir: Path,
    data: offline.Interactions,
    ks,
    user_attributes=None,
    n_bootstrap=500,
    stages=None,
    parity: bool = True,
    categories: pd.Series | None = None,
) -> tuple[offline.Result, dict]:
    """Evaluate the exported funnel; also return per-stage recall of the held-out positives.

    Preference-aware parity needs scores, not lists: each user's held-out items are scored by the
    funnel's final scorer (``offline.final_scores``: the heavy ranker's weighted score blended with
    the retrieval and item-affinity percentiles as ``serving.ordering`` weighs them, the order the
    funnel serves), so the parity says whether that scorer prefers the popular one of two items
    the user liked. It does not see the earlier stages' bias (an item retrieval never returns is
    still scored); the item-share curve, Gini and coverage of the served lists do.
    """
    if not stages:  # loaded here: closed here (``offline.close_funnel``); given stages stay the caller's
        with offline.opened_funnel(repo, version) as own:
            return funnel_results(
                name, repo, version, model_dir, data, ks, user_attributes=user_attributes, n_bootstrap=n_bootstrap,
                stages=own, parity=parity, categories=categories,
            )  # fmt: skip
    k = max(ks)
    items = read_parquet(model_dir / "item_features.parquet")
    raw_of = np.full(int(items["item_id"].max()) + 1, -1, dtype=np.int64)
    raw_of[items["item_id"].to_numpy()] = items["item_id_raw"].to_numpy()
    encoded_of = pd.Series(items["item_id"].to_numpy(), index=items["item_id_raw"].to_numpy())
    finals, per_stage = [], {}
    # Final-scorer scores of each user's held-out items only (all parity reads; -inf where unscorable):
    # a users x items matrix of them took 80 GB at 200,000 users and 50,000 items.
    liked_scores = []
    scoring_seconds = 0.0
    started = time.perf_counter()
    relevant = data.relevant
    # Raw ids of each user's training and validation items: an item only the validation part holds
    # has no column (``data.seen`` misses it), but the funnel's catalog can still serve it.
    history = (
        pd.concat([data.train, data.also_seen]).groupby("user_id")["item_id"].unique()
        if data.also_seen is not None
        else pd.Series(dtype=object)
    )
    # A progress bar per evaluated list (943 MovieLens users take minutes per variant); TQDM_DISABLE=1 hides it.
    for row, user in enumerate(tqdm(data.user_ids, desc=f"evaluating {name}", unit="user", leave=False)):
        # Ask for more than k when the protocol excludes items the funnel's own history does not
        # hold (validation items), then drop them: as if the online store knew them.
        excluded = np.asarray(history.get(user, np.zeros(0, dtype=np.int64)), dtype=np.int64)
        out = offline.run_funnel(stages, int(user), min(k + len(excluded), stages[-1].limits.max_k))
        items = np.asarray(out["item_ids"])
        finals.append(items[~np.isin(items, excluded)][:k])
        for key, value in out.items():
            # Encoded candidate lists between stages: retrieval, filters, rankers.
            if key.endswith("_ids") and key not in ("item_ids", "seen_items"):
                per_stage.setdefault(key, []).append(raw_of[np.asarray(value, dtype=np.int64)])
        cols = np.array(sorted(relevant[row]), dtype=np.int64)
        scorable = encoded_of.reindex(data.item_ids[cols]).notna().to_numpy()
        user_scores = np.full(len(cols), -np.inf, dtype=np.float64)
        if parity and scorable.sum() >= 2 and bool(np.asarray(out["user_known"]).reshape(-1)[0]):
            tick = time.perf_counter()
            encoded = encoded_of.reindex(data.item_ids[cols[scorable]]).to_numpy().astype(np.int64)
            user_scores[scorable] = offline.final_scores(stages, out, encoded)
            scoring_seconds += time.perf_counter() - tick
        liked_scores.append((cols, user_scores))
    seconds = time.perf_counter() - started - scoring_seconds
    top = offline.columns_from_raw(finals, data, k)
    result = offline.evaluate_top_k(
        name,
        top,
        data,
        ks,
        user_attributes=user_attributes,
        liked_scores=liked_scores if parity else None,
        n_bootstrap=n_bootstrap,
    )
    if categories is not None:
        spans = [categories.reindex(items).nunique() for items in finals if len(items)]
        result.bias["categories_per_list"] = float(np.mean(spans)) if spans else 0.0
    stage_recall = {}
    for key, lists in per_stage.items():
        length = max(1, max(len(x) for x in lists))
        cols = offline.columns_from_raw(lists, data, length)
        from evaluation.metrics import recall_at_k

        stage_recall[key] = {
            "mean_size": float(np.mean([len(x) for x in lists])),
            "recall": recall_at_k(cols, relevant, num_relevant=data.relevant_counts),
        }
    # The lists' own length: a list can be shorter than k (validation items dropped past max_k).
    stage_recall["final"] = {
        "mean_size": float(np.mean([len(x) for x in finals])),
        "recall": result.metrics[f"recall@{k}"],
    }
    stage_recall["ms_per_user"] = 1000 * seconds / max(1, len(data.user_ids))
    return result, stage_recall


def _trade_off(result: offline.Result, ks) -> dict:
    """Accuracy beside popularity bias: the columns of the mitigation and ordering tables, each label
    naming its K. Accuracy is at the run's first K, the bias figures over the top ``max(ks)`` (where
    ``offline.evaluate_top_k`` measures them): unlabelled, they read as figures of the top 10 beside
    NDCG@10 while they were those of the top 20."""
    k, top = ks[0], max(ks)
    return {
        f"ndcg@{k}": result.metrics[f"ndcg@{k}"],
        f"recall@{k}": result.metrics[f"recall@{k}"],
        # None: nothing recommended
        f"items for 50% of top-{top} recs": (result.bias["item_share_curve"] or {}).get(0.5),
        f"gini@{top}": result.bias["gini"],
        f"coverage@{top}": result.bias["coverage"],
        f"popularity lift@{top}": result.bias["popularity_lift"],
    }


def ordering_results(
    repo: Path,
    version: int,
    model_dir: Path,
    data: offline.Interactions,
    ks,
    n_bootstrap=500,
    variants=ORDERING_VARIANTS,
    seed: int = 0,
    stages=None,
    as_served: offline.Result | None = None,
) -> pd.DataFrame:
    """The served funnel and each ordering variant on the same export: accuracy beside popularity
    bias and how many categories a list spans. Exploration draws from a seeded generator, so the
    table is repeatable; a served request gets a fresh draw. ``stages`` reuses loaded stages.
    Where the export has item affinity weights, the affinity switched (``affinity_variant``) is a
    row too. ``as_served``: the served funnel's result on the same data, evaluated with
    ``categories=served_categories(stages)``, is the first row instead of evaluating it again."""
    if not stages:  # loaded here: closed here (``offline.close_funnel``); given stages stay the caller's
        with offline.opened_funnel(repo, version) as own:
            return ordering_results(
                repo, version, model_dir, data, ks, n_bootstrap=n_bootstrap, variants=variants, seed=seed,
                stages=own, as_served=as_served,
            )  # fmt: skip
    ordering = next(s for s in stages if s.name == "ordering")
    served = ordering.policy
    if ordering.affinity is not None:
        variants = tuple(variants) + (affinity_variant(served),)
    category_of = served_categories(stages)
    if as_served is not None and "categories_per_list" not in as_served.bias:
        raise ValueError("as_served must be evaluated with categories=served_categories(stages)")
    rows = []
    for name, change in (("as served", {}),) + tuple(variants):
        if name == "as served" and as_served is not None:
            res = as_served  # the same export, policy and data: evaluating it again gives the same lists
        else:
            variant = ordering.with_policy(dataclasses.replace(served, **change), seed=seed)
            res, _ = funnel_results(
                name,
                repo,
                version,
                model_dir,
                data,
                ks,
                None,
                n_bootstrap,
                stages=[variant if s is ordering else s for s in stages],
                parity=False,
                categories=category_of,
            )
        rows.append(
            {
                "ordering": name,
                **_trade_off(res, ks),
                f"categories per top-{max(ks)} list (of {category_of.nunique()})": res.bias["categories_per_list"],
            }
        )
    return pd.DataFrame(rows)


def served_categories(stages) -> pd.Series:
    """Each item's category (raw item id -> the ordering policy's ``category_column``), as the
    ordering stage loaded it: what the ordering table's "categories per list" counts."""
    ordering = next(s for s in stages if s.name == "ordering")
    items = ordering.items
    return pd.Series(items[ordering.policy.category_column].to_numpy(), index=items["item_id_raw"].to_numpy())


# The stages a candidate-generator variant shares with the main run: it copies the rankers
# (``train_all(rankers_from=...)``) and trains on the same data, so these load the same artifacts.
SHARED_BY_VARIANTS = ("filtering", "light_ranker", "heavy_ranker", "ordering")


def _with_retrieval_of(stages: list, repo: Path, version: int, live_store: str) -> list:
    """``stages`` with the stages that depend on the candidate generator loaded from ``repo`` as
    ``offline.load_funnel`` loads them: reading ``live_store``, the live store the served funnel's
    stages read (left to themselves they read ``$FUNNEL_STORE_URL`` where set, else the variant
    repository's own store), with the feature lookup's clock at the end of the training data."""
    from serving.interface import stage_folder
    from serving.stages import STAGES

    def load(name: str):
        return STAGES[name](
            stage_folder(repo, name, version), **({"live_store": live_store} if name in offline.LIVE else {})
        )

    return offline.at_training_end([s if s.name in SHARED_BY_VARIANTS else load(s.name) for s in stages])


def mitigation_variants(cg, served: tuple[int, bool] | None = None) -> list[tuple[int, bool]]:
    """(sampled negatives, logQ correction) of the mitigation table: each of the two on and off.
    "On" for sampled negatives is the served count where the served candidate generator has some
    (so the served pair is always a row, whatever count tuning chose), else the config's count, or
    one batch's worth when the config has none (as many uniform negatives as in-batch ones)."""
    sampled = (served[0] if served else 0) or cg.sampled_negatives or cg.batch_size
    return [(n, logq) for n in (0, sampled) for logq in (False, True)]


def served_variant(config: Config, manifest: dict) -> tuple[int, bool]:
    """(sampled negatives, logQ correction) of the candidate generator a version serves: what its
    tuning step chose where it searched them (``tuning.sampled_negatives``), else the config's. The
    mitigation table's served row is this one, not the configured pair. A logQ strength of 0 (what a
    search of the correction on and off chooses for off) is no correction: logQ off."""
    cg = chosen_config(config, manifest).candidate_generator
    return cg.sampled_negatives, cg.logq_correction and cg.logq_strength > 0


def variant_config(config: Config, manifest: dict, sampled: int, logq: bool) -> Config:
    """The config a mitigation variant trains with: the main run's tuned values (``chosen_config``)
    with ``sampled`` negatives and the logQ correction on or off, nothing else changed. On, it has
    the strength the version serves, or where that is 0 (no correction) the configured one, or 1
    (exactly log q) where that is 0 too: a logQ-on row at strength 0 was the correction off again."""
    variant = chosen_config(config, manifest)
    cg = variant.candidate_generator
    cg.sampled_negatives, cg.logq_correction = sampled, logq
    if logq and cg.logq_strength <= 0:
        cg.logq_strength = config.candidate_generator.logq_strength or 1.0
    return variant


def peer_results(
    data: offline.Interactions, ks, user_attributes=None, n_bootstrap=500, ease_max_items: int | None = None
) -> tuple[list[offline.Result], dict[str, str]]:
    """Pop, EASE and ALS on the split, and why a peer was not run (``{figure: reason}``, the report's
    not-applicable notes). EASE solves a dense items x items system: above ``ease_max_items`` items
    (``item_affinity.max_items``, where the funnel's own affinity stops too) it is not run, since it
    would run out of memory or time after the funnel had already trained. Each peer scores users in
    chunks (``offline.evaluate_scorer``), never one users x items matrix."""
    train = data.matrix()
    num_items = len(data.item_ids)
    with_ease = ease_max_items is None or num_items <= ease_max_items
    popularity = Popularity()  # first: fitted before the peers that serve its list to users without a training row
    peers, skipped = [popularity, *([EASE()] if with_ease else []), ALS()], {}
    if not with_ease:
        skipped["EASE (every figure)"] = (
            f"not run: {num_items:,} items > item_affinity.max_items {ease_max_items:,} "
            "(a dense items x items solve, as the funnel's item affinity)"
        )
    out = []
    for peer in peers:
        peer.fit(train)
        out.append(
            offline.evaluate_scorer(
                peer.name,
                peer.scores,
                data,
                ks,
                # a user without a training row: the popularity list, as the funnel's fallback serves them
                cold_user_scores=None if peer.serves_cold_users else popularity.scores,
                user_attributes=user_attributes,
                n_bootstrap=n_bootstrap,
            )
        )
    return out, skipped


def train_and_export(processed, config: Config, registry_dir: Path, repo_dir: Path, rankers_from=None):
    """Train (with the tuning step on the validation part, ``evaluation/tuning.py``; variants that
    reuse ``rankers_from`` keep the values it chose) and export, with an empty live store."""
    from deployment.export import export_repository
    from evaluation.tuning import train_tuned
    from models.train import train_all

    if rankers_from is None:  # the main run: tuned (the retrained knobs too, where configured)
        model = train_tuned(processed, config, registry_dir)
    else:
        model = train_all(processed, config, registry_dir, verbose=0, rankers_from=rankers_from)
    repo = export_repository(model, repo_dir, replace=True)
    clear_live_store(repo)
    return model, repo


def clear_live_store(repo: Path) -> Path | None:
    """Move the live store beside ``repo`` (``<repo>-live.sqlite`` and its -wal and -shm files), which
    the offline replay reads (``offline.load_funnel``), aside; return where it went (None: there was
    none). The export replaces the repository but keeps that store, as a deployment needs; a rerun
    into the same ``--out`` then replayed the new export with the events and takedowns written there
    since the last run (serving that repository, ``ingest_events.py``, ``takedown.py``), and its
    figures were not those of a fresh folder. Moved, not deleted: an ``--out`` that is a deployment's
    folder would otherwise lose its takedown list."""
    from workflows.live_store import store_beside

    store = Path(store_beside(repo))
    if not any(Path(f"{store}{suffix}").exists() for suffix in ("", "-wal", "-shm")):
        return None  # (a -wal or -shm alone, left by a crash, goes too: a new store must not meet it)
    kept = store.with_name(f"{store.name}.replaced-{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**9}")
    for suffix in ("-wal", "-shm", ""):  # the main file last: SQLite pairs a -wal with it by name
        part = Path(f"{store}{suffix}")
        if part.exists():
            part.rename(f"{kept}{suffix}")
    log.warning("evaluation: the live store beside %s was moved aside to %s; the replay starts empty", repo, kept)
    return kept


def canonical(frame: pd.DataFrame, item_map_path: Path, unsafe=()) -> pd.DataFrame:
    """Events with duplicate items mapped to their canonical id and unsafe items dropped, exactly as
    the dataset pipeline cleans the log, so every recommender is judged on the same items."""
    # Nullable: an id the map lacks made the mapped column float64, which rounded ids beyond 2**53.
    mapping = read_parquet(item_map_path).set_index("item_id")["canonical_item_id"].astype("Int64")
    out = frame.copy()
    out["item_id"] = out["item_id"].map(mapping).fillna(out["item_id"]).astype(np.int64)
    return out[~out["item_id"].isin(list(unsafe))]


def evaluate_split(
    processed,
    train_pos: pd.DataFrame,
    test_pos: pd.DataFrame,
    users: pd.DataFrame,
    config: Config,
    out: Path,
    ks,
    mitigation: bool,
    n_bootstrap: int,
    title: str,
    context: dict,
    also_seen: pd.DataFrame | None = None,
    trained=None,
) -> dict:
    """Peers and the funnel (and the mitigation variants) on one split; write the report.
    ``trained`` = ``(model version, exported repository)`` evaluates those instead of training.

    Any split with held-out positives finishes: a figure it cannot support (preference parity when
    each user holds out one item, a slice gap over one group, an AUC over one class) is reported as
    not applicable with the reason (``Result.not_applicable``, the report's last section).

    Every K is at most ``serving.max_k``: the funnel serves no longer list, so past it the funnel's
    figures would be those of a list cut short beside the peers' full ones."""
    if max(ks) > config.serving.max_k:
        raise ValueError(f"k {max(ks)} > serving.max_k {config.serving.max_k}: the funnel serves no longer list")
    data = offline.Interactions.from_split(train_pos, test_pos, also_seen)
    # The mitigation rows' names are known once training has chosen the served pair; their number now.
    mitigation_steps = len(mitigation_variants(config.candidate_generator)) if mitigation else 0
    steps = [
        "train and export",
        "funnel",
        "peers",
        *["mitigation"] * mitigation_steps,
        "ordering policies",
        "rankers",
        "report",
    ]
    progress = tqdm(total=len(steps), desc="offline evaluation", unit="step")
    names = iter(steps)
    started = []  # not tqdm's postfix: a disabled bar (TQDM_DISABLE=1) has none

    def begin(detail: str = "") -> None:
        if started:  # the step before is done
            progress.update()
        started.append(f"{next(names)} {detail}".strip())
        progress.set_postfix_str(started[-1])

    begin()
    model, repo = trained or train_and_export(processed, config, out / "registry", out / "triton_repo")
    from workflows.live_store import store_beside

    live_store = store_beside(repo)  # the one live store the funnel and its variants read
    loaded = offline.load_funnel(repo, model.version, live_store=live_store)
    try:
        begin()
        funnel, stages = funnel_results(
            "funnel (served)", repo, model.version, model.path, data, ks, users, n_bootstrap, stages=loaded,
            categories=served_categories(loaded),
        )  # fmt: skip
        begin()
        peers, skipped_peers = peer_results(data, ks, users, n_bootstrap, config.item_affinity.max_items)
        results = peers + [funnel]

        mitigation_rows = []
        if mitigation:
            served = served_variant(config, model.manifest)
            # The retrieval stage's list length (serving.retrieval_k of the export evaluated): its recall's K.
            retrieval_k = next(s.k for s in loaded if s.name == "retrieval")
            for sampled, logq in mitigation_variants(config.candidate_generator, served):
                begin(f"sampled={sampled} logQ={logq}")
                variant = variant_config(config, model.manifest, sampled, logq)
                if (sampled, logq) == served:
                    res, st = funnel, stages  # the main run already is this variant
                else:
                    m, r = train_and_export(
                        processed,
                        variant,
                        out / "registry",
                        out / f"triton_repo_sampled_{sampled}_logq_{logq}",
                        rankers_from=model,
                    )
                    variant_stages = _with_retrieval_of(loaded, r, m.version, live_store)
                    try:
                        res, st = funnel_results(
                            f"funnel sampled={sampled} logQ={logq}",
                            r,
                            m.version,
                            m.path,
                            data,
                            ks,
                            None,
                            n_bootstrap,
                            stages=variant_stages,
                        )
                    finally:  # the stages it loaded for this variant; the shared ones are closed below
                        offline.close_funnel([s for s in variant_stages if s not in loaded])
                mitigation_rows.append(
                    {
                        "sampled_negatives": sampled,
                        "logq_correction": logq,
                        "logq_strength": variant.candidate_generator.logq_strength if logq else 0.0,
                        "served": (sampled, logq) == served,
                        f"retrieval recall@{retrieval_k}": st["candidate_ids"]["recall"],
                        **_trade_off(res, ks),
                    }
                )
        begin()
        ordering_rows = ordering_results(
            repo, model.version, model.path, data, ks, n_bootstrap, stages=loaded, as_served=funnel
        )  # fmt: skip
    finally:
        offline.close_funnel(loaded)
    begin()
    rankers = ranker_table(model.path, model.manifest, processed.valid())
    begin()
    context = {
        **context,
        **data.setup_counts(),
        "model version": model.version,
    }
    extra = {"Rankers on the validation part: ROC-AUC and PR-AUC per head": rankers}
    # A head whose validation labels are all one class has no AUC: say so, with the reason.
    notes = dict(skipped_peers)
    notes |= {
        f"ROC-AUC, PR-AUC of {row['ranker']} / {row['head']}": "the validation part has "
        + ("no rows" if not row["validation rows"] else f"one class only (positive share {row['positive share']:.4f})")
        for _, row in rankers.iterrows()
        if pd.isna(row["ROC-AUC"])
    }
    if mitigation_rows:
        extra["Mitigation: sampled negatives and the logQ correction on the candidate generator"] = pd.DataFrame(
            mitigation_rows
        )
    extra["Ordering policy: exploration and a per-category cap on the same export"] = ordering_rows
    paths = write_report(
        results,
        out / "report",
        title,
        context,
        ks=ks,
        extra_tables=extra,
        stages=stages,
        tuning=model.manifest.get("tuning"),
        served=funnel.name,
        notes=notes,
    )
    _log_to_mlflow(config, model.path.parent, out, results, paths)
    progress.update()
    progress.close()
    return {
        "results": results,
        "stages": stages,
        "mitigation": mitigation_rows,
        "ordering": ordering_rows,
        "rankers": rankers,
        "paths": paths,
        "model": model,
    }


def _log_to_mlflow(config: Config, registry_dir: Path, out: Path, results, paths) -> None:
    """The report and every headline metric, as one MLflow run next to the training runs of the
    registry the evaluated model came from."""
    from models.tracking import tracked_run

    with tracked_run(config.training, registry_dir, {"evaluation": str(out)}, run_name="offline-evaluation") as run:
        for r in results:
            name = re.sub(r"[^0-9A-Za-z_./ -]", "_", r.name)  # MLflow's allowed key characters
            run.log_metrics(
                {
                    f"{name}.{k.replace('@', '_at_')}": v
                    for k, v in r.metrics.items()
                    if not k.endswith(("_low", "_high"))
                }
            )
        for path in paths.values():
            run.log_artifact(path)


def evaluate_synthetic(
    config: Config,
    out_dir: str | Path,
    ks=(10, 20),
    mitigation: bool = True,
    n_bootstrap: int = 500,
    world=None,
    processed=None,
    trained=None,
) -> dict:
    """Temporal protocol on the synthetic world: train on the training period, test on the rest.

    ``make demo`` passes what it already built (``world``, ``processed``, ``trained`` = its model
    version and exported repository) so the report evaluates exactly what it serves."""
    from workflows.pipeline import run_dataset_pipeline
    from workflows.sources.synthetic import generate

    out = Path(out_dir)
    if processed is None:
        world = generate(config.synthetic)
        raw = world.write_parquet(out / "raw")
        processed = run_dataset_pipeline(raw["events"], raw["users"], raw["items"], out / "processed", config.workflow)
    return evaluate_temporal(
        processed,
        world.events,
        world.users,
        config,
        out,
        ks,
        mitigation,
        n_bootstrap,
        "Offline evaluation: synthetic data",
        f"synthetic ({len(world.events):,} events, {len(world.users):,} users, {len(world.items):,} items)",
        trained=trained,
    )


def evaluate_spec(
    spec, config: Config, out_dir: str | Path, ks=(10, 20), mitigation: bool = True, n_bootstrap: int = 500
) -> dict:
    """Your own event log, described by a dataset spec (``workflows/spec.py``, docs/own-data.md):
    the spec's positive signal is what is held out and predicted, under the config's split.

    ``temporal`` (default): ``evaluate_temporal``, every positive after the test cutoff. ``random``
    and ``explicit``: the pipeline's own test part (``ProcessedData.held_out_events``), the
    validation part's positives excluded from ranking like training ones, since the tuning step
    chose on them; a split without a test part (``explicit`` without ``test_file``, ``temporal`` with
    ``test_fraction`` 0) is refused. The
    log is read and checked as ``scripts/prepare_data.py`` does (a defect raises ``DatasetError``
    before anything is written)."""
    from workflows.pipeline import prepare_dataset
    from workflows.reader import load_inputs

    split = config.workflow.split
    if split.kind == "explicit" and not split.test_file:
        raise ValueError(
            "evaluating needs a test part the tuning step never read: set workflow.split.test_file "
            "(the validation part is what the training run tunes on)"
        )
    if split.kind == "temporal" and split.test_fraction <= 0:
        raise ValueError(
            "evaluating needs a test period the tuning step never read: set workflow.split.test_fraction > 0 "
            "(without it the period after the cutoff is the validation part the training run tunes on)"
        )
    out = Path(out_dir)
    inputs = load_inputs(spec)  # read and checked once: the pipeline and the figures below share it
    processed = prepare_dataset(spec, out / "processed", config.workflow, inputs=inputs)
    events = inputs.events.compute()
    events = events.to_pandas() if hasattr(events, "to_pandas") else events  # the evaluation runs on the host
    users = inputs.users if inputs.users is not None else pd.DataFrame({"user_id": np.unique(events["user_id"])})
    users = users.to_pandas() if hasattr(users, "to_pandas") else users
    # Slices are by the users' attributes; a text column (a bio, a name) is no grouping.
    users = users.drop(columns=[c for c in inputs.layout.user_text if c in users.columns])
    dataset = (
        f"{spec.name or 'dataset spec'} ({len(events):,} events, {events['user_id'].nunique():,} users, "
        f"{events['item_id'].nunique():,} items; positive: {inputs.layout.positive})"
    )
    title = f"Offline evaluation: {dataset}"
    if split.kind == "temporal":
        return evaluate_temporal(processed, events, users, config, out, ks, mitigation, n_bootstrap, title, dataset)
    train, test, valid = held_out_positives(processed)
    rows = f"{len(train):,}/{len(valid):,}/{len(test):,} positives"
    protocol = (
        f"random {'/'.join(f'{r:.0%}' for r in split.ratios)} per user (seed {split.seed})"
        if split.kind == "random"
        else f"explicit split files ({split.train_file}, {split.valid_file}, {split.test_file})"
    )
    context = {
        "dataset": dataset,
        "protocol": f"{protocol}, {rows}; validation (tuning) positives removed like training ones; full ranking, "
        "seen removed; peers train on the cleaned training log the funnel trains on",
    }
    return evaluate_split(
        processed, train, test, users, config, out, ks, mitigation, n_bootstrap, title, context, also_seen=valid
    )


def held_out_positives(processed) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``(train, test, valid)`` positives (``click`` > 0) of a processed log's own parts, in raw
    (canonical) ids: the rows the dataset pipeline assigned, cleaned and deduplicated, so an
    evaluation scores exactly the split the models were trained and tuned on."""
    parts = [processed.train_events, processed.held_out_events("test"), processed.held_out_events("valid")]
    if not parts[1].exists():
        raise ValueError(f"{processed.root} has no test part ({parts[1].name}): nothing the tuning step never read")
    # On the host: the peers (scipy EASE, implicit ALS) and the metrics over lists take host arrays.
    train, test, valid = (frame[frame["click"] > 0] for frame in map(read_parquet, parts))
    if test.empty:
        raise ValueError(f"the test part of {processed.root} holds no positive to score")
    return train, test, valid


def evaluate_temporal(
    processed,
    events: pd.DataFrame,
    users: pd.DataFrame,
    config: Config,
    out: Path,
    ks,
    mitigation: bool,
    n_bootstrap: int,
    title: str,
    dataset: str,
    trained=None,
) -> dict:
    """The temporal protocol on a processed log and its raw ``events`` (``click`` = the positive):
    train on the training period, score the positives after it; peers train on the cleaned
    training positives the funnel trains on."""
    summary = processed.summary
    cutoff = summary["cutoff"]
    # With a test part (split.test_fraction > 0) the validation period in between is what the
    # training run tunes on (evaluation/tuning.py); only the test period is scored here, and the
    # validation clicks are excluded from ranking like training ones (known, not to be re-served).
    test_cutoff = (summary.get("split") or {}).get("test_cutoff")
    start = cutoff if test_cutoff is None else test_cutoff
    train = read_parquet(processed.train_events)  # on the host, as the peers take it (above)
    unsafe = summary.get("unsafe_items", [])
    later = canonical(events[events["timestamp"] >= start], processed.item_id_map, unsafe)
    also_seen = None
    if test_cutoff is not None:
        between = events[(events["timestamp"] >= cutoff) & (events["timestamp"] < test_cutoff)]
        also_seen = canonical(between[between["click"] > 0], processed.item_id_map, unsafe)
    held_out = f"validation {cutoff}..{test_cutoff} (tuning), test after" if test_cutoff else f"test after {cutoff}"
    context = {
        "dataset": dataset,
        "protocol": f"temporal: train before {cutoff}, {held_out}; positives = clicks; full ranking, seen removed; "
        "peers train on the cleaned training log the funnel trains on",
    }
    return evaluate_split(
        processed,
        train[train["click"] > 0],
        later[later["click"] > 0],
        users,
        config,
        out,
        ks,
        mitigation,
        n_bootstrap,
        title,
        context,
        also_seen=also_seen,
        trained=trained,
    )


def evaluate_movielens(
    source: str | Path,
    config: Config,
    out_dir: str | Path,
    ks=(10,),
    mitigation: bool = True,
    n_bootstrap: int = 500,
    seed: int = 2020,
    protocol: str = "recbole",
) -> dict:
    """MovieLens-100K under RecBole's protocol (``protocol="recbole"``: random 80/10/10 per user,
    split by ``seed``) or a temporal one (``"temporal"``: the oldest 80% of ratings train, the next
    10% validate, the newest 10% test, one global cut), every rating a positive, full ranking with
    training and validation items removed. The funnel trains on the same training ratings through
    an explicit split (so the pipeline's own filters see exactly the protocol's train part)."""
    from evaluation.protocols import recbole_random, temporal
    from workflows.pipeline import run_dataset_pipeline
    from workflows.sources import movielens

    out = Path(out_dir)
    ml = movielens.load(source, click_min_rating=config.movielens.click_min_rating)
    raw = ml.write_parquet(out / "raw")
    if protocol not in ("recbole", "temporal"):
        raise ValueError(f"unknown protocol {protocol!r}: 'recbole' or 'temporal'")
    split = recbole_random(ml.events, seed=seed) if protocol == "recbole" else temporal(ml.events)
    files = {}
    for name in ("train", "valid", "test"):
        files[name] = str(out / "split" / f"{name}.parquet")
        Path(files[name]).parent.mkdir(parents=True, exist_ok=True)
        getattr(split, name)[["user_id", "item_id", "timestamp"]].to_parquet(files[name], index=False)
    config = copy.deepcopy(config)
    sc = config.workflow.split
    sc.kind, sc.train_file, sc.valid_file, sc.test_file = "explicit", files["train"], files["valid"], files["test"]
    config.workflow.active_users.enabled = False  # the protocol keeps every user
    processed = run_dataset_pipeline(raw["events"], raw["users"], raw["items"], out / "processed", config.workflow)
    unsafe = processed.summary.get("unsafe_items", [])
    train = canonical(split.train, processed.item_id_map, unsafe)
    test = canonical(split.test, processed.item_id_map, unsafe)
    context = {
        "dataset": f"MovieLens-100K ({len(ml.events):,} ratings, {ml.events['user_id'].nunique()} users, "
        f"{ml.events['item_id'].nunique()} items; {len(split.train):,}/{len(split.valid):,}/{len(split.test):,})",
        "protocol": (
            f"RecBole: random 80/10/10 per user (numpy shuffle, seed {seed})"
            if protocol == "recbole"
            else "temporal: oldest 80% of ratings train, next 10% validate, newest 10% test (global cut)"
        )
        + f", every rating a positive, full ranking, training and validation items removed; training seed "
        f"{config.seed}",
        "reference (RecBole 1.2.1, its own split)": "EASE R@10 0.2805 N@10 0.3295; ItemKNN 0.2470/0.2834; "
        "BPR 0.2388/0.2862; Pop 0.0838/0.1005",
    }
    valid = canonical(split.valid, processed.item_id_map, unsafe)
    return evaluate_split(
        processed,
        train,
        test,
        ml.users,
        config,
        out,
        ks,
        mitigation,
        n_bootstrap,
        f"Offline evaluation: MovieLens-100K, {'RecBole' if protocol == 'recbole' else 'temporal'} protocol",
        context,
        also_seen=valid,
    )
