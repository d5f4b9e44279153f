"""Who may change what is served: the deployment's admin key and the endpoints it unlocks.

Every tritonserver the project starts (``deployment.server.TritonServer``) listens on loopback unless
asked otherwise, and restricts Triton's control plane to requests that carry the deployment's
admin key in a header (Triton's ``--grpc-restricted-protocol`` / ``--http-restricted-api``):

    locked (key required)   model-repository (index, load -- including uploaded model files --,
                            unload), model-config, shared-memory, statistics, trace, logging
    open                    inference (the funnel, the A/B router, the feedback endpoint), health,
                            metadata, and the Prometheus metrics endpoint

The key is generated once per deployment and kept in a file beside the model repository
(``<repository>-admin.key``, mode 0600, never inside the repository, which an export replaces), or
given in the environment (``FUNNEL_ADMIN_KEY``, which wins over the file). The project's own tools
(rollout, experiments, retraining) find it from the repository path they already take, so callers
change nothing. ``docs/security.md`` says how to expose a server and how to rotate the key.
"""

from __future__ import annotations

import inspect
import os
import secrets
import stat
from pathlib import Path

from configs.cli import checked_timeout

ADMIN_KEY_ENV = "FUNNEL_ADMIN_KEY"
# The HTTP header that carries the key. For gRPC Triton prefixes the name it was given
# (measured on tritonserver 2.51: "expecting header 'triton-grpc-protocol-funnel-admin-key'").
ADMIN_HEADER = "funnel-admin-key"
GRPC_ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"
# Triton's names for the APIs that change or reveal the deployment (``tritonserver --help``).
RESTRICTED_APIS = ("model-repository", "model-config", "shared-memory", "statistics", "trace", "logging")
MIN_KEY_LENGTH = 16
# How long a check that the server accepts the key (``confirm_key_with_server``) waits for its answer:
# without it a server that took the connection but never replied (hung, or not Triton) held the
# tool forever. The index of a loaded repository comes back in milliseconds.
SERVER_CHECK_TIMEOUT_S = 15.0


class AdminKeyError(RuntimeError):
    """No usable admin key: missing, too short, or readable by other users."""


class ControlTimeout(TimeoutError):
    """A control-plane call that the server did not answer within its ``ControlClient`` timeout."""


def admin_key_path(repository: str | Path) -> Path:
    """``<repository>-admin.key`` beside the model repository."""
    repository = Path(repository).resolve()
    return repository.parent / f"{repository.name}-admin.key"


def key_location(repository: str | Path) -> str:
    """Where the key of ``repository`` comes from, for messages (never the key itself)."""
    return f"${ADMIN_KEY_ENV}" if os.environ.get(ADMIN_KEY_ENV) else str(admin_key_path(repository))


def _checked(key: str, source: str) -> str:
    """``key`` without surrounding whitespace, or ``AdminKeyError`` (which never quotes it): at least
    ``MIN_KEY_LENGTH`` printable ASCII characters (what an HTTP or gRPC header value carries) other than
    the separators of Triton's ``--*-restricted-*`` flag. A non-ASCII or control character used to pass:
    the server took the key, no client could send it, and the gRPC client's refusal quoted it whole."""
    key = key.strip()
    if len(key) < MIN_KEY_LENGTH or any(not "!" <= c <= "~" or c in ",:=" for c in key):
        raise AdminKeyError(
            f"the admin key from {source} must be at least {MIN_KEY_LENGTH} characters of printable ASCII "
            "(letters, digits, punctuation) without spaces, ',', ':' or '='"
        )
    return key


def read_admin_key(repository: str | Path) -> str:
    """The deployment's key: ``$FUNNEL_ADMIN_KEY``, else the key file beside ``repository``."""
    if os.environ.get(ADMIN_KEY_ENV):
        return _checked(os.environ[ADMIN_KEY_ENV], f"${ADMIN_KEY_ENV}")
    path = admin_key_path(repository)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise AdminKeyError(
            f"no admin key for {Path(repository).resolve()}: {path} does not exist and "
            f"${ADMIN_KEY_ENV} is not set (the server writes the file when it first starts)"
        ) from None
    mode = info.st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise AdminKeyError(f"{path} is readable by other users (mode {stat.filemode(mode)}); run: chmod 600 {path}")
    # Another user who could create the file beside the repository (a shared /tmp) would know the key
    # a server started by root (which reads any file) takes: refused, as ssh refuses such files.
    if info.st_uid != os.geteuid():
        raise AdminKeyError(
            f"{path} belongs to user id {info.st_uid}, not to this user ({os.geteuid()}): "
            f"delete it, and the server writes a new one at its next start"
        )
    return _checked(path.read_text(), str(path))


def write_admin_key(repository: str | Path, key: str | None = None, replace: bool = True) -> Path:
    """Write ``key`` (a fresh 256-bit one by default) to the key file, mode 0600, atomically.

    Used on a server's first start (``replace=False``: if another process wrote one meanwhile, that
    one stays, so two servers started at once on one repository share a key) and to rotate the key
    (then restart the server)."""
    path = admin_key_path(repository)
    key = _checked(key if key is not None else secrets.token_urlsafe(32), "the new key")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (key + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if the file exists: the first writer wins
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path


def ensure_admin_key(repository: str | Path) -> str:
    """The key a server for ``repository`` starts with, created on first use."""
    if not os.environ.get(ADMIN_KEY_ENV) and not admin_key_path(repository).exists():
        write_admin_key(repository, replace=False)
    return read_admin_key(repository)


def server_flags(key: str) -> list[str]:
    """tritonserver options that lock ``RESTRICTED_APIS`` behind ``key`` on gRPC and HTTP."""
    apis = ",".join(RESTRICTED_APIS)
    return [
        f"--grpc-restricted-protocol={apis}:{ADMIN_HEADER}={key}",
        f"--http-restricted-api={apis}:{ADMIN_HEADER}={key}",
    ]


def grpc_headers(key: str) -> dict[str, str]:
    return {GRPC_ADMIN_HEADER: key}


def http_headers(key: str) -> dict[str, str]:
    return {ADMIN_HEADER: key}


class ControlClient:
    """A ``tritonclient.grpc`` client for the control plane: every call carries the admin key.

        with ControlClient(grpc_url, repository) as control:
            control.load_model("retrieval")

    ``repository`` finds the key (``read_admin_key``); pass ``key`` to give it directly. Methods
    not listed here are the plain client's (health and metadata need no key). For a server whose
    gRPC speaks TLS (``TritonServer(tls_cert=..., tls_key=...)``), ``root_certificates`` is the PEM
    file that signed its certificate: the key then never travels in the clear.

    ``timeout_s`` bounds every call that takes a gRPC deadline (``client_timeout``), and
    ``load_timeout_s`` (``timeout_s`` by default) the model loads and unloads, which return only once
    Triton has loaded the model (tens of seconds for a real stage); a call the server does not answer
    in time raises ``ControlTimeout`` naming the server and the call. None (the default) waits as long
    as the server takes; a ``client_timeout`` given to a call wins.
    """

    _KEYED = (
        "load_model",
        "unload_model",
        "get_model_repository_index",
        "get_model_config",
        "get_inference_statistics",
        "update_log_settings",
        "get_log_settings",
        "update_trace_settings",
        "get_trace_settings",
        # shared-memory is locked too (RESTRICTED_APIS): without the key the server refuses these
        "register_system_shared_memory",
        "unregister_system_shared_memory",
        "get_system_shared_memory_status",
        "register_cuda_shared_memory",
        "unregister_cuda_shared_memory",
        "get_cuda_shared_memory_status",
    )

    def __init__(
        self,
        grpc_url: str,
        repository: str | Path | None = None,
        key: str | None = None,
        root_certificates: str | Path | None = None,
        timeout_s: float | None = None,
        load_timeout_s: float | None = None,
    ):
        import tritonclient.grpc as grpcclient

        # before anything is dialed: a deadline past MAX_SECONDS (inf) overflowed and every call failed at once
        timeout_s = checked_timeout(timeout_s, "timeout_s", none=True)
        load_timeout_s = checked_timeout(load_timeout_s, "load_timeout_s", none=True)
        if key is None:
            if repository is None:
                raise ValueError("ControlClient needs the model repository (to find its key) or the key")
            key = read_admin_key(repository)
        else:  # given directly: the same rule, so an empty key or one no header carries goes no further
            key = _checked(key, "the key given")
        self._headers = grpc_headers(key)
        tls = {"ssl": True, "root_certificates": str(root_certificates)} if root_certificates else {}
        self.client = grpcclient.InferenceServerClient(grpc_url, **tls)
        self.grpc_url = grpc_url
        self.timeout_s = timeout_s
        self.load_timeout_s = timeout_s if load_timeout_s is None else load_timeout_s

    def __getattr__(self, name):
        attr = getattr(self.client, name)
        if not callable(attr):
            return attr
        headers = self._headers if name in self._KEYED else None
        timeout_s = self.load_timeout_s if name in ("load_model", "unload_model") else self.timeout_s
        takes_timeout = "client_timeout" in inspect.signature(attr).parameters
        if not takes_timeout:
            timeout_s = None  # close(), the streams: no deadline to give
        if headers is None and timeout_s is None and not takes_timeout:
            return attr  # nothing to add, and no call's own client_timeout to check

        def call(*args, **kwargs):
            if headers is not None:
                kwargs["headers"] = {**(kwargs.get("headers") or {}), **headers}
            if timeout_s is not None and kwargs.get("client_timeout") is None:
                kwargs["client_timeout"] = timeout_s
            elif kwargs.get("client_timeout") is not None:
                checked_timeout(kwargs["client_timeout"], "client_timeout")
            try:
                return attr(*args, **kwargs)
            except Exception as err:  # tritonclient's InferenceServerException
                status = getattr(err, "status", lambda: None)()
                if kwargs.get("client_timeout") is None or "DEADLINE_EXCEEDED" not in str(status):
                    raise
                what = ", ".join(repr(a) for a in args)
                raise ControlTimeout(
                    f"the server at {self.grpc_url} did not answer {name}({what}) within {kwargs['client_timeout']:g} s"
                ) from None

        return call

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def confirm_key_with_server(
    grpc_url: str,
    repository: str | Path | None = None,
    key: str | None = None,
    root_certificates: str | Path | None = None,
    timeout_s: float | None = None,
) -> None:
    """``AdminKeyError`` unless the server at ``grpc_url`` accepts the key (``repository``'s, or
    ``key``) on a locked call (the repository index), within ``timeout_s`` seconds
    (``SERVER_CHECK_TIMEOUT_S`` by default).

    The one check of a key given in ``$FUNNEL_ADMIN_KEY`` to a tool that writes beside the server
    (a takedown): ``read_admin_key`` takes that value as the deployment's, so only the server the
    deployment runs can say it is wrong. A server that cannot be reached, or does not answer in
    time, confirms nothing: refused too."""
    timeout_s = SERVER_CHECK_TIMEOUT_S if timeout_s is None else checked_timeout(timeout_s)
    try:
        with ControlClient(grpc_url, repository, key=key, root_certificates=root_certificates) as control:
            control.get_model_repository_index(client_timeout=timeout_s)
    except AdminKeyError:
        raise
    except ControlTimeout:
        raise AdminKeyError(f"the server at {grpc_url} did not answer within {timeout_s:g} s") from None
    except Exception as err:  # tritonclient's InferenceServerException: refused, unreachable, TLS
        raise AdminKeyError(
            f"the server at {grpc_url} did not accept the admin key, or could not be reached ({err})"
        ) from None
