#!/usr/bin/env python
"""Ask the served funnel for a user's recommendations over gRPC, leaving out the --exclude item ids;
waits at most --timeout seconds (30 by default) for the answer (serving/client.py FunnelClient).
Exit 0 on an answer, 1 when the server refused the request, was down or did not answer (the reason
on stderr), 2 for a bad argument."""

import argparse
import json
import sys
from pathlib import Path

from configs.cli import grpc_url, int64, positive_int, positive_seconds
from serving.client import FunnelClient


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--user-id", type=int64, required=True)
    parser.add_argument("--k", type=positive_int, default=10, help="how many items (an INT32: at most 2**31 - 1)")
    parser.add_argument(
        "--url",
        type=grpc_url,
        default="127.0.0.1:8001",
        help="gRPC address of tritonserver: host:port (or dns:///host:port, unix:/path)",
    )
    parser.add_argument(
        "--exclude",
        type=int64,
        nargs="+",
        metavar="ID",
        help="raw item ids never to return (the request's exclude_item_ids, e.g. what the page already shows)",
    )
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=30.0,
        metavar="SECONDS",
        help="the longest to wait for the answer (default: %(default)g)",
    )
    parser.add_argument("--json", action="store_true", help="print the response as JSON")
    parser.add_argument("--tls-ca", help="PEM file that signed the server's certificate, when its gRPC speaks TLS")
    args = parser.parse_args(argv)
    if args.k >= 2**31:  # the request's k is INT32
        parser.error(f"argument --k: must be at most {2**31 - 1}, got {args.k}")
    if args.tls_ca and not Path(args.tls_ca).is_file():
        parser.error(f"argument --tls-ca: no such file: {args.tls_ca}")
    try:
        with FunnelClient(args.url, timeout_s=args.timeout, root_certificates=args.tls_ca) as client:
            recs = client.recommend(args.user_id, args.k, exclude_item_ids=args.exclude)
    except Exception as err:  # tritonclient raises InferenceServerException with the server's message
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    if args.json:
        print(json.dumps(recs.to_dict()))
        return
    print(f"user {recs.user_id}: served by {recs.served_by}, model version {recs.model_version}")
    print("stages: " + " -> ".join(f"{name} {n}" for name, n in recs.stage_counts.items()))
    for rank, (item, score) in enumerate(zip(recs.item_ids, recs.scores), 1):
        print(f"  {rank:2d}. item {item:>8d}  score {score:.4f}")


if __name__ == "__main__":
    main()
