"""The deployment's admin key and the server's secure defaults, without starting a server."""

import json
import os
import stat
from pathlib import Path

import pytest

from deployment import security
from tests.conftest import self_signed


@pytest.fixture(autouse=True)
def no_key_in_env(monkeypatch):
    monkeypatch.delenv(security.ADMIN_KEY_ENV, raising=False)


def test_a_key_is_created_once_beside_the_repository_readable_by_its_owner_only(tmp_path):
    repo = tmp_path / "triton_repo"
    repo.mkdir()
    key = security.ensure_admin_key(repo)
    path = security.admin_key_path(repo)
    assert path == tmp_path / "triton_repo-admin.key" and path.parent != repo  # survives re-exports
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(key) >= 40 and security.ensure_admin_key(repo) == key == security.read_admin_key(repo)
    # rotating writes a new key in place (the server takes it at its next start)
    security.write_admin_key(repo)
    assert security.read_admin_key(repo) != key and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_key_file_others_can_read_is_refused(tmp_path):
    repo = tmp_path / "repo"
    security.write_admin_key(repo)
    os.chmod(security.admin_key_path(repo), 0o644)
    with pytest.raises(security.AdminKeyError, match="readable by other users.*chmod 600"):
        security.read_admin_key(repo)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user takes root")
def test_a_key_file_another_user_owns_is_refused(tmp_path):
    # e.g. planted beside a repository in a shared folder before the server first started: its owner
    # would know the key that unlocks model uploads on a server run as root
    repo = tmp_path / "repo"
    repo.mkdir()
    security.write_admin_key(repo, "k" * 32)
    os.chown(security.admin_key_path(repo), 65534, -1)
    with pytest.raises(security.AdminKeyError, match="belongs to user id 65534, not to this user"):
        security.ensure_admin_key(repo)


def test_missing_and_weak_keys_are_named(tmp_path, monkeypatch):
    with pytest.raises(security.AdminKeyError, match="does not exist and \\$FUNNEL_ADMIN_KEY is not set"):
        security.read_admin_key(tmp_path / "repo")
    with pytest.raises(security.AdminKeyError, match="at least 16 characters"):
        security.write_admin_key(tmp_path / "repo", "short")
    monkeypatch.setenv(security.ADMIN_KEY_ENV, "key,with:separators=bad")
    with pytest.raises(security.AdminKeyError, match="FUNNEL_ADMIN_KEY"):
        security.read_admin_key(tmp_path / "repo")


@pytest.mark.parametrize("bad", ["\r", "\u00e9", "\x7f", "\x0b", "\u00a0"])
def test_a_key_no_header_can_carry_is_refused_without_echoing_it(tmp_path, monkeypatch, bad):
    """A key with a character outside printable ASCII (a non-ASCII passphrase, a control character in
    the middle) was taken: the server started with it, no client could send it in a header, and the
    gRPC client's refusal quoted the whole key ("metadata was invalid: dict_items([(..., '<key>')])"),
    which confirm_key_with_server passed on into its error and scripts/takedown.py printed."""
    secret = "SECRETSECRETSECRET" + bad + "TAIL"
    monkeypatch.setenv(security.ADMIN_KEY_ENV, secret)
    with pytest.raises(security.AdminKeyError, match="printable ASCII") as err:
        security.read_admin_key(tmp_path / "repo")
    assert "SECRET" not in str(err.value)
    monkeypatch.delenv(security.ADMIN_KEY_ENV)
    with pytest.raises(security.AdminKeyError, match="printable ASCII") as err:
        security.write_admin_key(tmp_path / "repo", secret)
    assert "SECRET" not in str(err.value)
    # a key given directly to the control plane's client is held to the same rule, and never echoed
    for given in (secret, "", "   "):
        with pytest.raises(security.AdminKeyError) as err:
            security.confirm_key_with_server("127.0.0.1:1", key=given, timeout_s=2)
        assert "SECRET" not in str(err.value)
        with pytest.raises(security.AdminKeyError):
            security.ControlClient("127.0.0.1:1", key=given)


def test_the_environment_key_wins_and_no_file_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv(security.ADMIN_KEY_ENV, "k" * 32)
    repo = tmp_path / "repo"
    assert security.ensure_admin_key(repo) == "k" * 32
    assert not security.admin_key_path(repo).exists()
    assert security.key_location(repo) == "$FUNNEL_ADMIN_KEY"


def test_the_server_binds_loopback_and_locks_the_control_plane_unless_asked(tmp_path):
    from deployment.server import TritonServer

    repo = tmp_path / "repo"
    repo.mkdir()
    server = TritonServer(repo)
    try:
        cmd = server.command()
    except FileNotFoundError as err:  # nvidia-pytriton missing: the command cannot be built
        pytest.skip(str(err))
    key = security.read_admin_key(repo)
    for flag in ("--grpc-address=127.0.0.1", "--http-address=127.0.0.1", "--metrics-address=127.0.0.1"):
        assert flag in cmd
    apis = "model-repository,model-config,shared-memory,statistics,trace,logging"
    assert f"--grpc-restricted-protocol={apis}:funnel-admin-key={key}" in cmd
    assert f"--http-restricted-api={apis}:funnel-admin-key={key}" in cmd
    assert server.grpc_url.startswith("127.0.0.1:")
    exposed = TritonServer(repo, host="0.0.0.0")
    assert "--grpc-address=0.0.0.0" in exposed.command() and exposed.grpc_url.startswith("127.0.0.1:")
    assert "grpc 0.0.0.0:" in exposed.listening()
    server.cleanup()
    exposed.cleanup()


def test_control_client_sends_the_key_on_control_calls_only(tmp_path):
    repo = tmp_path / "repo"
    security.write_admin_key(repo, "s" * 24)
    control = security.ControlClient("127.0.0.1:1", repo)
    seen = {}

    class Fake:
        def load_model(self, name, headers=None):
            seen["load"] = headers

        def is_model_ready(self, name, headers=None):
            seen["ready"] = headers

    control.client = Fake()
    control.load_model("funnel")
    control.is_model_ready("funnel")
    assert seen == {"load": {"triton-grpc-protocol-funnel-admin-key": "s" * 24}, "ready": None}


def test_control_client_sends_the_key_on_every_restricted_call(tmp_path):
    """Every call of an API the server locks (security.RESTRICTED_APIS) carries the key: the
    shared-memory calls went out without it and the server refused them."""
    import tritonclient.grpc as grpcclient

    repo = tmp_path / "repo"
    security.write_admin_key(repo, "s" * 24)
    control = security.ControlClient("127.0.0.1:1", repo)
    restricted = ("shared_memory", "model_repository", "load_model", "unload_model", "model_config")
    restricted += ("statistics", "trace", "log")
    calls = [name for name in dir(grpcclient.InferenceServerClient) if any(part in name for part in restricted)]
    assert "register_system_shared_memory" in calls
    sent = {}

    class Fake:
        def __getattr__(self, name):
            return lambda *args, headers=None, **kwargs: sent.__setitem__(name, headers)

    control.client = Fake()
    for name in calls:
        getattr(control, name)()
    unkeyed = [name for name in calls if sent[name] != {"triton-grpc-protocol-funnel-admin-key": "s" * 24}]
    assert unkeyed == []


ECHO_CONFIG = """name: "echo"
backend: "python"
max_batch_size: 0
input [ { name: "user_id" data_type: TYPE_INT64 dims: [ 1 ] } ]
output [ { name: "user_id_out" data_type: TYPE_INT64 dims: [ 1 ] } ]
"""
ECHO_MODEL = """import triton_python_backend_utils as pb_utils
class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("user_id_out",
                pb_utils.get_input_tensor_by_name(r, "user_id").as_numpy())]) for r in requests]
"""


@pytest.mark.slow
def test_grpc_over_tls_answers_tls_clients_only(tmp_path, capsys):
    """A tiny one-model repository, so the real server starts in seconds."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from deployment.server import TritonServer

    repo = tmp_path / "repo"
    (repo / "echo" / "1").mkdir(parents=True)
    (repo / "echo" / "config.pbtxt").write_text(ECHO_CONFIG)
    (repo / "echo" / "1" / "model.py").write_text(ECHO_MODEL)
    (repo / "funnel" / "1").mkdir(parents=True)  # for scripts/query.py --tls-ca
    (repo / "funnel" / "config.pbtxt").write_text(FAKE_FUNNEL_CONFIG)
    (repo / "funnel" / "1" / "model.py").write_text(FAKE_FUNNEL_MODEL)
    cert, key = self_signed(tmp_path)
    with TritonServer(repo, tls_cert=cert, tls_key=key, log_path=tmp_path / "server.log") as server:
        assert server.listening().startswith("grpc+tls 127.0.0.1:")
        value = grpcclient.InferInput("user_id", [1], "INT64")
        value.set_data_from_numpy(np.array([7], dtype=np.int64))
        tls = grpcclient.InferenceServerClient(server.grpc_url, ssl=True, root_certificates=str(cert))
        assert tls.infer("echo", [value]).as_numpy("user_id_out").tolist() == [7]
        plain = grpcclient.InferenceServerClient(server.grpc_url)
        with pytest.raises(InferenceServerException):
            plain.infer("echo", [value], client_timeout=5)
        tls.close()
        plain.close()
        assert server.healthy()
        # scripts/query.py had no --tls-ca: a server exposed with TLS could not be queried with it
        from scripts import query

        query.main(["--user-id", "3", "--k", "2", "--url", server.grpc_url, "--tls-ca", str(cert), "--json"])
        assert json.loads(capsys.readouterr().out)["item_ids"] == [0, 1]
        with pytest.raises(SystemExit):
            query.main(["--user-id", "3", "--url", server.grpc_url])  # plain gRPC to a TLS server
        assert "error:" in capsys.readouterr().err


@pytest.mark.slow
def test_a_repository_path_with_spaces_serves_its_python_models(tmp_path):
    """The python backend launches each stub through ``bash -c`` unquoted: a repository under a folder
    with a space split the stub's arguments, the stub died and the start waited out the stub timeout."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    from deployment.server import TritonServer

    repo = tmp_path / "my models" / "triton repo"
    (repo / "echo" / "1").mkdir(parents=True)
    (repo / "echo" / "config.pbtxt").write_text(ECHO_CONFIG)
    (repo / "echo" / "1" / "model.py").write_text(ECHO_MODEL)
    with TritonServer(repo, log_path=tmp_path / "server.log", startup_timeout=120, stub_timeout_s=60) as server:
        value = grpcclient.InferInput("user_id", [1], "INT64")
        value.set_data_from_numpy(np.array([7], dtype=np.int64))
        client = grpcclient.InferenceServerClient(server.grpc_url)
        assert client.infer("echo", [value]).as_numpy("user_id_out").tolist() == [7]
        client.close()
        assert list(server.stub_pids()) == ["echo"]
    server.cleanup()
    assert (repo / "echo" / "1" / "model.py").exists()  # the scratch folder's link went, not the repository
    assert security.admin_key_path(repo).exists()  # the key beside the repository, not beside the link
    plain = TritonServer(tmp_path, log_path=tmp_path / "plain.log")
    assert plain.served_repository() == tmp_path  # a path bash keeps whole is given as it is
    plain.cleanup()


# A stand-in for the funnel ensemble: its inputs and outputs, k item ids, so a start takes seconds.
FAKE_FUNNEL_CONFIG = """name: "funnel"
backend: "python"
max_batch_size: 0
input [ { name: "user_id" data_type: TYPE_INT64 dims: [ 1 ] }, { name: "k" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "item_ids" data_type: TYPE_INT64 dims: [ -1 ] }, { name: "scores" data_type: TYPE_FP32 dims: [ -1 ] },
  { name: "model_version" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "served_by" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "stage_counts" data_type: TYPE_INT64 dims: [ 5 ] } ]
"""
FAKE_FUNNEL_MODEL = """import numpy as np
import triton_python_backend_utils as pb_utils
class TritonPythonModel:
    def execute(self, requests):
        answers = []
        for r in requests:
            k = int(pb_utils.get_input_tensor_by_name(r, "k").as_numpy()[0])
            answers.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("item_ids", np.arange(k, dtype=np.int64)),
                pb_utils.Tensor("scores", np.ones(k, dtype=np.float32)),
                pb_utils.Tensor("model_version", np.array([b"1"], dtype=object)),
                pb_utils.Tensor("served_by", np.array([b"model"], dtype=object)),
                pb_utils.Tensor("stage_counts", np.zeros(5, dtype=np.int64))]))
        return answers
"""


@pytest.mark.slow
def test_the_supervisor_of_a_tls_server_exposed_under_its_hostname_leaves_it_running(tmp_path):
    """serve.py --host 0.0.0.0 --tls-cert <a certificate for the machine's name> --supervise: the
    supervisor's probe went to 127.0.0.1 over gRPC TLS, failed the certificate's name check ("Peer
    name 127.0.0.1 is not in peer certificate") and restarted the healthy server again and again."""
    import signal

    from deployment.server import TritonServer
    from deployment.supervisor import Supervisor

    repo = tmp_path / "repo"
    (repo / "funnel" / "1").mkdir(parents=True)
    (repo / "funnel" / "config.pbtxt").write_text(FAKE_FUNNEL_CONFIG)
    (repo / "funnel" / "1" / "model.py").write_text(FAKE_FUNNEL_MODEL)
    cert, key = self_signed(tmp_path, "funnel.example.com")
    server = TritonServer(repo, host="0.0.0.0", tls_cert=cert, tls_key=key, log_path=tmp_path / "server.log")
    with server:
        supervisor = Supervisor(server, failures=1)
        pid = server.process.pid
        assert supervisor.check_once(), supervisor.last_error
        assert supervisor.restarts == 0 and server.process.pid == pid
        # and the probe still notices a dead stage
        os.kill(server.stub_pids()["funnel"][0], signal.SIGKILL)
        assert not supervisor.check_once() and supervisor.restarts == 1
        assert supervisor.check_once(), supervisor.last_error


def test_the_key_check_gives_up_on_a_server_that_never_answers(silent_grpc_server, monkeypatch):
    """``confirm_key_with_server`` (takedown.py --url, rollout.py) waited without limit for a server
    that took the call and never replied; now ``SERVER_CHECK_TIMEOUT_S``, then an error naming it."""
    import time

    monkeypatch.setattr(security, "SERVER_CHECK_TIMEOUT_S", 1.0, raising=False)
    start = time.monotonic()
    with pytest.raises(security.AdminKeyError, match=f"{silent_grpc_server} did not answer within 1 s"):
        security.confirm_key_with_server(silent_grpc_server, key="k" * 32)
    assert time.monotonic() - start < 10.0


def test_control_calls_give_up_on_a_server_that_never_answers(silent_grpc_server):
    """``ControlClient(timeout_s=..., load_timeout_s=...)`` gives every call a gRPC deadline: loads the
    longer one (a real stage loads in tens of seconds), and a call the server does not answer raises
    ``ControlTimeout`` naming the server and the call. The rollout's calls had no deadline at all."""
    import time

    control = security.ControlClient(silent_grpc_server, key="k" * 32, timeout_s=0.5, load_timeout_s=1.5)
    try:
        start = time.monotonic()
        with pytest.raises(
            security.ControlTimeout,
            match=rf"{silent_grpc_server} did not answer is_model_ready\('funnel', '2'\) within 0.5 s",
        ):
            control.is_model_ready("funnel", "2")
        with pytest.raises(security.ControlTimeout, match=r"get_model_repository_index\(\) within 0.5 s"):
            control.get_model_repository_index(as_json=True)
        assert time.monotonic() - start < 5.0
        start = time.monotonic()
        with pytest.raises(security.ControlTimeout, match=r"load_model\('funnel'\) within 1.5 s"):
            control.load_model("funnel")
        assert 1.4 < time.monotonic() - start < 6.0  # the load's own deadline, not the short one
        with pytest.raises(security.ControlTimeout, match=r"unload_model\('funnel'\) within 0.2 s"):
            control.unload_model("funnel", client_timeout=0.2)  # a deadline given to the call wins
    finally:
        control.close()


@pytest.mark.slow
def test_an_unkeyed_client_can_neither_map_memory_nor_write_files_on_either_protocol(tmp_path):
    """Beyond test_the_control_plane_refuses_clients_without_the_key (gRPC, and HTTP load/unload): every
    locked category over HTTP too, registering a real shared-memory region (the server would map it and
    read and write it), and the log and trace settings that name a file for the server to write."""
    import psutil
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from deployment.server import TritonServer

    repo = tmp_path / "repo"
    (repo / "echo" / "1").mkdir(parents=True)
    (repo / "echo" / "config.pbtxt").write_text(ECHO_CONFIG)
    (repo / "echo" / "1" / "model.py").write_text(ECHO_MODEL)
    region = f"/funnel_test_{os.getpid()}"
    shm = Path("/dev/shm") / region[1:]
    shm.write_bytes(b"\0" * 4096)
    written = tmp_path / "chosen-by-client"
    try:
        with TritonServer(repo, log_path=tmp_path / "server.log", startup_timeout=120, stub_timeout_s=60) as server:
            listening = psutil.Process(server.process.pid).net_connections(kind="tcp")
            assert {c.laddr.ip for c in listening if c.status == psutil.CONN_LISTEN} <= {
                "127.0.0.1",
                "::ffff:127.0.0.1",
            }
            grpc = grpcclient.InferenceServerClient(server.grpc_url)
            http = httpclient.InferenceServerClient(server.http_url)
            for client, refused in ((grpc, "StatusCode.UNAVAILABLE"), (http, "403")):
                calls = [
                    lambda c=client: c.load_model("echo", config='{"backend": "python", "max_batch_size": 0}'),
                    lambda c=client: c.unload_model("echo"),
                    lambda c=client: c.get_model_repository_index(),
                    lambda c=client: c.get_model_config("echo"),
                    lambda c=client: c.get_inference_statistics("echo"),
                    lambda c=client: c.register_system_shared_memory("r", region, 4096),
                    lambda c=client: c.unregister_system_shared_memory(),
                    lambda c=client: c.register_cuda_shared_memory("c", b"\0" * 64, 0, 64),
                    lambda c=client: c.update_log_settings({"log_file": str(written), "log_verbose_level": 3}),
                    lambda c=client: c.update_trace_settings(
                        settings={"trace_file": str(written), "trace_level": ["TIMESTAMPS"], "trace_rate": "1"}
                    ),
                    lambda c=client: c.update_trace_settings(model_name="echo", settings={"trace_file": str(written)}),
                ]
                for call in calls:
                    with pytest.raises(InferenceServerException, match="restricted") as err:
                        call()
                    assert err.value.status() == refused
            with security.ControlClient(server.grpc_url, repo) as control:  # the key unlocks the same calls
                assert control.get_system_shared_memory_status() is not None
                assert control.get_model_config("echo").config.name == "echo"
            assert grpc.is_model_ready("echo") and not written.exists()
            grpc.close()
            http.close()
    finally:
        shm.unlink(missing_ok=True)
