#!/usr/bin/env python
"""Deep health check: exit 0 if the funnel answers one real request and every Python stub of the server
is alive, 1 (and say why) if not.

Sends the supervisor's probe (deployment/supervisor.py: funnel_probe), one gRPC recommendation
request through every stage of the funnel (an unknown user still passes all of them), so it fails
when any stage's stub is dead or stuck, which Triton's own health endpoints do not notice. Then runs
the supervisor's stub check (stub_probe): every instance of every READY Python-backend model version
(the A/B router's and the feedback endpoint's too, which the funnel request never reaches) must
still have its triton_python_backend_stub process. Triton 2.51 never restarts a dead stub: its
instance's requests fail ('Stub process ... is not healthy.') while the model stays READY. The
check finds the tritonserver serving --url's gRPC port among the processes the probe can see (inside
the server's container an exec probe shares its PID namespace), asks its control plane over plain
HTTP on its own host (its --http-port; --http-url to override) with the admin key
($FUNNEL_ADMIN_KEY, else the key file beside its model repository), and counts its stubs.

--stubs requires the check (no visible server or no key is a failure); by default it runs where it
can and is skipped, with a note on stderr, where the key is absent or no such server is visible (a
probe from another machine or container); --no-stubs skips it. Made for Kubernetes exec probes and
Docker health checks (deployment/kubernetes/, compose.yaml, docs/deployment.md):

    .venv/bin/python scripts/probe.py --url 127.0.0.1:8001
"""

import argparse
import sys
from pathlib import Path

from configs.cli import grpc_url
from deployment.supervisor import CannotCheck, funnel_probe, stub_check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--url", type=grpc_url, default="127.0.0.1:8001", help="the server's gRPC address (scripts/serve.py)"
    )
    parser.add_argument("--tls-ca", help="PEM file that signed the server's certificate, when its gRPC speaks TLS")
    parser.add_argument(
        "--stubs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="require (--stubs) or skip (--no-stubs) the stub check; default: run it where the admin key "
        "and the server's process are available, else skip it with a note",
    )
    parser.add_argument(
        "--http-url",
        help="the server's HTTP address for the stub check's control-plane calls "
        "(default: its --http-address/--http-port, 0.0.0.0 as 127.0.0.1)",
    )
    args = parser.parse_args(argv)
    if args.tls_ca and not Path(args.tls_ca).is_file():  # a deployment's mistake, not an unhealthy server
        parser.error(f"argument --tls-ca: no such file: {args.tls_ca}")
    try:
        funnel_probe(args.url, args.tls_ca)
    except Exception as err:  # any failure is an unhealthy server: say which, exit non-zero
        print(f"funnel probe failed at {args.url}: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    if args.stubs is False:
        print(f"funnel answered at {args.url} (stub check skipped: --no-stubs)")
        return 0
    try:
        checked = stub_check(args.url, args.http_url)
    except CannotCheck as why:
        if args.stubs:
            print(f"stub check failed at {args.url}: {why}", file=sys.stderr)
            return 1
        print(f"note: stub check skipped: {why}", file=sys.stderr)
        print(f"funnel answered at {args.url}")
        return 0
    except Exception as err:  # any failure is an unhealthy server: say which, exit non-zero
        print(f"stub check failed at {args.url}: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(f"funnel answered at {args.url}; all {checked} Python model instances have their stub")
    return 0


if __name__ == "__main__":
    sys.exit(main())
