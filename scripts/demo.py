#!/usr/bin/env python
"""The main job, end to end: data -> NVTabular -> Merlin Models -> Triton funnel -> gRPC queries.

1. generate the embedded synthetic dataset (seeded, with a known ground truth)
2. run the NVTabular dataset pipeline (join, temporal split, feature workflow)
3. train the two-tower candidate generator, the light and the heavy DCN ranker (Merlin Models, TensorFlow)
4. export a versioned Triton model repository (the funnel ensemble) and run the correctness checklist
5. write the offline evaluation report: the exported funnel beside Pop, EASE and ALS, slices,
   popularity bias, ordering policies (scripts/evaluate.py adds the retrained mitigation variants)
6. start the real tritonserver on free ports
7. query it over gRPC for a few users (and one the models never saw)
8. stop the server
"""

import argparse
import json
import sys
import textwrap
import time
from pathlib import Path

from configs.cli import config_file, fresh_workdir, int64, positive_int
from configs.runtime import quiet_known_warnings

quiet_known_warnings()  # before TensorFlow is imported


class Steps:
    """Numbered, timed progress lines for the long steps."""

    def __init__(self, total: int):
        self.total, self.n, self.start = total, 0, time.monotonic()

    def __call__(self, title: str):
        self.n += 1
        print(f"\n[{self.n}/{self.total}] {title}", flush=True)
        return _Timer()


class _Timer:
    def __enter__(self):
        self.t = time.monotonic()
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            print(f"      done in {time.monotonic() - self.t:.1f}s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=config_file, help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--workdir", default="build/demo", help="where data, models and the repository go")
    parser.add_argument("--users", type=int64, nargs="*", help="user ids to query (default: 3 known + 1 unknown)")
    parser.add_argument("--k", type=positive_int, default=10)
    parser.add_argument("--json", help="also write the responses and timings to this JSON file")
    args = parser.parse_args()

    from configs import load_config  # light; the file was validated at parse time (config_file)

    config = load_config(args.config)
    if args.k > config.serving.max_k:
        parser.error(f"argument --k: at most serving.max_k={config.serving.max_k}, got {args.k}")
    if args.json and not Path(args.json).resolve().parent.is_dir():  # written at the end, after the whole run
        parser.error(f"argument --json: no folder {Path(args.json).resolve().parent} to write {args.json} into")
    if args.json and Path(args.json).is_dir():  # was IsADirectoryError, a traceback after the whole run
        parser.error(f"argument --json: {args.json} is a folder, not a file")
    wall = time.monotonic()
    steps = Steps(9)
    work = fresh_workdir(parser, args.workdir)  # the demo always starts from nothing

    with steps("Importing Merlin (NVTabular, Merlin Models, TensorFlow)"):
        from deployment.export import export_repository
        from deployment.server import TritonServer
        from evaluation.checklist import run_checklist
        from evaluation.pipeline import evaluate_synthetic
        from evaluation.tuning import train_tuned
        from models.tracking import store_location
        from models.tuning import describe
        from serving.client import FunnelClient
        from workflows.pipeline import run_dataset_pipeline
        from workflows.report import summary_table
        from workflows.sources.synthetic import generate

    verbose = 1 if sys.stdout.isatty() else 2

    with steps("Generating the synthetic dataset"):
        data = generate(config.synthetic)
        raw = data.write_parquet(work / "raw")
        print(
            f"      {len(data.events):,} events, {len(data.users):,} users, {len(data.items):,} items, "
            f"click rate {data.events['click'].mean():.3f}"
        )

    with steps("Running the NVTabular dataset pipeline"):
        processed = run_dataset_pipeline(raw["events"], raw["users"], raw["items"], work / "processed", config.workflow)
        print(textwrap.indent(summary_table(processed.summary), "      "))

    with steps("Training the two-tower candidate generator, the light and the heavy DCN ranker"):
        model = train_tuned(processed, config, work / "registry", verbose=verbose)
        metrics = model.manifest["metrics"]
        heavy = metrics["heavy_ranker"]
        heads = ", ".join(f"{k[4:]} {v:.3f}" for k, v in heavy.items() if k.startswith("auc_"))
        print(
            f"      model version {model.version}: two-tower in-batch recall@10 "
            f"{metrics['candidate_generator']['recall_at_10']:.3f}, light ranker AUC "
            f"{metrics['light_ranker']['auc']:.3f}, heavy ranker AUC per head: {heads}"
        )
        print(
            "      heavy score = "
            f"{' + '.join(f'{w:.2f}*P({t})' for t, w in model.manifest['heavy_ranker']['weights'].items())}; "
            f"MLflow run logged under {store_location(config.training, work / 'registry')}"
        )
        tuned = model.manifest.get("tuning")
        if tuned:
            chosen = describe(tuned["chosen"])
            print(
                f"      tuned on the validation part ({len(tuned['trials'])} trials, {tuned['users']} users): "
                f"{chosen}; validation {tuned['metric']} {tuned['best']:.4f}"
            )

    with steps("Exporting the Triton model repository and running the correctness checklist"):
        repo = export_repository(model, work / "triton_repo")
        print(f"      {repo}")
        checks = run_checklist(model.path, repo, sample_users=5)
        for check in checks:
            print(f"      {check.label}  {check.name}")
        if not all(c.passed for c in checks):
            raise SystemExit("the correctness checklist failed; not serving this export")

    with steps("Writing the offline evaluation report (the funnel beside Pop, EASE and ALS)"):
        evaluation = evaluate_synthetic(
            config,
            work / "evaluation",
            ks=(10, 20),
            mitigation=False,
            world=data,
            processed=processed,
            trained=(model, repo),
        )
        for r in evaluation["results"]:
            print(
                f"      {r.name:<16} ndcg@10 {r.metrics['ndcg@10']:.4f}  recall@10 {r.metrics['recall@10']:.4f}  "
                f"coverage@20 {r.bias['coverage']:.3f}"
            )
        print(f"      {evaluation['paths']['html']}")

    server = TritonServer(repo, log_path=work / "tritonserver.log")
    results = []
    try:
        with steps("Starting tritonserver"):
            server.start()
            print(f"      ready, listening on {server.listening()}")

        with steps("Querying the funnel over gRPC"):
            users = args.users or [*data.users["user_id"].head(3).tolist(), int(data.users["user_id"].max()) + 1000]
            with FunnelClient(server.grpc_url) as client:
                for user in users:
                    t = time.monotonic()
                    recs = client.recommend(user, args.k)
                    ms = (time.monotonic() - t) * 1000
                    results.append({**recs.to_dict(), "latency_ms": round(ms, 2)})
                    counts = " -> ".join(f"{k} {v}" for k, v in recs.stage_counts.items())
                    print(f"\n  user {user} ({recs.served_by}, model v{recs.model_version}, {ms:.1f} ms)")
                    print(f"  funnel: {counts}")
                    for rank, (item, score) in enumerate(zip(recs.item_ids, recs.scores), 1):
                        print(f"    {rank:2d}. item {item:>6d}  score {score:.4f}")
    finally:
        server.stop()
        print("\n[9/9] tritonserver stopped")

    total = time.monotonic() - wall
    print(f"\nTotal wall time: {total:.1f}s")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "wall_time_s": round(total, 1)}, indent=2))


if __name__ == "__main__":
    main()
