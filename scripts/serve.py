#!/usr/bin/env python
"""Start the real tritonserver (bundled in nvidia-pytriton) on a model repository; Ctrl-C stops it.

Finds the binary, prepares the Python-backend stub for this interpreter, sets the library path,
waits until every model is ready, then prints the gRPC, HTTP and metrics addresses. With
--supervise, a probe request runs through the funnel every second, every Python model instance (the
A/B router's and the feedback endpoint's too) is checked for its stub process, and the server is
restarted on the same ports when it stops answering or a stub process died (Triton never restarts one).

It listens on 127.0.0.1 only unless --host says otherwise (--host 0.0.0.0 exposes it to the network:
give gRPC TLS with --tls-cert/--tls-key, or put a TLS proxy in front; see docs/security.md).
Loading, unloading and reconfiguring models need the deployment's admin key, written on first start
to <model-repository>-admin.key (mode 0600).

Only a complete export is served (scripts/export_triton.py writes one): a folder without export.json,
or one missing a piece of the version it records, is refused before any server starts (exit status 2).
"""

import argparse
import signal
import sys
import threading
from pathlib import Path

from configs.cli import port_or_zero
from deployment.export import check_complete, exported_version
from deployment.server import ServerError, TritonServer, bind_address, ports_in_use


def export_problem(repository: str | Path) -> str | None:
    """Why ``repository`` is no complete export, or None where it is one: the version its
    ``export.json`` records has every stage's config, model.py, manifest and artifacts and its
    ensembles (``deployment.export.check_complete``). An empty folder started tritonserver serving
    nothing; a partial export is never served."""
    try:
        version = exported_version(repository)
    except FileNotFoundError as err:
        return f"{err}; export one with scripts/export_triton.py"
    except (OSError, ValueError, KeyError, TypeError) as err:  # unreadable, not JSON, no version
        return f"{Path(repository) / 'export.json'} is unreadable ({type(err).__name__}: {err})"
    try:
        check_complete(Path(repository), str(version))
    except (RuntimeError, OSError, ValueError, KeyError, TypeError) as err:
        return f"{repository}: version {version}: {err}"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-repository", default="build/triton_repo")
    parser.add_argument("--grpc-port", type=port_or_zero, default=8001, help="0: a free one")
    parser.add_argument("--http-port", type=port_or_zero, default=8000, help="0: a free one")
    parser.add_argument("--metrics-port", type=port_or_zero, default=8002, help="0: a free one")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="IPv4 address (or a name resolving to one) gRPC, HTTP and metrics bind to (default: loopback only; "
        "0.0.0.0 = every interface)",
    )
    parser.add_argument("--tls-cert", help="PEM certificate: gRPC speaks TLS (use with --tls-key when exposing)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--log", help="server log file (default: a temporary file)")
    parser.add_argument(
        "--supervise",
        action="store_true",
        help="restart the server when the funnel stops answering or a Python stub dies",
    )
    args = parser.parse_args()
    given = {"--grpc-port": args.grpc_port, "--http-port": args.http_port, "--metrics-port": args.metrics_port}
    try:
        # A port another process listens on (a serve.py already running on the default ports): Triton
        # binds only after every model has loaded, minutes later, and then failed with a traceback.
        host = bind_address(args.host)
        taken = ports_in_use(host, [port for port in given.values() if port])
        if taken:
            flags = ", ".join(f"{flag} {port}" for flag, port in given.items() if port in taken)
            raise ValueError(
                f"{flags}: already in use on {host} (another server?); give other ports, or 0 for free ones"
            )
        server = TritonServer(
            args.model_repository,
            args.grpc_port,
            args.http_port,
            args.metrics_port,
            log_path=args.log,
            host=args.host,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
        )
    except (ValueError, FileNotFoundError) as err:  # a missing repository or TLS file, a host it cannot bind
        parser.error(str(err))
    problem = export_problem(args.model_repository)
    if problem is not None:
        server.cleanup()  # its scratch folder; nothing was started
        parser.error(f"argument --model-repository: {problem}")
    # The handler only sets ``stop``; the start asks it at every poll (``cancelled``, about every 0.5 s)
    # and stops what it started (``StartCancelled``). It used to raise an interrupt wherever the main
    # thread was: landing in a ``__del__``, a weakref or gevent callback (code that drops exceptions,
    # "Exception ignored in ...") it was lost and the start went on loading for up to 420 s; a second
    # signal cut the stop of an interrupted start short; and a KeyboardInterrupt passing out of an
    # ``exec`` (the lazy ``import tritonclient.http``) ended serve.py by SIGINT (exit -2) after a clean stop.
    stop = threading.Event()

    def on_signal(*_) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        server.start(cancelled=stop.is_set)
    except ServerError as err:  # it exited or never became ready (the start stopped it); the log says why
        server.stop()
        if stop.is_set():  # cancelled (StartCancelled), or a failure after the signal: the stop asked for
            print("tritonserver stopped while it loaded")
            return
        notes = "".join(f"\n{note}" for note in getattr(err, "__notes__", []))
        print(f"tritonserver did not start: {err}{notes}", file=sys.stderr)
        sys.exit(1)
    if stop.is_set():  # the signal came after the start's last poll
        server.stop()
        print("tritonserver stopped while it loaded")
        return
    died = False
    try:
        supervisor = None
        if args.supervise:
            from deployment.supervisor import Supervisor

            supervisor = Supervisor(server).start()
        print(f"tritonserver ready, listening on {server.listening()}  log {server.log_path}", flush=True)
        while not stop.wait(1.0):
            if supervisor is None and server.process.poll() is not None:
                print(f"tritonserver exited:\n{server.log_tail()}")
                died = True  # a crash, not a stop: exit status 1, so a service manager restarts it
                break
        if supervisor is not None:
            supervisor.stop(cancel_restart=True)  # the server stops next: a restart still loading gives up
            print(f"supervisor restarted the server {supervisor.restarts} time(s)")
    finally:
        server.stop()
    print("tritonserver stopped")
    if died:
        sys.exit(1)


if __name__ == "__main__":
    main()
