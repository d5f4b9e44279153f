#!/usr/bin/env python
"""Run the correctness checklist on a model version (and its Triton export); exit 1 if any check fails
or cannot verify the version (N/V: a version trained before what it needs was saved)."""

from configs.runtime import quiet_known_warnings

quiet_known_warnings()  # before TensorFlow is imported

import argparse
import sys

from evaluation.checklist import run_checklist
from models import registry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--registry", default="artifacts/registry", help="model registry folder")
    parser.add_argument(
        "--version", type=int, help="registry version (default: the one --repo exports, else the latest)"
    )
    parser.add_argument("--repo", help="exported Triton model repository to check as well")
    args = parser.parse_args()
    version = args.version
    if args.repo:  # checked with --version too: a wrong --repo was a traceback in the checks
        from deployment.export import exported_version

        try:
            exported = exported_version(args.repo)
        except FileNotFoundError as err:
            parser.error(f"argument --repo: {err}")
        version = exported if version is None else version
    try:
        model = registry.get(args.registry, version)
    except FileNotFoundError as err:  # no such version, or a folder that is no registry
        parser.error(f"argument --registry: {err}")
    results = run_checklist(model.path, args.repo)
    for r in results:
        print(f"{r.label}  {r.name:<24} {r.detail}")
    failed = [r.name for r in results if not r.passed]
    # A check the version cannot be verified by (one trained before what it needs was saved) is no pass either.
    unverifiable = sum(not r.verifiable for r in results)
    print(
        f"{len(results) - len(failed)} passed, {len(failed)} failed"
        + (f" ({unverifiable} not verifiable)" * bool(unverifiable))
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
