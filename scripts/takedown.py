#!/usr/bin/env python
"""Take an item out of every served list within seconds, or put it back (deployment/takedowns.py).

    .venv/bin/python scripts/takedown.py --repository build/triton_repo --item 1234 --reason "graphic violence"
    .venv/bin/python scripts/takedown.py --repository build/triton_repo --item 1234 --undo --reason "appeal upheld"
    .venv/bin/python scripts/takedown.py --repository build/triton_repo --list

Needs the deployment's admin key: $FUNNEL_ADMIN_KEY, else the key file beside the repository
(deployment/security.py). The live store is $FUNNEL_STORE_URL, else <repository>-live.sqlite.
Exit status 2 with a message when the key is wrong or missing or the arguments are bad.
"""

import argparse
import sys

from deployment.security import AdminKeyError, read_admin_key
from deployment.takedowns import list_takedowns, set_takedown
from workflows.live_store import require_repository


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", default="build/triton_repo", help="the served model repository")
    parser.add_argument("--item", type=int, help="raw item id")
    parser.add_argument("--reason", default="", help="why (recorded with the time and the user)")
    parser.add_argument("--undo", action="store_true", help="restore the item")
    parser.add_argument("--list", action="store_true", help="print every takedown and exit")
    args = parser.parse_args()
    try:
        require_repository(args.repository)
    except FileNotFoundError as e:
        parser.error(f"argument --repository: {e}")
    if args.list:
        print(list_takedowns(args.repository).to_string(index=False))
        return 0
    if args.item is None or not args.reason.strip():
        parser.error("--item and --reason are required (or --list)")
    if not -(2**63) <= args.item < 2**63:  # the store's ids are 64-bit: SQLite would raise OverflowError
        parser.error(f"argument --item: {args.item} is outside the 64-bit integer range of item ids")
    try:
        state = set_takedown(args.repository, args.item, args.reason, read_admin_key(args.repository), undo=args.undo)
    except AdminKeyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    status = "down" if state["active"] else "served again"
    print(f"item {args.item}: {status} ({state['reason']!r}, by {state['actor']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
