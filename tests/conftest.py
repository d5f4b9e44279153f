"""Shared fixtures: one small synthetic world, processed, trained and exported once per test run.

``make test`` runs several pytest-xdist workers (the Makefile's ``TEST_WORKERS``); the dataset
pipeline, the trained model version and its export are built by whichever worker asks first and read
by the others (``built_once``: a file lock in a folder every worker of the run sees), instead of once
per worker. Tests only read them; a test that
changes one works on its own copy.

A test that uses the trained model (``model_version``, ``triton_repo``) is marked ``slow`` here, so
``make test-fast`` skips every test that trains or serves without each module having to say so.
"""

from __future__ import annotations

import fcntl
import json
import shutil
from pathlib import Path

import pytest

from configs.runtime import quiet_known_warnings

quiet_known_warnings()

SMALL = {
    "synthetic": {"num_users": 300, "num_items": 200, "events_per_user": 40, "seed": 7},
    "candidate_generator": {"epochs": 3, "batch_size": 512},
    "light_ranker": {"epochs": 2, "batch_size": 512},
    # Two members, one trained on affinity hard negatives: every served test runs the ensemble path.
    "heavy_ranker": {"epochs": 2, "batch_size": 512, "members": [{}, {"hard_negatives": 10}]},
    "serving": {"retrieval_k": 100, "light_ranker_k": 30, "max_k": 50},
    # The windowed activity features (off by default) on: every served test runs them (tests/test_activity.py).
    "workflow": {"features": {"activity_windows": ["1h", "24h", "7d"]}},
    # The tuning step (evaluation/tuning.py) on a 2 x 2 grid and 100 validation users: cheap where
    # scripts/evaluate.py paths run it; tests/test_tuning.py sets its own.
    "tuning": {"retrieval_weight": [0.0, 0.3], "affinity_weight": [0.0, 0.5], "max_users": 100},
}


@pytest.fixture(scope="session")
def small_config():
    from configs import load_config

    return load_config(overrides=SMALL)


@pytest.fixture(scope="session")
def small_data(small_config):
    from workflows.sources.synthetic import generate

    return generate(small_config.synthetic)


@pytest.fixture(scope="session")
def raw_paths(small_data, tmp_path_factory):
    return small_data.write_parquet(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="session")
def shared_root(tmp_path_factory, worker_id) -> Path:
    """A folder every xdist worker of this run sees (the run's base folder; the session's alone)."""
    base = tmp_path_factory.getbasetemp()
    return base if worker_id == "master" else base.parent


def built_once(root: Path, name: str, build) -> Path:
    """``root/name``, written by ``build(folder)`` in the first worker that asks; the others wait."""
    folder = root / name
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (folder / ".complete").exists():
            shutil.rmtree(folder, ignore_errors=True)
            build(folder)
            (folder / ".complete").touch()
    return folder


@pytest.fixture(scope="session")
def processed(raw_paths, small_config, shared_root):
    from workflows.pipeline import ProcessedData, run_dataset_pipeline

    def build(folder):
        run_dataset_pipeline(raw_paths["events"], raw_paths["users"], raw_paths["items"], folder, small_config.workflow)

    return ProcessedData(built_once(shared_root, "processed", build))


@pytest.fixture(scope="session")
def model_version(processed, small_config, shared_root):
    from models.registry import ModelVersion
    from models.train import train_all

    folder = built_once(shared_root, "registry", lambda f: train_all(processed, small_config, f, verbose=0))
    return ModelVersion(folder / "1")


@pytest.fixture(scope="session")
def triton_repo(model_version, shared_root) -> Path:
    from deployment.export import export_repository

    return (
        built_once(shared_root, "export", lambda f: export_repository(model_version, f / "triton_repo")) / "triton_repo"
    )


TRAINED = {"model_version", "triton_repo"}


# How long each scope (a module, or a class: each notebook is one) took in a recorded ``make test``:
# ``tests/scope_durations.json``, written by ``make test-durations`` (``--record-scope-durations``).
# xdist hands scopes out in collection order, each worker taking the next when it is nearly done, so
# sorting them longest first is the classic longest-processing-time schedule: no long module starts
# last and runs alone at the end. A scope the file does not know goes last.
SCOPE_DURATIONS = Path(__file__).with_name("scope_durations.json")


@pytest.fixture
def silent_grpc_server():
    """A gRPC server that takes every call and never answers (a hung server, or not Triton), for at
    most 20 s so that a client without a deadline fails the test instead of hanging it; for every
    tool that talks to a server (the key check in test_security.py, the rollout in test_serving_units.py)."""
    import threading
    from concurrent import futures

    import grpc

    release = threading.Event()

    class Silent(grpc.GenericRpcHandler):
        def service(self, details):
            def never(request, context):
                release.wait(20)
                return b""

            return grpc.unary_unary_rpc_method_handler(never)

    server = grpc.server(futures.ThreadPoolExecutor(2), handlers=[Silent()])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        release.set()
        server.stop(0)


def self_signed(folder, host="127.0.0.1"):
    """A certificate for ``host`` (an IP address or a DNS name) signed by its own key (its own root), as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    try:
        alt_name = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        alt_name = x509.DNSName(host)
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([alt_name]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "server.crt", folder / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def scope_of(nodeid: str) -> str:
    """The scope ``--dist loadscope`` keeps on one worker: a test's class, or else its module (xdist's
    own rule: the node id up to its last ``::``)."""
    return nodeid.rsplit("::", 1)[0]


def pytest_addoption(parser):
    parser.addoption(
        "--record-scope-durations",
        metavar="PATH",
        help="write each scope's seconds (setup + call + teardown of its tests) to PATH as JSON, longest first",
    )


class ScopeDurations:
    """Sums each scope's phases as their reports arrive and writes them, longest first, at the end.
    In an xdist run the controller sees every worker's reports, so only it records."""

    def __init__(self, path: str):
        self.path, self.seconds = Path(path), {}

    def pytest_runtest_logreport(self, report):
        scope = scope_of(report.nodeid)
        self.seconds[scope] = self.seconds.get(scope, 0.0) + report.duration

    def pytest_sessionfinish(self, session):
        ordered = sorted(self.seconds.items(), key=lambda item: -item[1])
        self.path.write_text(json.dumps({scope: round(s, 1) for scope, s in ordered}, indent=1) + "\n")


def pytest_configure(config):
    path = config.getoption("--record-scope-durations")
    if path and not hasattr(config, "workerinput"):
        config.pluginmanager.register(ScopeDurations(path), "scope-durations")


def pytest_collection_modifyitems(config, items):
    """Tests that need the trained model are slow. The longest scopes go first (``SCOPE_DURATIONS``);
    the sort is stable, so tests keep their order within a scope."""
    for item in items:
        if TRAINED & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    seconds = json.loads(SCOPE_DURATIONS.read_text()) if SCOPE_DURATIONS.exists() else {}
    items.sort(key=lambda item: -seconds.get(scope_of(item.nodeid), 0.0))


class SyncRecorder:
    """What a publish did, in order: ``synced`` holds each fsync as (the file's or folder's identity,
    how many renames or exchanges came before it), ``published`` each rename's or exchange's target."""

    def __init__(self):
        self.synced: list[tuple[tuple[int, int], int]] = []
        self.published: list[Path] = []

    @staticmethod
    def key(path) -> tuple[int, int]:
        st = Path(path).stat()
        return st.st_dev, st.st_ino

    def missed(self, target: Path) -> list[Path]:
        """The paths under ``target`` (itself included) not synced before the rename that put it in place
        (the last one, where it was replaced more than once)."""
        i = len(self.published) - 1 - self.published[::-1].index(Path(target))
        before = {k for k, n in self.synced if n <= i}
        return [p for p in [Path(target), *Path(target).rglob("*")] if self.key(p) not in before]

    def parent_synced(self, target: Path) -> bool:
        """The folder ``target`` landed in synced after that rename (its last) and before the next one."""
        i = len(self.published) - 1 - self.published[::-1].index(Path(target))
        return (self.key(Path(target).parent), i + 1) in self.synced


@pytest.fixture
def sync_recorder(monkeypatch):
    """Record fsyncs and publishing renames (``os.rename``, ``os.replace``, ``deployment.export.exchange``)
    until the test calls ``monkeypatch.undo()``: is a published folder or file on disk before its rename?"""
    import os

    from deployment import export

    record = SyncRecorder()
    real_fsync, real_rename, real_replace, real_exchange = os.fsync, os.rename, os.replace, export.exchange

    def fsync(fd):
        st = os.fstat(fd)
        record.synced.append(((st.st_dev, st.st_ino), len(record.published)))
        real_fsync(fd)

    def rename(src, dst):
        real_rename(src, dst)
        record.published.append(Path(dst))

    def replace(src, dst):
        real_replace(src, dst)
        record.published.append(Path(dst))

    def exchange(a, b):
        done = real_exchange(a, b)
        if done:
            record.published.append(Path(b))
        return done

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(export, "exchange", exchange)
    return record
