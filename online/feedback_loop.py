"""The feedback-loop experiment: retrain for several generations on the system's own logs.

Generation 0 trains on the world's original log. Each generation then serves simulated users for a
few days (the funnel runs in-process through the exported stage classes, exactly as served), logs
every impression and reaction, appends the log to the training data and retrains. A ``holdout``
share of users stays on generation 0's model throughout. What to watch:

* the item-share curve of the live model's slates: if popularity bias compounds, fewer distinct
  items make up the same share of recommendations generation after generation;
* the live arm against the holdout: CTR tested with users as the unit (``holdout_test``: the delta
  method, with an interval from resampling users), watch time and retention per arm beside it, so a
  model that degrades as it learns mostly from its own logs shows up against the frozen control.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from configs import Config
from evaluation import popularity_bias as pb
from online import ab_testing as ab
from online.feedback_log import FeedbackLog, to_events
from online.simulator import SimulationConfig, UserSimulator, per_arm_summary
from serving.assignment import HOLDOUT, Experiment
from workflows.local_parquet import read_parquet


@dataclass
class Generation:
    generation: int
    model_version: int
    training_events: int
    share_curve: dict
    gini: float
    coverage: float
    live: dict
    holdout: dict
    ctr_test: dict


def _train_and_load(raw_dir: Path, out: Path, config: Config, registry: Path):
    from deployment.export import export_repository
    from evaluation.offline import load_funnel
    from models.train import train_all
    from workflows.pipeline import run_dataset_pipeline

    processed = run_dataset_pipeline(
        raw_dir / "events.parquet",
        raw_dir / "users.parquet",
        raw_dir / "items.parquet",
        out / "processed",
        config.workflow,
    )
    model = train_all(processed, config, registry, verbose=0)
    repo = export_repository(model, out / "triton_repo")
    return model, load_funnel(repo, model.version), len(read_parquet(processed.train_events))


def _seeded(stages: list, seed: int) -> list:
    """``stages`` with a copy of the ordering stage whose exploration (``serving.ordering.
    exploration_temperature`` > 0) draws from ``seed``: as loaded, it draws from fresh entropy."""
    return [s.with_policy(s.policy, seed=seed) if getattr(s, "name", None) == "ordering" else s for s in stages]


def run_feedback_loop(
    config: Config,
    out_dir: str | Path,
    generations: int = 3,
    simulation: SimulationConfig | None = None,
    holdout: float = 0.05,
) -> list[Generation]:
    from configs.cli import WORKDIR_MARK
    from evaluation.offline import close_funnel, run_funnel
    from workflows.sources.synthetic import generate

    out = Path(out_dir)
    # A run appends to gen<N>/feedback.sqlite and numbers its models after the registry's: into an
    # earlier run's folder it would mix both runs' logs, training data and figures.
    if out.is_dir() and any(p.name != WORKDIR_MARK for p in out.iterdir()):
        raise FileExistsError(f"{out} holds an earlier run (or other files): name a new or empty folder")
    # In-process stages (one SQLite connection, one TF graph each) are called from one thread.
    sim_cfg = dataclasses.replace(simulation or SimulationConfig(), concurrency=1)
    world = generate(config.synthetic)
    raw = out / "gen0" / "raw"
    world.write_parquet(raw)
    registry = out / "registry"
    config = copy.deepcopy(config)
    config.workflow.split.valid_fraction = 0.1  # keep most of each generation's logs for training
    config.workflow.split.test_fraction = 0.0  # nothing here scores a test period: it would hold out 10% more

    model0, holdout_stages, n_train = _train_and_load(raw, out / "gen0", config, registry)
    live_model, live_stages = model0, holdout_stages
    experiment = Experiment("feedback-loop", salt="feedback-loop", arms={"live": 1.0}, holdout=holdout, control="live")
    users = world.users["user_id"].to_numpy()
    events = world.events
    simulator = UserSimulator(world, config.synthetic, sim_cfg)
    history = []
    try:
        for g in range(1, generations + 1):
            # Each generation's orderings explore (if they do) from the simulation's seed, the holdout's
            # on a copy of its own: its slates repeat in every generation, and a run repeats.
            gen_live, gen_holdout = (_seeded(s, sim_cfg.seed) for s in (live_stages, holdout_stages))

            def recommend(user, k, arm, live_stages=gen_live, holdout_stages=gen_holdout):
                out_ = run_funnel(holdout_stages if arm == HOLDOUT else live_stages, int(user), k)
                return SimpleNamespace(
                    item_ids=out_["item_ids"],
                    model_version=str(out_["model_version"][0].decode()),
                    served_by=out_["served_by"][0].decode(),
                )

            gen_dir = out / f"gen{g}"
            log = FeedbackLog(gen_dir / "feedback.sqlite")
            try:
                outcomes = simulator.run(users, recommend, experiment.assign, log)
                slates = log.impressions()
                live_slates = slates[slates["arm"] != HOLDOUT]
                summary = per_arm_summary(outcomes)
                live, hold = summary.loc["live"], summary.loc[HOLDOUT] if HOLDOUT in summary.index else None
                test = holdout_test(log) if hold is not None else {}
                items = live_slates["item_id"].to_numpy()
                catalog = len(world.items)
                history.append(
                    Generation(
                        generation=g,
                        model_version=int(live_model.version),
                        training_events=n_train,
                        share_curve=pb.item_share_curve(items),
                        gini=pb.gini(np.searchsorted(np.sort(world.items["item_id"]), items), catalog),
                        coverage=len(np.unique(items)) / catalog,
                        live=live.to_dict(),
                        holdout=hold.to_dict() if hold is not None else {},
                        ctr_test=test,
                    )
                )
                # Retrain on everything so far plus this generation's own logs.
                new_events = to_events(log, start_timestamp=int(events["timestamp"].max()) + 1)
            finally:  # the generation's log is read to its end here: its connection is not kept
                log.close()
            events = pd.concat([events, new_events], ignore_index=True)
            raw = gen_dir / "raw"
            raw.mkdir(parents=True, exist_ok=True)
            events.to_parquet(raw / "events.parquet", index=False)
            world.users.to_parquet(raw / "users.parquet", index=False)
            world.items.to_parquet(raw / "items.parquet", index=False)
            if g < generations:
                if live_stages is not holdout_stages:  # the generation before's: served no more
                    close_funnel(live_stages)
                live_model, live_stages, n_train = _train_and_load(raw, gen_dir, config, registry)
        return history
    finally:  # the stages hold the stores' connections (the holdout's and the live arm's)
        close_funnel(holdout_stages)
        if live_stages is not holdout_stages:
            close_funnel(live_stages)


def holdout_test(log: FeedbackLog) -> dict:
    """Live vs holdout CTR in one generation's log, users as the unit (``ab.ratio_delta_test``: a
    user's impressions are not independent trials, so a z-test over impressions is over-confident),
    with a 95% interval from resampling users beside the delta method's."""
    from online.ab_report import ctr_bootstrap, per_user

    users = per_user(log.impressions(), log.feedback(), log.empty_responses())
    live, hold = users[users["arm"] == "live"], users[users["arm"] == HOLDOUT]
    test = ab.ratio_delta_test(hold["clicks"], hold["impressions"], live["clicks"], live["impressions"], "ctr")
    test = test.to_dict()
    test["user_bootstrap_low"], test["user_bootstrap_high"] = ctr_bootstrap(hold, live)
    return test


def history_table(history: list[Generation]) -> pd.DataFrame:
    rows = []
    for h in history:
        rows.append(
            {
                "generation": h.generation,
                "model version": h.model_version,
                "training events": h.training_events,
                "items for 50% of recs": h.share_curve.get(0.5),
                "items for 90% of recs": h.share_curve.get(0.9),
                "gini": h.gini,
                "coverage": h.coverage,
                "live ctr": h.live.get("ctr"),
                "holdout ctr": h.holdout.get("ctr"),
                "live retention": h.live.get("retention"),
                "holdout retention": h.holdout.get("retention"),
                "ctr diff (live - holdout)": h.ctr_test.get("difference"),
                "p (users as the unit)": h.ctr_test.get("p_value"),
                "diff 95% CI, users resampled": (
                    f"[{h.ctr_test['user_bootstrap_low']:+.4f}, {h.ctr_test['user_bootstrap_high']:+.4f}]"
                    if "user_bootstrap_low" in h.ctr_test
                    else None
                ),
            }
        )
    table = pd.DataFrame(rows)
    # Generation 1 serves the holdout's own model: its live-holdout gap is the two user groups'
    # baseline difference, so a model's drift is the change of the gap since then.
    table["gap change since generation 1"] = (
        table["ctr diff (live - holdout)"] - table["ctr diff (live - holdout)"].iloc[0]
    )
    return table


def write_loop_report(history: list[Generation], out_dir: str | Path, context: dict) -> dict[str, Path]:
    """The generation table and the item-share curve of each generation's live slates (HTML + Markdown)."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evaluation.report import figure_png, write_document

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = history_table(history)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for h in history:
        shares = sorted(h.share_curve)
        ax.plot([h.share_curve[s] for s in shares], shares, marker=".", label=f"generation {h.generation}")
    ax.set_xlabel("distinct items")
    ax.set_ylabel("share of all recommendations")
    ax.legend()
    plots = [("Item-share curve per generation (live arm)", figure_png(fig))]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(table["generation"], table["live ctr"], marker="o", label="live (retrained on its own logs)")
    ax.plot(table["generation"], table["holdout ctr"], marker="o", label="holdout (generation-0 model)")
    ax.set_xlabel("generation")
    ax.set_ylabel("CTR")
    ax.legend()
    plots.append(("CTR: live vs holdout", figure_png(fig)))
    paths = write_document(
        out, "Feedback loop: retraining on the system's own logs", context, [("Generations", table)], plots
    )
    (out / "history.json").write_text(json.dumps([h.__dict__ for h in history], indent=2, default=str))
    # What the run was (world, days, holdout share): a report rebuilt later describes this run, not its flags.
    (out / "context.json").write_text(json.dumps(context, indent=2, default=str))
    return {**paths, "json": out / "history.json"}


def reload_history(out_dir: str | Path) -> list[Generation]:
    """A finished run's generations, with the holdout tests recomputed from its feedback logs."""
    import json

    out = Path(out_dir)
    history = [
        Generation(**{**h, "share_curve": {float(k): v for k, v in h["share_curve"].items()}})
        for h in json.loads((out / "report" / "history.json").read_text())
    ]
    for h in history:
        if not h.holdout:  # no holdout users (``holdout`` 0): the run had no gap to test, nor has this
            continue
        log = FeedbackLog(out / f"gen{h.generation}" / "feedback.sqlite")
        h.ctr_test = holdout_test(log)
        log.close()
    return history
