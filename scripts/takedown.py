#!/usr/bin/env python
"""Take an item out of every served list within seconds, or put it back (deployment/takedowns.py).

    .venv/bin/python scripts/takedown.py --repository build/triton_repo --item 1234 --reason "graphic violence"
    .venv/bin/python scripts/takedown.py --repository build/triton_repo --item 1234 --undo --reason "appeal upheld"
    .venv/bin/python scripts/takedown.py --repository build/triton_repo --list

Needs the deployment's admin key: $FUNNEL_ADMIN_KEY, else the key file beside the repository
(deployment/security.py). With --url the serving Triton confirms the key before anything is written:
without it a $FUNNEL_ADMIN_KEY is taken as the deployment's key, so only the server can say it is
wrong. The live store is $FUNNEL_STORE_URL, else <repository>-live.sqlite.
Exit status 2 with a message when the key is wrong or missing or the arguments are bad, and for an
--undo of an item that is not down (nothing is written). An --item that no exported version serves
is taken down with a warning naming it (it may be blocked before it arrives; it may be a typo).
--list only reads (no key, no store created): --item, --reason, --undo, --url or --tls-ca beside
it is an argument error.
"""

import argparse
import logging
import sys
from pathlib import Path

from configs.cli import grpc_url
from deployment.security import AdminKeyError, confirm_key_with_server, read_admin_key
from deployment.takedowns import NotTakenDownError, list_takedowns, set_takedown
from workflows.live_store import require_repository


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", default="build/triton_repo", help="the served model repository")
    parser.add_argument("--item", type=int, help="raw item id")
    parser.add_argument("--reason", help="why (recorded with the time and the user)")
    parser.add_argument("--undo", action="store_true", help="restore the item")
    parser.add_argument("--list", action="store_true", help="print every takedown and exit")
    parser.add_argument(
        "--url", type=grpc_url, help="the serving Triton's gRPC address: it confirms the key before the write"
    )
    parser.add_argument("--tls-ca", help="PEM file that signed the server's certificate, when its gRPC speaks TLS")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")  # an unknown --item
    if args.list:  # it only reads: a change asked for beside it would have been dropped in silence
        given = [
            flag
            for flag, value in (
                ("--item", args.item),
                ("--reason", args.reason),
                ("--url", args.url),
                ("--tls-ca", args.tls_ca),
            )
            if value is not None
        ]
        given += ["--undo"] if args.undo else []
        if given:
            parser.error(f"argument --list: not allowed with {', '.join(given)}")
    if args.tls_ca and not args.url:
        parser.error("argument --tls-ca: only with --url")
    if args.tls_ca and not Path(args.tls_ca).is_file():
        parser.error(f"argument --tls-ca: {args.tls_ca} is not a file")
    try:
        require_repository(args.repository)
    except FileNotFoundError as e:
        parser.error(f"argument --repository: {e}")
    if args.list:
        down = list_takedowns(args.repository)
        print(down.to_string(index=False) if len(down) else "no item has been taken down")
        return 0
    if args.item is None or not (args.reason or "").strip():
        parser.error("--item and --reason are required (or --list)")
    if not -(2**63) <= args.item < 2**63:  # the store's ids are 64-bit: SQLite would raise OverflowError
        parser.error(f"argument --item: {args.item} is outside the 64-bit integer range of item ids")
    try:
        key = read_admin_key(args.repository)
        if args.url:
            confirm_key_with_server(args.url, key=key, root_certificates=args.tls_ca)
        state = set_takedown(args.repository, args.item, args.reason, key, undo=args.undo)
    except (AdminKeyError, NotTakenDownError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    status = "down" if state["active"] else "served again"
    print(f"item {args.item}: {status} ({state['reason']!r}, by {state['actor']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
