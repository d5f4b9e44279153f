#!/usr/bin/env python
"""Append interactions that did not come through the router to the live store, so the next request
of each user sees them (workflows/live_store.py ``ingest_events``; docs/live-features.md).

    .venv/bin/python scripts/ingest_events.py events.csv --repository build/triton_repo

FILE: CSV, parquet or JSON lines with user_id, item_id, timestamp (seconds since the epoch) and
optionally event (view|click|watch_seconds|like|share; default view) and value (default 1).
All rows go in one transaction; any bad row: exit status 2, every defect listed, nothing written.
Ingesting the same file again adds nothing. The store is $FUNNEL_STORE_URL, else
<repository>-live.sqlite (or --store).
"""

import argparse
import sys

from workflows.live_store import EventFileError, describe, ingest_events, require_repository, store_location


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="events file (.csv, .parquet, .jsonl)")
    parser.add_argument("--repository", default="build/triton_repo", help="the served model repository")
    parser.add_argument("--store", help="the live store (a SQLite path or postgresql:// DSN) instead")
    args = parser.parse_args()
    try:
        if not args.store:
            require_repository(args.repository)
    except FileNotFoundError as e:
        parser.error(f"argument --repository: {e}")
    store = args.store or store_location(args.repository)
    try:
        new = ingest_events(store, args.file)
    except EventFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{new} new event(s) in {describe(store)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
