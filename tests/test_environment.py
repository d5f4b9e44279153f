"""The GPU route (environment.yml) installs what the CPU route (requirements.in) does.

environment.yml cannot be built here (no GPU, no conda channels), so this keeps it true by name:
every package of requirements.in appears in it, under its own name or the GPU build's."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# requirements.in name -> the name environment.yml uses for the GPU build of the same thing
GPU_NAMES = {"tensorflow-cpu": "tensorflow", "faiss-cpu": "faiss-cpu"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line:
            out.append(normalise(re.split(r"[\[=<>!~ ;]", line)[0]))
    return out


def environment_names() -> set[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    names = set()
    for dep in env["dependencies"]:
        entries = dep["pip"] if isinstance(dep, dict) else [dep]
        names.update(requirement_names("\n".join(entries)))
    return names


def test_every_requirement_is_in_the_gpu_environment():
    required = requirement_names((ROOT / "requirements.in").read_text())
    assert required, "requirements.in lists no package"
    available = environment_names()
    missing = [name for name in required if normalise(GPU_NAMES.get(name, name)) not in available]
    assert not missing, f"environment.yml lacks {missing}"


def test_the_locked_environment_holds_every_requirement():
    locked = set(requirement_names((ROOT / "requirements.lock").read_text()))
    missing = [n for n in requirement_names((ROOT / "requirements.in").read_text()) if n not in locked]
    assert not missing, f"requirements.lock lacks {missing}: run make lock"


FAKE_PYTHON_311 = """#!/bin/sh
# a Python 3.11 that logs what it is asked; "-m venv [--clear] DIR" makes DIR/bin/python itself, as venv does:
# --clear empties DIR first, and without it an existing bin/python (a link, even dangling) is kept
echo "$0 $*" >> "{log}"
if [ -n "$FAKE_PIP_FAILS" ] && [ "$1 $2 $3" = "-m pip install" ]; then exit 1; fi
if [ "$1 $2" = "-m venv" ]; then
  for dir; do :; done
  if [ "$3" = "--clear" ]; then rm -rf "$dir"; fi
  mkdir -p "$dir/bin"
  if [ ! -L "$dir/bin/python" ] && [ ! -e "$dir/bin/python" ]; then cp "$0" "$dir/bin/python"; fi
fi
"""


def fake_project(tmp_path: Path) -> tuple[Path, Path]:
    """The Makefile and what its venv step reads in tmp_path, and a fake python3.11 logging its calls."""
    for name in ("Makefile", "requirements.lock", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    log = tmp_path / "calls.log"
    log.touch()
    python = tmp_path / "python3.11"
    python.write_text(FAKE_PYTHON_311.format(log=log))
    python.chmod(0o755)
    return python, log


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("venv", ["broken", "python3.12"])
@pytest.mark.parametrize("installed_before", [False, True])
def test_make_venv_recreates_a_venv_that_is_broken_or_from_another_python(tmp_path, venv, installed_before):
    """A .venv whose interpreter was removed (a dangling link) or that another Python made (python3 -m
    venv with Python 3.12) was kept: pip ran in it, or, with the stamp of an earlier install, nothing
    ran and `make demo` failed on .venv/bin/python."""
    python, log = fake_project(tmp_path)
    bin_ = tmp_path / ".venv" / "bin"
    bin_.mkdir(parents=True)
    if venv == "broken":
        (bin_ / "python").symlink_to(tmp_path / "removed" / "python3.11")
    else:  # answers like Python 3.12 would: not 3.11
        (bin_ / "python").write_text(f'#!/bin/sh\necho "old $*" >> "{log}"\nexit 1\n')
        (bin_ / "python").chmod(0o755)
    if installed_before:
        (tmp_path / ".venv" / ".installed").touch()
    run = subprocess.run(["make", "venv", f"PYTHON={python}"], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    calls = log.read_text().splitlines()
    assert f"{python} -m venv --clear .venv" in calls, calls
    assert not [c for c in calls if c.startswith("old ") and "pip" in c], calls
    assert any(c.endswith("-m pip install -qq --disable-pip-version-check -r requirements.lock") for c in calls)


def make_venv(tmp_path: Path, python: Path, log: Path, pip_fails: bool = False) -> tuple[int, list[str]]:
    log.write_text("")
    env = {**os.environ, "FAKE_PIP_FAILS": "1" if pip_fails else ""}
    run = subprocess.run(["make", "venv", f"PYTHON={python}"], cwd=tmp_path, env=env, capture_output=True, text=True)
    return run.returncode, log.read_text().splitlines()


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_venv_redoes_an_install_that_did_not_finish(tmp_path):
    """A .venv left by an interrupted install (a Python 3.11 that runs, no stamp) was reused: one cut
    short in `python -m venv` before pip was in it failed with 'No module named pip' on every make,
    until removed by hand. It is made afresh; one fully installed before is updated in place."""
    python, log = fake_project(tmp_path)
    venv, stamp = tmp_path / ".venv", tmp_path / ".venv" / ".installed"
    (venv / "bin").mkdir(parents=True)
    shutil.copy(python, venv / "bin" / "python")  # runs, is 3.11: what `python -m venv` makes first
    rc, calls = make_venv(tmp_path, python, log)
    assert rc == 0 and stamp.exists()
    assert f"{python} -m venv --clear .venv" in calls, calls
    # The lock changed since a finished install: updated in place, not made afresh.
    os.utime(stamp, (1, 1))
    rc, calls = make_venv(tmp_path, python, log)
    assert rc == 0 and stamp.exists()
    assert not [c for c in calls if "-m venv" in c], calls
    assert any(c.endswith("-m pip install -qq --disable-pip-version-check -r requirements.lock") for c in calls)
    # An update cut short leaves no stamp, so the next make starts again from a new venv.
    os.utime(stamp, (1, 1))
    rc, calls = make_venv(tmp_path, python, log, pip_fails=True)
    assert rc != 0 and not stamp.exists()
    rc, calls = make_venv(tmp_path, python, log)
    assert rc == 0 and f"{python} -m venv --clear .venv" in calls, calls


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="the install branch runs as root only")
def test_make_services_goes_on_when_apt_get_cannot_install(tmp_path):
    """As root, `make services` installs the missing Debian packages; an apt-get that failed (an
    offline machine, a package the distribution lacks) stopped `make test` before any test ran,
    where the tests that need the packages skip with the reason."""
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, script in (("dpkg-query", "exit 1"), ("apt-get", "echo 'E: offline' >&2; exit 100")):
        (fake / name).write_text(f"#!/bin/sh\n{script}\n")
        (fake / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    run = subprocess.run(["make", "services"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "could not install prometheus prometheus-alertmanager chromium postgresql libb64-0d" in run.stdout
