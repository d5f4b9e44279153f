"""The whole offline evaluation of one dataset: peers and our funnel on the same split.

1. train the funnel (dataset pipeline -> models -> export) on the training period;
2. train the peers (Pop, EASE, ALS) on the same training positives;
3. evaluate every recommender on the held-out positives with full ranking, training items removed;
   our funnel is evaluated on the lists the exported funnel returns (the served path, in-process),
   and per stage: how many held-out positives survive retrieval and the filters;
4. mitigation: retrain the candidate generator with the logQ correction switched and compare
   accuracy and popularity bias side by side;
5. write the report (HTML + Markdown + JSON).
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from configs import Config
from evaluation import offline
from evaluation.peers import ALS, EASE, Popularity
from evaluation.report import write_report


def funnel_results(name: str, repo: Path, version: int, model_dir: Path, data: offline.Interactions,
                   ks, user_attributes=None, n_bootstrap=500) -> tuple[offline.Result, dict]:
    """Evaluate the exported funnel; also return per-stage recall of the held-out positives."""
    k = max(ks)
    items = pd.read_parquet(model_dir / "item_features.parquet")
    raw_of = np.full(int(items["item_id"].max()) + 1, -1, dtype=np.int64)
    raw_of[items["item_id"].to_numpy()] = items["item_id_raw"].to_numpy()
    stages = offline.load_funnel(repo, version)
    finals, per_stage = [], {}
    started = time.perf_counter()
    for user in data.user_ids:
        out = offline.run_funnel(stages, int(user), k)
        finals.append(out["item_ids"])
        for key, value in out.items():
            # Encoded candidate lists between stages: retrieval, filters, rankers.
            if key.endswith("_ids") and key not in ("item_ids", "seen_items"):
                per_stage.setdefault(key, []).append(raw_of[np.asarray(value, dtype=np.int64)])
    seconds = time.perf_counter() - started
    top = offline.columns_from_raw(finals, data, k)
    result = offline.evaluate_top_k(name, top, data, ks, user_attributes=user_attributes, n_bootstrap=n_bootstrap)
    stage_recall = {}
    relevant = data.relevant
    for key, lists in per_stage.items():
        length = max(1, max(len(x) for x in lists))
        cols = offline.columns_from_raw(lists, data, length)
        from evaluation.metrics import recall_at_k

        stage_recall[key] = {"mean_size": float(np.mean([len(x) for x in lists])), "recall": recall_at_k(cols, relevant)}
    stage_recall["final"] = {"mean_size": float(k), "recall": result.metrics[f"recall@{k}"]}
    stage_recall["ms_per_user"] = 1000 * seconds / max(1, len(data.user_ids))
    return result, stage_recall


def peer_results(data: offline.Interactions, ks, user_attributes=None, n_bootstrap=500) -> list[offline.Result]:
    users = np.arange(len(data.user_ids))
    train = data.matrix()
    out = []
    for peer in (Popularity(), EASE(), ALS()):
        scores = peer.fit(train).scores(users)
        out.append(offline.evaluate_scores(peer.name, scores, data, ks, user_attributes=user_attributes,
                                           n_bootstrap=n_bootstrap))
    return out


def train_and_export(processed, config: Config, registry_dir: Path, repo_dir: Path):
    from models.train import train_all
    from serving.export import export_repository

    model = train_all(processed, config, registry_dir, verbose=0)
    repo = export_repository(model, repo_dir, replace=True)
    return model, repo


def evaluate_synthetic(config: Config, out_dir: str | Path, ks=(10, 20), mitigation: bool = True,
                       n_bootstrap: int = 500) -> dict:
    """Temporal protocol on the synthetic world: train on the training period, test on the rest."""
    from workflows.pipeline import run_dataset_pipeline
    from workflows.sources.synthetic import generate

    out = Path(out_dir)
    world = generate(config.synthetic)
    raw = world.write_parquet(out / "raw")
    processed = run_dataset_pipeline(raw["events"], raw["users"], raw["items"], out / "processed", config.workflow)
    cutoff = processed.summary["cutoff"]
    clicks = world.events[world.events["click"] > 0]
    data = offline.Interactions.from_split(clicks[clicks["timestamp"] < cutoff], clicks[clicks["timestamp"] >= cutoff])
    users = world.users

    model, repo = train_and_export(processed, config, out / "registry", out / "triton_repo")
    funnel, stages = funnel_results("funnel (served)", repo, model.version, model.path, data, ks, users, n_bootstrap)
    results = peer_results(data, ks, users, n_bootstrap) + [funnel]

    mitigation_rows = []
    if mitigation:
        for logq in (False, True):
            if logq == config.candidate_generator.logq_correction:
                res, st = funnel, stages  # the main run already is this variant
            else:
                variant = copy.deepcopy(config)
                variant.candidate_generator.logq_correction = logq
                m, r = train_and_export(processed, variant, out / "registry", out / f"triton_repo_logq_{logq}")
                res, st = funnel_results(f"funnel logQ={logq}", r, m.version, m.path, data, ks, None, n_bootstrap)
            mitigation_rows.append({
                "logq_correction": logq,
                "retrieval_recall": st["candidate_ids"]["recall"],
                f"ndcg@{ks[0]}": res.metrics[f"ndcg@{ks[0]}"],
                f"recall@{ks[0]}": res.metrics[f"recall@{ks[0]}"],
                "items for 50% of recs": res.bias["item_share_curve"][0.5],
                "gini": res.bias["gini"],
                "coverage": res.bias["coverage"],
            })
    context = {
        "dataset": f"synthetic ({len(world.events):,} events, {len(world.users):,} users, {len(world.items):,} items)",
        "protocol": f"temporal: train before {cutoff}, test after; positives = clicks; full ranking, seen removed",
        "funnel stages (mean size, recall of held-out positives)": json.dumps(stages),
        "model version": model.version,
    }
    paths = write_report(results, out / "report", "Offline evaluation: synthetic data", context, ks=ks,
                         extra_tables={"Mitigation: logQ correction on the candidate generator": pd.DataFrame(mitigation_rows)}
                         if mitigation_rows else None)
    return {"results": results, "stages": stages, "mitigation": mitigation_rows, "paths": paths}
