#!/usr/bin/env python
"""Roll a registry version into a running server's repository without dropping requests.

Adds the version's stages to the repository (each stage folder moved in with one rename), loads
them through Triton's model-control API beside the serving version, then switches the `funnel`
ensemble (all steps pinned to the new version) in one reload. --retire removes the old version
afterwards. A version still in the repository (an older one kept for a roll back) is rolled out
from there. The server must run in explicit model-control mode (scripts/serve.py does). Where its
gRPC speaks TLS (serve.py --tls-cert), --tls-ca names the PEM file that signed its certificate.
Each model load may take --timeout seconds (300); a server that stops answering ends the tool
with one line naming it and the call. The add, switch and retire hold the repository's lock as one:
an export or another rollout into the same folder waits for them, and this tool waits (a warning
naming the holder) for one already running, at most an hour (LOCK_TIMEOUT_S).

    .venv/bin/python scripts/rollout.py --registry artifacts/registry --version 2 \\
        --repository build/triton_repo --url 127.0.0.1:8001 --retire
"""

from configs.runtime import quiet_known_warnings

quiet_known_warnings()  # before TensorFlow is imported

import argparse
import sys
from pathlib import Path

from tritonclient.utils import InferenceServerException

from configs.cli import grpc_url, positive_seconds
from deployment.export import RepositoryBusyError, repository_lock
from deployment.rollout import RolloutError, add_version, retire, roll_out, served_version
from deployment.security import AdminKeyError, ControlTimeout, confirm_key_with_server
from models import registry
from serving.interface import ensemble_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", default="artifacts/registry", help="model registry folder")
    parser.add_argument(
        "--version",
        type=int,
        help="registry version to roll in (default: the latest one the retraining run did not refuse)",
    )
    parser.add_argument("--repository", default="build/triton_repo", help="the served model repository")
    parser.add_argument("--url", type=grpc_url, default="127.0.0.1:8001", help="the server's gRPC address (host:port)")
    parser.add_argument("--retire", action="store_true", help="unload and delete the previous version afterwards")
    parser.add_argument("--tls-ca", help="PEM file that signed the server's certificate, when its gRPC speaks TLS")
    parser.add_argument(
        "--timeout",
        type=positive_seconds,  # inf was taken: gRPC's deadline overflowed, every load 'Deadline Exceeded' at once
        default=300.0,
        help="seconds each model load (and wait for it to be ready) may take (default: %(default)g)",
    )
    args = parser.parse_args()
    if args.tls_ca and not Path(args.tls_ca).is_file():
        parser.error(f"argument --tls-ca: no such file: {args.tls_ca}")
    try:
        model = registry.get(args.registry, args.version)
    except FileNotFoundError as err:  # no such version, or a folder that is no registry
        parser.error(f"argument --registry: {err}")
    try:
        served_version(args.repository)  # read again under the lock (switch)
    except FileNotFoundError as err:
        parser.error(f"argument --repository: {err}")
    # The server must answer the control plane with this deployment's key before the repository is
    # touched: a version added for a server that cannot load it would stay in the repository.
    # A bounded wait (SERVER_CHECK_TIMEOUT_S): a server that takes the connection and never answers
    # would otherwise hold the tool forever.
    try:
        confirm_key_with_server(args.url, args.repository, root_certificates=args.tls_ca)
    except AdminKeyError as err:
        raise SystemExit(f"rollout: {err}; the repository was not changed") from None
    # The add, the switch and the retire take turns with exports and other rollouts into this repository
    # as one (deployment.export.repository_lock): none of them comes in between, or swaps it out midway.
    try:
        with repository_lock(args.repository):
            switch(args, model)
    except RepositoryBusyError as err:  # another writer held it past LOCK_TIMEOUT_S: one line, nothing changed
        raise SystemExit(f"rollout: {err}") from None


def switch(args, model) -> None:
    """Add (unless there already), roll out and, with --retire, retire: under the repository's lock."""
    old = served_version(args.repository)  # again, under the lock: an export may have come first
    if (Path(args.repository) / ensemble_name(model.version)).is_dir():
        # Added before (the version a roll back returns to, or a rerun after a failed roll_out):
        # add_version refuses it, and roll_out checks that every stage of it is complete.
        print(f"version {model.version} is already in {args.repository}: rolling out that copy")
    else:
        add_version(model, args.repository)
    # A server that stops answering (ControlTimeout), a stage that never becomes ready (RolloutError) or
    # a server that goes away mid-roll is one line, not a traceback.
    try:
        roll_out(args.url, args.repository, model.version, timeout_s=args.timeout, root_certificates=args.tls_ca)
    except (ControlTimeout, RolloutError, InferenceServerException) as err:
        now = served_version(args.repository)
        raise SystemExit(f"rollout: rolling out version {model.version} failed: {err}; serving version {now}") from None
    print(f"serving version {model.version} (was {old})")
    if args.retire and int(old) == int(model.version):
        print(f"version {old} was already served: nothing to retire")
    elif args.retire:
        try:
            retire(args.url, args.repository, old, root_certificates=args.tls_ca, timeout_s=args.timeout)
        except ValueError as err:  # refused (an experiment's arm): the roll out itself succeeded
            print(f"version {old} not retired: {err}", file=sys.stderr)
            sys.exit(2)
        except (ControlTimeout, RolloutError, InferenceServerException) as err:
            raise SystemExit(
                f"rollout: serving version {model.version}; retiring version {old} failed: {err}"
            ) from None
        print(f"retired version {old}")


if __name__ == "__main__":
    main()
