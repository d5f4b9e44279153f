"""The container image, compose file and Kubernetes manifests, checked without a container runtime.

Nothing here builds an image or deploys anything (this machine has no Docker daemon and no cluster):
the files are parsed and cross-checked against the code they run, so a renamed flag, a moved port
or a file the image copies that no longer exists fails here. The deep probe they use
(scripts/probe.py) is run for real against a live server.
"""

import argparse
import fnmatch
import importlib.util
import inspect
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

import pytest
import yaml

from deployment.security import ADMIN_KEY_ENV
from deployment.server import TritonServer
from online.router import LOG_ENV

ROOT = Path(__file__).resolve().parents[1]


def test_probe_fails_where_no_funnel_answers():
    """The deep probe's failing side; its passing side runs on a real server in
    tests/test_triton_integration.py."""
    from deployment.server import LOOPBACK, free_port

    cmd = [sys.executable, str(ROOT / "scripts" / "probe.py"), "--url", f"{LOOPBACK}:{free_port()}"]
    down = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert down.returncode == 1
    assert "funnel probe failed" in down.stderr


FAKE_TRITONSERVER = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # a killed stub leaves no zombie
for model_py in os.environ["FAKE_STUBS"].split(os.pathsep):
    subprocess.Popen([os.environ["FAKE_STUB_BINARY"], model_py])
time.sleep(120)
"""


def _fake_control_plane(key: str, instances: dict[str, int]):
    """Triton's repository index and model configs over HTTP, locked with ``key`` as the real one."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from deployment.security import ADMIN_HEADER

    class Handler(BaseHTTPRequestHandler):
        def answer(self, body) -> None:
            if self.headers.get(ADMIN_HEADER) != key:
                self.send_response(403)
                body = {"error": "This API is restricted"}
            else:
                self.send_response(200)
            data = json.dumps(body).encode()
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):  # /v2/repository/index
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.answer([{"name": name, "version": "1", "state": "READY"} for name in instances])

        def do_GET(self):  # /v2/models/<name>/versions/1/config
            name = self.path.split("/")[3]
            self.answer({"backend": "python", "instance_group": [{"kind": "KIND_CPU", "count": instances[name]}]})

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_the_probe_fails_where_a_router_stub_is_gone(tmp_path, monkeypatch, capsys):
    """Triton 2.51 never restarts a killed Python stub, and the funnel request never reaches the A/B
    router or the feedback endpoint: with one of the router's two stubs killed the old probe still
    exited 0 (the kubelet never restarted the pod). The probe now also runs the supervisor's
    ``stub_probe`` on the tritonserver serving its gRPC port, found among its processes: here a fake
    one (a process named tritonserver with Triton's flags and stub children named
    triton_python_backend_stub) and a fake control plane; the funnel request is stubbed out."""
    import os
    import signal
    import time

    from deployment.server import RunningServer, free_port, stub_pids_by_version

    key = "k" * 32
    monkeypatch.setenv(ADMIN_KEY_ENV, key)
    control = _fake_control_plane(key, {"ab_router": 2, "feedback": 1})
    repo, binaries = tmp_path / "repo", tmp_path / "bin"
    binaries.mkdir()
    python = os.path.realpath(sys.executable)
    (binaries / "tritonserver").symlink_to(python)
    stub_binary = binaries / "triton_python_backend_stub"
    stub_binary.symlink_to(python)
    stubs = []
    for model, count in (("ab_router", 2), ("feedback", 1)):
        (repo / model / "1").mkdir(parents=True)
        (repo / model / "1" / "model.py").write_text("import time\ntime.sleep(120)\n")
        stubs += [str(repo / model / "1" / "model.py")] * count
    (tmp_path / "fake.py").write_text(FAKE_TRITONSERVER)
    grpc_port = free_port()
    fake = subprocess.Popen(
        [str(binaries / "tritonserver"), str(tmp_path / "fake.py"), f"--model-repository={repo}"]
        + [f"--grpc-port={grpc_port}", "--http-address=127.0.0.1", f"--http-port={control.server_port}"],
        env={**os.environ, "FAKE_STUBS": os.pathsep.join(stubs), "FAKE_STUB_BINARY": str(stub_binary)},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while sum(map(len, stub_pids_by_version(fake.pid).values())) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        found = RunningServer.by_grpc_port(grpc_port)
        assert found is not None and found.pid == fake.pid
        assert found.http_url == f"127.0.0.1:{control.server_port}"

        spec = importlib.util.spec_from_file_location("_script_probe", PROBE)
        probe = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(probe)
        monkeypatch.setattr(probe, "funnel_probe", lambda url, root_certificates=None: None)  # the funnel answers
        url = f"127.0.0.1:{grpc_port}"
        assert probe.main(["--url", url]) == 0
        assert "all 3 Python model instances have their stub" in capsys.readouterr().out

        os.kill(stub_pids_by_version(fake.pid)[("ab_router", "1")][0], signal.SIGKILL)  # one router stub dies
        deadline = time.monotonic() + 10
        while len(stub_pids_by_version(fake.pid).get(("ab_router", "1"), [])) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert probe.main(["--url", url]) == 1  # the old probe: 0
        assert "ab_router v1 (1 of 2 alive)" in capsys.readouterr().err
        assert probe.main(["--url", url, "--no-stubs"]) == 0

        # Without the admin key the check is skipped (a note, exit 0) unless --stubs requires it.
        monkeypatch.delenv(ADMIN_KEY_ENV)
        assert probe.main(["--url", url]) == 0
        assert "note: stub check skipped: no admin key" in capsys.readouterr().err
        assert probe.main(["--url", url, "--stubs"]) == 1
    finally:
        os.killpg(fake.pid, signal.SIGKILL)
        fake.wait()
        control.shutdown()


# --- reading the files -------------------------------------------------------------------------------

DOCKERFILES = [ROOT / "Dockerfile", ROOT / "Dockerfile.gpu"]
COMPOSE = ROOT / "compose.yaml"
KUBERNETES = ROOT / "deployment" / "kubernetes"
PROMETHEUS_CONFIG = ROOT / "monitoring" / "prometheus" / "prometheus.yml"
GRAFANA_PROVISIONING = ROOT / "monitoring" / "grafana" / "provisioning"


def parser_of(script: Path) -> argparse.ArgumentParser:
    """The ArgumentParser a script's ``main()`` builds, caught as it parses (nothing else runs)."""

    class Caught(Exception):
        pass

    caught = {}

    def catch(self, *args, **kwargs):
        caught["parser"] = self
        raise Caught

    spec = importlib.util.spec_from_file_location(f"_script_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with mock.patch.object(argparse.ArgumentParser, "parse_args", catch), pytest.raises(Caught):
        module.main()
    return caught["parser"]


SERVE = ROOT / "scripts" / "serve.py"
PROBE = ROOT / "scripts" / "probe.py"


def serve_args(args: list[str]) -> argparse.Namespace:
    """``args`` as scripts/serve.py parses them; an unknown flag or bad value fails the test."""
    return parser_of(SERVE).parse_args(args)


def serve_ports() -> dict[str, int]:
    """scripts/serve.py's default ports, by name: what every file here must agree with."""
    defaults = serve_args([])
    return {"http": defaults.http_port, "grpc": defaults.grpc_port, "metrics": defaults.metrics_port}


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """``[(INSTRUCTION, arguments), ...]``: continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        instructions.append((word.upper(), " ".join(rest.split())))
        pending = ""
    return instructions


def instruction(path: Path, name: str) -> list[str]:
    return [args for word, args in dockerfile_instructions(path) if word == name]


def exec_form(args: str) -> list[str]:
    """A JSON-array instruction (``CMD ["a", "b"]``), after any ``--option=value`` of the instruction."""
    return json.loads(args[args.index("[") :])


def workdir(path: Path) -> str:
    return instruction(path, "WORKDIR")[-1].rstrip("/")


def in_repo(path: Path, container_path: str) -> Path:
    """Where a file the image runs (``/app/scripts/probe.py``) comes from in this repository."""
    prefix = workdir(path) + "/"
    assert container_path.startswith(prefix), f"{container_path} is not under the image's WORKDIR {prefix}"
    return ROOT / container_path[len(prefix) :]


def probe_command_ok(command: list[str], image: Path = ROOT / "Dockerfile") -> argparse.Namespace:
    """A probe command runs the image's Python on scripts/probe.py with flags it accepts, against
    the gRPC port scripts/serve.py listens on; returns the parsed flags."""
    python, script, *args = command
    assert python == exec_form(instruction(image, "ENTRYPOINT")[0])[0], "the probe runs the server's Python"
    assert in_repo(image, script) == PROBE and PROBE.is_file()
    parsed = parser_of(PROBE).parse_args(args)
    host, _, port = parsed.url.rpartition(":")
    assert host == "127.0.0.1" and int(port) == serve_ports()["grpc"], parsed.url
    return parsed


def yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kubernetes_objects() -> list[dict]:
    files = sorted(KUBERNETES.glob("*.yaml"))
    assert files
    return [doc for f in files if f.name != "kustomization.yaml" for doc in yaml_documents(f)]


def objects_of(kind: str) -> list[dict]:
    return [o for o in kubernetes_objects() if o["kind"] == kind]


def server_deployment() -> dict:
    (deployment,) = [d for d in objects_of("Deployment") if d["metadata"]["name"] == "funnel-server"]
    return deployment


def server_container() -> dict:
    (container,) = server_deployment()["spec"]["template"]["spec"]["containers"]
    return container


def store_env() -> str:
    """The variable that points the server at its live store (workflows/live_store.py)."""
    from workflows.live_store import STORE_ENV

    return STORE_ENV


# --- the image ---------------------------------------------------------------------------------------


def makefile_venv_recipe() -> tuple[list[str], list[str]]:
    """The prerequisites and shell lines of the Makefile's venv step (the rule that makes its stamp)."""
    text = (ROOT / "Makefile").read_text()
    assert re.search(r"^venv:\s*\$\(STAMP\)\s*$", text, flags=re.M), "make venv builds the stamp"
    rule = re.search(r"^\$\(STAMP\):(.*)\n((?:\t.*\n)+)", text, flags=re.M)
    return rule.group(1).split(), [line.strip() for line in rule.group(2).splitlines()]


def test_the_image_installs_with_the_makefiles_venv_step_and_nothing_else():
    prerequisites, recipe = makefile_venv_recipe()
    installs = " ".join(recipe)
    assert "-r requirements.lock" in installs and "-e ." in installs  # the lock, then the project
    runs = instruction(ROOT / "Dockerfile", "RUN")
    (install,) = [r for r in runs if run_command(r).startswith("make ")]
    assert not [r for r in runs if "pip " in run_command(r)], "no pip besides the Makefile's"
    # the step itself, on the Python the Makefile asks for (PYTHON ?= python3.11) and the image has
    make_args = run_command(install).split()[1:]
    assert make_args[0] == "venv", install
    python = dict(a.split("=", 1) for a in make_args[1:]).get("PYTHON")
    default = re.search(r"^PYTHON\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), flags=re.M).group(1)
    assert python == default
    (base,) = instruction(ROOT / "Dockerfile", "FROM")
    assert base.startswith("python:" + default.removeprefix("python")), base
    # everything the step reads is in the image before it runs
    copied = copied_paths(ROOT / "Dockerfile", before=install)
    assert set(prerequisites) <= copied
    assert {"Makefile", "README.md"} <= copied  # README.md: pyproject's readme, read by pip install -e .
    # every package pip install -e . finds ([tool.setuptools.packages.find] include = [...])
    include = re.search(r"packages\.find\]\s*include\s*=\s*\[([^\]]*)\]", (ROOT / "pyproject.toml").read_text())
    packages = {p.strip().strip('"').rstrip("*") for p in include.group(1).split(",")}
    assert packages and packages <= copied


def run_command(args: str) -> str:
    """A RUN instruction's shell command, without the instruction's own options (``--mount=...``)."""
    words = args.split()
    while words and words[0].startswith("--"):
        words.pop(0)
    return " ".join(words)


def copied_paths(path: Path, before: str | None = None) -> set[str]:
    """Repository paths the Dockerfile COPYs (all of them, or those before the RUN ``before``)."""
    paths = set()
    for word, args in dockerfile_instructions(path):
        if word == "RUN" and args == before:
            break
        if word == "COPY":
            *sources, _ = [a for a in args.split() if not a.startswith("--")]
            paths |= {s.rstrip("/") for s in sources}
    return paths


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_path_the_image_copies_exists_and_is_in_the_build_context(dockerfile):
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    ignored = [p for p in ignored if p and not p.startswith("#")]
    copied = copied_paths(dockerfile)
    assert copied
    for source in copied:
        assert (ROOT / source).exists(), f"{dockerfile.name} copies {source}, which does not exist"
        assert not any(fnmatch.fnmatch(source, p) for p in ignored), f"{source} is excluded by .dockerignore"
    if dockerfile != ROOT / "Dockerfile":
        assert copied == copied_paths(ROOT / "Dockerfile"), "both images carry the same files"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_image_runs_serve_on_loopback_with_its_ports_exposed_and_the_deep_probe(dockerfile):
    entrypoint = exec_form(instruction(dockerfile, "ENTRYPOINT")[0])
    assert in_repo(dockerfile, entrypoint[1]) == SERVE
    args = serve_args(exec_form(instruction(dockerfile, "CMD")[0]))
    assert args.host == "127.0.0.1", "only a deployment that says --host 0.0.0.0 exposes the server"
    assert not any("0.0.0.0" in a for _, a in dockerfile_instructions(dockerfile))
    exposed = {int(p) for e in instruction(dockerfile, "EXPOSE") for p in e.split()}
    assert exposed == set(serve_ports().values())
    (healthcheck,) = instruction(dockerfile, "HEALTHCHECK")
    probe_command_ok(exec_form(healthcheck.split(" CMD ", 1)[1]), image=dockerfile)
    env = " ".join(instruction(dockerfile, "ENV"))
    for name in (LOG_ENV, store_env()):  # written in the image's state folder, not beside the repository
        assert f"{name}=/var/lib/funnel/" in env


def test_the_gpu_image_builds_on_ngc_merlin_and_installs_the_locks_pins():
    dockerfile = ROOT / "Dockerfile.gpu"
    (arg,) = [a for a in instruction(dockerfile, "ARG") if a.startswith("BASE_IMAGE=")]
    assert arg.split("=", 1)[1].startswith("nvcr.io/nvidia/merlin/")
    assert instruction(dockerfile, "FROM") == ["${BASE_IMAGE}"]
    lock = (ROOT / "requirements.lock").read_text()
    (install,) = [r for r in instruction(dockerfile, "RUN") if "pip install" in r]
    steps = [step.split("pip install", 1)[1].split() for step in install.split("&&") if "pip install" in step]
    assert steps[0][-2:] == ["-e", "."]  # the project first, as make venv installs it
    installed = set()
    for step in steps[1:]:  # everything else at the lock's versions
        assert step[step.index("-c") + 1] == "requirements.lock", step
        step = step[: step.index("-c")] + step[step.index("-c") + 2 :]
        words = [w.strip('"};') for w in step if not w.startswith("-")]
        packages = [w.split("[")[0] for w in words if w]
        assert packages, step
        installed.update(packages)
        for name in packages:
            assert re.search(rf"^{re.escape(name)}==", lock, flags=re.M | re.I), f"{name} is not in the lock"
    # the image ships Merlin Models 23.08; the code and its patches are checked against the lock's
    assert "merlin-models" in installed


# --- compose ---------------------------------------------------------------------------------------


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def published(service: dict) -> dict[int, str]:
    """``{container port: host address}`` of a compose service's ``ports`` (``host:hostport:port``)."""
    out = {}
    for entry in service.get("ports", []):
        host, _, port = str(entry).rpartition(":")
        out[int(port)] = host.rpartition(":")[0]
    return out


VOLUME = re.compile(r"(?P<source>.+?):(?P<target>/[^:]*)(?::(?P<mode>\w+))?")


def bind_mounts(service: dict) -> dict[str, str]:
    """``{container path: source}`` of a compose service's volumes (``source:/target[:mode]``)."""
    return {m["target"]: m["source"] for m in (VOLUME.fullmatch(v) for v in service.get("volumes", []))}


DOCKER_RUN_MOUNT = re.compile(r'-v "(?P<source>[^":]+):(?P<target>/[^":]*)(?::(?P<mode>\w+))?"')


def repository_mounts() -> list[tuple[str, str, str, str]]:
    """``(where, source, container path, mode)`` of each mount that carries the model repository:
    compose's server volume and the ``docker run -v`` examples of the images and docs/deployment.md."""
    server = compose()["services"]["server"]
    repository = serve_args(server["command"]).model_repository
    out = [("compose.yaml", *VOLUME.fullmatch(v).group("source", "target", "mode")) for v in server["volumes"]]
    out = [m for m in out if Path(repository).is_relative_to(m[2])]
    for path in [*DOCKERFILES, ROOT / "docs" / "deployment.md"]:
        found = [(path.name, *m.group("source", "target", "mode")) for m in DOCKER_RUN_MOUNT.finditer(path.read_text())]
        assert found, f"{path.name} shows no docker run -v mount of the model repository"
        out += found
    return out


def test_the_repository_mounts_name_its_parent_folder_read_only():
    """``export_triton.py --replace`` swaps the repository folder for a new one and deletes the old:
    a bind mount of the folder itself pins the old one (deleted, empty) in a running container, so
    every later load fails there. Mounting the parent folder shows the swap."""
    image_repository = serve_args(exec_form(instruction(ROOT / "Dockerfile", "CMD")[0])).model_repository
    assert image_repository == serve_args(compose()["services"]["server"]["command"]).model_repository
    for where, source, target, mode in repository_mounts():
        inside = Path(image_repository).relative_to(target)  # the mount holds the repository ...
        assert inside.parts, f"{where} mounts the repository folder itself at {target}, not its parent"
        assert mode == "ro", where
        # ... under the name the export commands write (build/triton_repo).
        assert Path(source.rpartition(":-")[2].rstrip("}")).name == "build", (where, source)
        assert inside == Path("triton_repo"), (where, inside)


def test_compose_runs_the_image_exposed_inside_its_network_and_on_the_hosts_loopback_only():
    spec = compose()
    server = spec["services"]["server"]
    assert server["build"] == "." and (ROOT / "Dockerfile").is_file()
    args = serve_args(server["command"])
    assert args.host == "0.0.0.0"  # reachable by Prometheus over the compose network, because this file says so
    ports = published(server)
    assert set(ports) == set(serve_ports().values())
    for name, service in spec["services"].items():
        assert all(host == "127.0.0.1" for host in published(service).values()), name
    mounts = bind_mounts(server)
    parent = str(Path(args.model_repository).parent)  # the folder holding it (a --replace export swaps the repository)
    assert f"{mounts[parent]}:{parent}:ro" in server["volumes"]
    env = server["environment"]
    assert env[ADMIN_KEY_ENV].startswith("${" + ADMIN_KEY_ENV + ":?")  # required, never a default key
    # the feedback log and the live store: the compose network's PostgreSQL, its user and database
    assert env[LOG_ENV] == env[store_env()]
    url = urlparse(env[store_env()].replace("${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}", "secret"))
    postgres = spec["services"]["postgres"]
    assert (url.scheme, url.hostname, url.port) == ("postgresql", "postgres", 5432)
    assert (url.username, url.path.lstrip("/")) == (
        postgres["environment"]["POSTGRES_USER"],
        postgres["environment"]["POSTGRES_DB"],
    )
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy" and postgres["healthcheck"]
    # Over TCP: the image's first-start server (init scripts) listens on its socket only, and a check on
    # the socket passed then, before the real server was up.
    assert postgres["healthcheck"]["test"][:4] == ["CMD", "pg_isready", "-h", "127.0.0.1"], postgres["healthcheck"]


def test_every_file_compose_mounts_exists_and_every_named_volume_is_declared():
    spec = compose()
    for name, service in spec["services"].items():
        for source in bind_mounts(service).values():
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
            elif source.startswith("${"):
                assert ":-./" in source, source  # a user's path, with the default export as fallback
            else:
                assert source in spec["volumes"], f"{name}: volume {source} is not declared"


def test_prometheus_scrapes_the_servers_metrics_port_and_loads_the_projects_rules():
    spec = compose()
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    prometheus = spec["services"]["prometheus"]
    mounts = bind_mounts(prometheus)
    config_flag = [f for f in prometheus["command"] if f.startswith("--config.file=")][0]
    assert mounts[config_flag.split("=", 1)[1]] == "./" + str(PROMETHEUS_CONFIG.relative_to(ROOT))
    (rules,) = config["rule_files"]
    assert mounts[rules] == "./monitoring/prometheus/funnel-alerts.yml"
    (job,) = config["scrape_configs"]
    assert f'"{job["job_name"]}": [' in (ROOT / "scripts" / "monitor.py").read_text()  # the job monitor.py names
    (target,) = [t for s in job["static_configs"] for t in s["targets"]]
    host, port = target.split(":")
    assert host in spec["services"] and spec["services"][host]["command"] == spec["services"]["server"]["command"]
    assert int(port) == serve_ports()["metrics"]
    # Grafana: the provisioned data source is that Prometheus, the dashboard is the project's
    grafana = bind_mounts(spec["services"]["grafana"])
    assert grafana["/etc/grafana/provisioning"] == "./" + str(GRAFANA_PROVISIONING.relative_to(ROOT))
    (source,) = yaml.safe_load((GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    url = urlparse(source["url"])
    assert url.hostname == "prometheus" and url.port in published(prometheus) and source["isDefault"]
    (provider,) = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards" / "funnel.yml").read_text())["providers"]
    dashboards = [t for t, s in grafana.items() if s == "./monitoring/grafana/funnel-dashboard.json"]
    assert [str(Path(t).parent) for t in dashboards] == [provider["options"]["path"]]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (make services)")
def test_promtool_accepts_the_compose_prometheus_config(tmp_path):
    # the rule file at the path compose mounts it to is the repository's
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["rule_files"] = [str(ROOT / "monitoring" / "prometheus" / "funnel-alerts.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    check = subprocess.run(
        ["promtool", "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr


# --- Kubernetes --------------------------------------------------------------------------------------


def test_every_manifest_parses_into_objects_with_the_required_fields():
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    listed = set(kustomization["resources"])
    assert listed == {f.name for f in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    objects = kubernetes_objects()
    for obj in objects:
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(obj), obj.get("kind")
        assert obj["metadata"]["name"]
    names = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(names) == len(set(names))
    for workload in objects_of("Deployment") + objects_of("StatefulSet"):
        template = workload["spec"]["template"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
        declared = {v["name"] for v in template["spec"].get("volumes", [])}
        declared |= {c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])}
        for container in template["spec"]["containers"]:
            assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
            assert container["resources"]["limits"]["memory"]
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in declared, f"{container['name']} mounts undeclared volume {mount['name']}"
    claims = {o["metadata"]["name"] for o in objects_of("PersistentVolumeClaim")}
    for workload in objects_of("Deployment"):
        for volume in workload["spec"]["template"]["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims


def test_services_select_their_pods_and_target_ports_the_containers_name():
    workloads = objects_of("Deployment") + objects_of("StatefulSet")
    for service in objects_of("Service"):
        selector = service["spec"]["selector"]
        (pods,) = [w for w in workloads if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        ports = {
            p["name"]: p["containerPort"] for c in pods["spec"]["template"]["spec"]["containers"] for p in c["ports"]
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports and port["port"] == ports[port["targetPort"]], port
    for budget in objects_of("PodDisruptionBudget"):
        labels = budget["spec"]["selector"]["matchLabels"].items()
        assert any(labels <= w["spec"]["template"]["metadata"]["labels"].items() for w in workloads)


def test_the_server_deployment_runs_replicas_on_a_read_only_repository_exposed_because_it_says_so():
    deployment = server_deployment()
    assert deployment["spec"]["replicas"] >= 2
    container = server_container()
    args = serve_args(container["args"])
    assert args.host == "0.0.0.0"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == serve_ports()
    assert exec_form(instruction(ROOT / "Dockerfile", "ENTRYPOINT")[0])[1].endswith("scripts/serve.py")
    assert "command" not in container, "the image's ENTRYPOINT runs scripts/serve.py"
    # The volume holds the repository as its folder triton_repo, mounted at the folder above it: a
    # writer pod's export_triton.py --replace swaps that folder for a new one, which a volume root
    # (a mount point: nothing can rename it) refused. (Old manifest: mounted at /models/triton_repo.)
    (repository,) = [m for m in container["volumeMounts"] if m["name"] == "model-repository"]
    assert Path(args.model_repository).parent == Path(repository["mountPath"]), repository
    assert Path(args.model_repository).name == "triton_repo" and "subPath" not in repository
    assert repository["readOnly"] is True
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == repository["name"]]
    assert volume["persistentVolumeClaim"]["readOnly"] is True
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == serve_ports()["metrics"]
    # the Dockerfile's user is the one the pod runs as
    assert str(deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"]) in instruction(
        ROOT / "Dockerfile", "USER"
    )


def test_the_servers_probes_are_the_funnels_deep_probe():
    container = server_container()
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        parsed = probe_command_ok(probe["exec"]["command"])
        assert probe["timeoutSeconds"] >= 11, "longer than the probe's own 10 s request timeout"
        # The stub check is required: the container has the admin key (its env) and the server's
        # processes (its PID namespace), so a check that cannot run is a broken deployment.
        assert parsed.stubs is True, f"the {kind} does not require the stub check"
    startup = container["startupProbe"]
    startup_timeout = inspect.signature(TritonServer).parameters["startup_timeout"].default
    assert startup["periodSeconds"] * startup["failureThreshold"] > startup_timeout  # models may load that long


def test_secrets_come_from_secrets_and_the_store_from_the_networked_backend():
    env = {e["name"]: e for e in server_container()["env"]}
    assert env[ADMIN_KEY_ENV]["valueFrom"]["secretKeyRef"] == {"name": "funnel-admin-key", "key": "key"}
    for name in (store_env(), LOG_ENV):  # one PostgreSQL for the state the replicas share
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "funnel-store", "key": "url"}
    (postgres,) = objects_of("StatefulSet")
    (container,) = postgres["spec"]["template"]["spec"]["containers"]
    pg_env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in pg_env["POSTGRES_PASSWORD"]["valueFrom"]
    # ready over TCP (the image's first-start server listens on its socket only), as in compose
    assert container["readinessProbe"]["exec"]["command"][:3] == ["pg_isready", "-h", "127.0.0.1"]
    # no secret value is written in any manifest
    text = "\n".join(f.read_text() for f in KUBERNETES.glob("*.yaml"))
    assert "kind: Secret" not in text and "password:" not in text.lower().replace("key: password", "")


def test_the_exposed_server_speaks_tls_and_its_probes_trust_it():
    """docs/security.md: a server bound to every interface gives gRPC TLS, because the admin key travels
    in a header. The certificate, key and CA come from a mounted Secret; every probe checks the server
    against that CA (a plain probe on a TLS port fails, and the kubelet would restart a healthy server);
    and the Service offers no plain HTTP port (Triton's HTTP has no TLS)."""
    container = server_container()
    args = serve_args(container["args"])
    assert args.host == "0.0.0.0"
    assert args.tls_cert and args.tls_key, "exposed on 0.0.0.0 without --tls-cert/--tls-key"
    volumes = {v["name"]: v for v in server_deployment()["spec"]["template"]["spec"]["volumes"]}

    def from_secret(path: str) -> str:
        mounts = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
        assert mounts, f"{path} is on no mounted volume"
        assert "secret" in volumes[mounts[0]["name"]], f"{path} does not come from a Secret"
        return volumes[mounts[0]["name"]]["secret"]["secretName"]

    secret = from_secret(args.tls_cert)
    assert from_secret(args.tls_key) == secret
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        parsed = probe_command_ok(container[kind]["exec"]["command"])
        assert parsed.tls_ca, f"the {kind} speaks plain gRPC to a TLS server"
        assert from_secret(parsed.tls_ca) == secret
    (service,) = [s for s in objects_of("Service") if s["metadata"]["name"] == "funnel-server"]
    assert "http" not in {p["targetPort"] for p in service["spec"]["ports"]}
