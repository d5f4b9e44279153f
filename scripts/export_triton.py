#!/usr/bin/env python
"""Export a model-registry version as a Triton model repository (the funnel ensemble), atomically.
Exports and rollouts into one folder take turns (a lock on it): this waits for one already running,
at most an hour (deployment.export.LOCK_TIMEOUT_S)."""

from configs.runtime import quiet_known_warnings

quiet_known_warnings()  # before TensorFlow is imported

import argparse
from pathlib import Path

from deployment.export import RepositoryBusyError, batching_of, export_repository, exported_version
from models import registry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--registry", default="artifacts/registry", help="model registry folder")
    parser.add_argument(
        "--version", type=int, help="registry version (default: the latest one the retraining run did not refuse)"
    )
    parser.add_argument("--out", default="build/triton_repo", help="model repository to write")
    parser.add_argument("--replace", action="store_true", help="swap out an existing repository")
    parser.add_argument(
        "--fuse-stages",
        action=argparse.BooleanOptionalAction,
        help="every stage in one model, one hop per request (default: the version's serving.batching.fuse_stages)",
    )
    args = parser.parse_args()
    try:
        model = registry.get(args.registry, args.version)
    except FileNotFoundError as err:  # no such version, or a folder that is no registry
        parser.error(f"argument --registry: {err}")
    out = Path(args.out)  # what export_repository refuses (again, under its lock), as an argument error
    if out.exists() and not args.replace:
        parser.error(f"argument --out: {out} exists; pass --replace to swap in the new export")
    if out.exists() and not out.is_dir():
        parser.error(f"argument --out: {out} is a file, not an exported model repository")
    if out.is_dir() and any(out.iterdir()):
        try:
            exported_version(out)  # only an export is replaced, never a folder named by mistake
        except FileNotFoundError as err:
            parser.error(f"argument --out: {err}")
    batching = batching_of(model.manifest)
    if args.fuse_stages is not None:
        batching.fuse_stages = args.fuse_stages
    try:
        repo = export_repository(model, args.out, replace=args.replace, batching=batching)
    except RepositoryBusyError as err:  # another writer held the folder past LOCK_TIMEOUT_S: nothing changed
        raise SystemExit(f"export: {err}") from None
    layout = "fused (one model)" if batching.fuse_stages else "seven stage models"
    print(f"exported version {model.version} to {repo}: {layout}")


if __name__ == "__main__":
    main()
