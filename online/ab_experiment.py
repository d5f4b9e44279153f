"""A simulated A/B test against the live server, end to end (``scripts/ab_test.py``, notebook 05).

1. generate the synthetic world and run the dataset pipeline once;
2. train the **control** (the config as given: model version 1) and the **treatment** (the config
   with ``online.experiment.treatment_overrides``: version 2) on the same data;
3. export version 1, add version 2 beside it, start tritonserver (explicit model control);
4. start the experiment: ``ab_router`` assigns users by hashing their id with the experiment's salt
   (``holdout`` of them stay on the control), each arm served by its own version-pinned funnel;
5. simulated users (``online/simulator.py``) ask ``ab_router`` over gRPC for ``simulation.days``
   days and send their reactions to the server's ``feedback`` endpoint;
6. read the result from the server's feedback log (``online/ab_report.py``): tests, SRM, sample size,
   decision; scrape the per-arm Prometheus counters; write the report;
7. if the decision is to ship, roll the treatment out to everyone but the holdout and check that the
   holdout is still served by the control model.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from configs import Config, check_treatment_overrides, with_overrides


def train_arms(config: Config, work: Path, log: Callable[[str], None] = print):
    """Data once, then the control (version 1) and the treatment (version 2) models."""
    from models.train import RANKER_INPUTS, train_all
    from workflows.pipeline import run_dataset_pipeline
    from workflows.sources.synthetic import generate

    world = generate(config.synthetic)
    raw = world.write_parquet(work / "raw")
    processed = run_dataset_pipeline(raw["events"], raw["users"], raw["items"], work / "processed", config.workflow)
    started = time.monotonic()
    control = train_all(processed, config, work / "registry", verbose=0)
    log(f"control model v{control.version} trained in {time.monotonic() - started:.0f}s")
    treatment_config = treatment_of(config)
    overridden = set(config.online.experiment.treatment_overrides)
    if "workflow" in overridden:  # e.g. new features: the treatment trains on its own processed data
        processed = run_dataset_pipeline(
            raw["events"], raw["users"], raw["items"], work / "processed-treatment", treatment_config.workflow
        )
    # A treatment that changes nothing the rankers see (the default: the candidate generator's logQ
    # correction) reuses the control's rankers: both arms then differ only in what is tested.
    reuse = not overridden & {*RANKER_INPUTS, "workflow"}
    started = time.monotonic()
    treatment = train_all(
        processed, treatment_config, work / "registry", verbose=0, rankers_from=control if reuse else None
    )
    log(
        f"treatment model v{treatment.version} ({json.dumps(config.online.experiment.treatment_overrides)}) "
        f"trained in {time.monotonic() - started:.0f}s" + (" (rankers reused from the control)" if reuse else "")
    )
    return world, control, treatment


def treatment_of(config: Config) -> Config:
    """The control's config with the experiment's overrides applied (validated like any config);
    overrides of what both arms share (``configs.SHARED_BY_ARMS``) are refused."""
    check_treatment_overrides(config.online.experiment.treatment_overrides)
    return with_overrides(config, config.online.experiment.treatment_overrides)


def online_counters(metrics_url: str, requests: int = 0, feedback: int = 0, timeout: float = 10.0) -> pd.DataFrame:
    """The per-arm online counters the server exports to Prometheus, as one table.

    The router and the feedback endpoint record their counters on a background thread after they
    answer; pass how many ``requests`` were served and ``feedback`` requests accepted to wait
    (at most ``timeout`` seconds) until the scrape includes all of them.

    A scrape is not atomic: it reads the families one after the other, ``online_clicks_total``
    before ``online_feedback_total`` and ``online_impressions_total`` before
    ``online_request_latency_ms_count``, while the recorder adds a batch's clicks and impressions
    before the count it adds last. So the first scrape that counts every request can have read a
    click or impression counter just before the last batch reached it. The table is read from the
    scrape after one that settled, with the same totals: it began once all of them were recorded."""
    from serving.metrics import FEEDBACK_COUNTERS, online_settled, scrape

    def recorded(metrics) -> tuple:
        names = ("online_requests_total", "online_request_latency_ms_count", "online_feedback_total")
        return tuple(sum(value for _, value in metrics.get(name, [])) for name in names)

    deadline = time.monotonic() + timeout
    settled = None  # the totals of the last scrape that settled
    while True:
        metrics = scrape(metrics_url)
        settles = online_settled(metrics, requests, feedback)
        if settles and recorded(metrics) == settled:
            break
        settled = recorded(metrics) if settles else None
        if time.monotonic() > deadline:
            served, timed, fed = recorded(metrics)
            if timed >= requests and fed >= feedback:  # reached, but other traffic kept them moving
                raise TimeoutError(
                    f"online counters at {metrics_url} did not hold still within {timeout:.0f}s (last read "
                    f"{served:g} requests, {timed:g} timed, {fed:g} feedback): read them once the traffic stops"
                )
            raise TimeoutError(
                f"online counters at {metrics_url} did not reach {requests} requests and "
                f"{feedback} feedback requests within {timeout:.0f}s"
            )
        if settled is None:  # else read again at once: the scrape that holds all of it
            time.sleep(0.05)
    names = {
        "online_requests_total": "requests",
        "online_impressions_total": "impressions",
        "online_fallback_total": "fallback",
        "online_feedback_total": "feedback requests",
    }
    names.update({name: event for event, (name, _) in FEEDBACK_COUNTERS.items()})
    rows: dict[tuple, dict] = {}
    for name, column in names.items():
        for labels, value in metrics.get(name, []):
            key = (labels.get("arm", ""), labels.get("version", ""))
            rows.setdefault(key, {"arm": key[0], "version": key[1]})[column] = value
    table = pd.DataFrame(list(rows.values()))
    if not table.empty and {"click", "impressions"} <= set(table.columns):
        table["ctr"] = table["click"] / table["impressions"]
    return table.sort_values(["arm", "version"]).reset_index(drop=True) if not table.empty else table


def run_ab_test(
    config: Config,
    workdir: str | Path,
    users: int | None = None,
    roll_out: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Run steps 1-7; return the analysis, the report paths and what the rollout check saw."""
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    world, control, treatment = train_arms(config, work, log)
    return serve_ab_test(config, work, world, control, treatment, users=users, roll_out=roll_out, log=log)


def serve_ab_test(
    config: Config,
    workdir: str | Path,
    world,
    control,
    treatment,
    repo: str | Path | None = None,
    users: int | None = None,
    roll_out: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Steps 3-7 for two trained versions of one world's data (``train_arms``, or the same models
    with other settings, as ``online/retention.py`` makes): export ``control`` (or serve the ``repo``
    it is already exported to), add ``treatment``, run the experiment, analyse it, roll out a winner."""
    from deployment.export import export_repository
    from deployment.rollout import add_version, current_rollout
    from deployment.server import TritonServer
    from online.ab_report import analyze, write_ab_report
    from online.experiments import roll_out_treatment, start_experiment
    from online.feedback_log import FeedbackLog
    from online.router import LOG_ENV, feedback_log_path
    from online.simulator import UserSimulator
    from serving.assignment import ab_rollout
    from serving.client import FunnelClient
    from serving.interface import ROUTER
    from workflows.live_store import describe

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    if repo is None:
        repo = export_repository(control, work / "triton_repo", replace=True)
    add_version(treatment, repo)
    log_path = feedback_log_path(repo)
    # The log beside the repository is this run's: a fresh one (and its WAL files). One that
    # $FUNNEL_FEEDBACK_LOG names (a file or PostgreSQL) is the deployment's: it keeps its rows.
    if isinstance(log_path, Path) and not os.environ.get(LOG_ENV):
        for stale in log_path.parent.glob(log_path.name + "*"):
            stale.unlink()
    began = time.time()  # a log that keeps earlier rows: read only this experiment's
    exp = config.online.experiment
    rollout = ab_rollout(
        exp.name, exp.salt, int(control.version), int(treatment.version), exp.holdout, exp.treatment_share
    )
    population = world.users["user_id"].to_numpy()
    if users is not None:
        population = population[:users]
    result: dict = {"repo": repo, "feedback_log": log_path}
    with TritonServer(repo, log_path=work / "tritonserver.log") as server:
        router_version = start_experiment(server.grpc_url, repo, rollout)
        log(
            f"experiment {exp.name!r} on ab_router v{router_version}: control v{control.version}, "
            f"treatment v{treatment.version}, holdout {exp.holdout:.0%} on v{control.version}"
        )
        with FunnelClient(server.grpc_url, model_name=ROUTER) as client:
            simulator = UserSimulator(world, config.synthetic, config.online.simulation)
            started = time.monotonic()
            outcomes = simulator.run(
                population,
                client.recommend,
                feedback=lambda rid, user, items, events, values: client.send_feedback(rid, items, events, values),
                progress=False,
            )
            seconds = time.monotonic() - started
            log(
                f"simulated {len(population)} users over {outcomes['day'].nunique()} days: {len(outcomes):,} "
                f"requests in {seconds:.0f}s ({len(outcomes) / seconds:.0f} requests/s with feedback)"
            )
            # This experiment's responses only: another one may log into a shared log at the same time
            # with the same arm names (``of_experiment``; rows of unknown experiment are cut by time).
            # Filtered in the database: a deployment's log holds millions of rows of other periods.
            feedback_log = FeedbackLog(log_path)
            try:
                impressions = feedback_log.impressions(since=began, experiment=exp.name)
                empty = feedback_log.empty_responses(since=began, experiment=exp.name)
                feedback = feedback_log.feedback(since=began, experiment=exp.name)
            finally:
                feedback_log.close()
            result["counters"] = online_counters(server.metrics_url, len(outcomes), feedback["request_id"].nunique())
            analysis = analyze(impressions, feedback, rollout, exp, len(world.items), empty_responses=empty)
            context = {
                "experiment": f"{exp.name} (salt {exp.salt}); "
                f"treatment = control + {json.dumps(exp.treatment_overrides)}",
                "versions": f"control v{control.version}, treatment v{treatment.version}, "
                f"holdout on v{control.version}",
                "traffic": f"{len(population)} simulated users, {outcomes['day'].nunique()} days, "
                f"{len(outcomes):,} requests through ab_router over gRPC; feedback through the feedback endpoint",
                "source of the numbers": f"the server's feedback log {describe(log_path)}",
            }
            result["paths"] = write_ab_report(analysis, work / "report", "A/B test: " + exp.name, context, outcomes)
            result.update(analysis=analysis, outcomes=outcomes, simulate_seconds=seconds)

            if roll_out and analysis.decision.startswith("SHIP"):
                shipped = roll_out_treatment(server.grpc_url, repo)
                assert current_rollout(repo).versions == shipped.versions
                sample = population[: min(len(population), 400)]
                served = pd.DataFrame(
                    [
                        {"user_id": int(u), "arm": r.arm, "model_version": r.model_version}
                        for u in sample
                        for r in [client.recommend(int(u), config.online.simulation.k)]
                    ]
                )
                result["after_rollout"] = served.groupby(["arm", "model_version"]).size().rename("users").reset_index()
                log(
                    "rolled out: "
                    + ", ".join(
                        f"{r.arm} -> v{r.model_version} ({r.users} users)" for r in result["after_rollout"].itertuples()
                    )
                )
    return result
