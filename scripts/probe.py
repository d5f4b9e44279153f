#!/usr/bin/env python
"""Deep health check: exit 0 if the funnel answers one real request, 1 (and say why) if it does not.

Sends the supervisor's probe (deployment/supervisor.py: funnel_probe), one gRPC recommendation
request through every stage of the funnel (an unknown user still passes all of them), so it fails
when any stage's stub is dead or stuck, which Triton's own health endpoints do not notice. Made for
Kubernetes exec probes and Docker health checks (deployment/kubernetes/, compose.yaml,
docs/deployment.md):

    .venv/bin/python scripts/probe.py --url 127.0.0.1:8001
"""

import argparse
import sys
from pathlib import Path

from deployment.supervisor import funnel_probe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="127.0.0.1:8001", help="the server's gRPC address (scripts/serve.py)")
    parser.add_argument("--tls-ca", help="PEM file that signed the server's certificate, when its gRPC speaks TLS")
    args = parser.parse_args(argv)
    if args.tls_ca and not Path(args.tls_ca).is_file():  # a deployment's mistake, not an unhealthy server
        parser.error(f"argument --tls-ca: no such file: {args.tls_ca}")
    try:
        funnel_probe(args.url, args.tls_ca)
    except Exception as err:  # any failure is an unhealthy server: say which, exit non-zero
        print(f"funnel probe failed at {args.url}: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(f"funnel answered at {args.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
