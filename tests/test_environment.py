"""The GPU route (environment.yml) installs what the CPU route (requirements.in) does.

environment.yml cannot be built here (no GPU, no conda channels), so this keeps it true by name:
every package of requirements.in appears in it, under its own name or the GPU build's."""

import re
from pathlib import Path

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
