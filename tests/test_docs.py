"""The front door stays a front door, and every link of the docs leads somewhere."""

import argparse
import ast
import contextlib
import dataclasses
import importlib
import io
import json
import re
import shutil
import subprocess
import typing
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def outside_code_fences(text: str) -> str:
    """The text with each fenced code block's lines blanked: a ``# comment`` in a shell block is no heading."""
    lines, fence = text.splitlines(), None
    for i, line in enumerate(lines):
        opening = re.match(r"\s*(`{3,}|~{3,})", line)
        if fence is None and opening:
            fence, lines[i] = opening.group(1), ""
        elif fence is not None:
            if re.fullmatch(r"\s*" + re.escape(fence[0]) + "{" + str(len(fence)) + r",}\s*", line):
                fence = None
            lines[i] = ""
    return "\n".join(lines)


def anchors(text: str) -> set[str]:
    """GitHub's anchors of a page's headings: a repeated heading's takes -1, -2, ..."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} +(.+?)(?: +#+)? *$", outside_code_fences(text), flags=re.M):
        base = slug(re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading))  # a link in a heading: its text
        found.add(f"{base}-{seen[base]}" if base in seen else base)
        seen[base] = seen.get(base, 0) + 1
    return found


def test_readme_is_at_most_150_lines_and_names_no_issue_numbers():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    assert not re.search(r"\bissues? #?\d+", text, flags=re.I)


def markdown_of(page: Path) -> str:
    """A page's text; a notebook's markdown cells."""
    if page.suffix != ".ipynb":
        return page.read_text()
    cells = json.loads(page.read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")


# Notebooks too (their links into docs/ were never checked): a renamed heading breaks them as well.
@pytest.mark.parametrize(
    "page", PAGES + sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(markdown_of(page)):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md":
            if anchor not in anchors(resolved.read_text()):
                broken.append(target)
    assert not broken, broken


def test_every_docs_page_is_linked_from_the_readme_or_the_docs_index():
    linked = set()
    for page in (ROOT / "README.md", ROOT / "docs" / "README.md"):
        linked |= {(page.parent / t.partition("#")[0]).resolve() for t in LINK.findall(page.read_text())}
    unlinked = [p.name for p in (ROOT / "docs").glob("*.md") if p.name != "README.md" and p.resolve() not in linked]
    assert not unlinked, unlinked


NOTEBOOK_CELLS = [
    (nb, cell["cell_type"], "".join(cell["source"]))
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb"))
    for cell in json.loads(nb.read_text())["cells"]
]
PROSE = [(page, page.read_text()) for page in PAGES] + [(nb, s) for nb, kind, s in NOTEBOOK_CELLS if kind == "markdown"]
TEXTS = PROSE + [(nb, s) for nb, kind, s in NOTEBOOK_CELLS if kind == "code"]
COMMAND = re.compile(r"(?<![\w/.])((?:scripts|benchmarks)/\w+\.py)|-m\s+((?:scripts|benchmarks)\.\w+)")
PACKAGES = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").exists())

# The repository's own folders: a path under one of them in the prose names a file of the checkout. Not
# build/, data/ or a user's myshop/ (made by the commands the docs show), nor `$OUT/models/...` or
# `/models/triton_repo` (a mount), which the look-behind skips.
REPO_DIRS = sorted({*PACKAGES, "docs", "monitoring", "notebooks", "scripts", "tests", "triton_repo"})
REPO_PATH = re.compile(
    r"(?<![\w./$~-])((?:" + "|".join(REPO_DIRS) + r")/[\w./-]*\w)"
    r"(?![\w-]|[./]?[<{*$]|/?\.\.\.)"  # not a placeholder: `configs/<name>.yaml`, `triton_repo/funnel/...`
)
# `kubectl scale deployment/funnel-server`: a Kubernetes object, not the folder deployment/.
KUBECTL_OBJECT = re.compile(r"\bkubectl\s+(?:[a-z]+\s+){1,2}$")


def test_every_repository_path_named_in_the_docs_exists():
    """`workflows/point_in_time.py`, configs/movielens-recbole.yaml, `monitoring/prometheus/funnel-alerts.yml`
    in the README, docs/ and the notebooks' prose, in backticks or not: a file or folder of the repository."""
    missing = []
    for where, text in PROSE:
        for m in REPO_PATH.finditer(text):
            line_before = text[text.rfind("\n", 0, m.start()) + 1 : m.start()]
            if KUBECTL_OBJECT.search(line_before) or (ROOT / m.group(1)).exists():
                continue
            missing.append(f"{where.name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(1)}")
    assert not missing, missing


@cache
def parsed(source: Path) -> ast.Module:
    return ast.parse(source.read_text())


@cache
def argparse_flags(script: Path) -> set[str]:
    """The option strings of every ``add_argument`` call in a script (read, not imported: no TensorFlow)."""
    flags = set()
    for node in ast.walk(parsed(script)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
    return flags


def test_every_flag_of_a_documented_command_exists():
    """`scripts/x.py --flag ...` and `python -m benchmarks.x --flag ...` in the docs and the notebooks:
    each flag on that command line is one the script's argparse defines."""
    wrong = []
    for where, text in TEXTS:
        for m in COMMAND.finditer(text):
            script = ROOT / (m.group(1) or m.group(2).replace(".", "/") + ".py")
            if not script.exists():
                wrong.append(f"{where.name}: no {script.relative_to(ROOT)}")
                continue
            line = ""
            for part in text[m.end() :].split("\n"):  # the command, with its continuation lines
                line += part
                if not part.rstrip().endswith("\\"):
                    break
            command = re.split(r"`|;|&&|\|\||\s#|\s\|\s|\)", line)[0]
            known = argparse_flags(script) | {"-h", "--help"}
            wrong += [
                f"{where.name}: {script.relative_to(ROOT)} {flag}"
                for flag in re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", command)
                if flag not in known
            ]
    assert not wrong, wrong


def shown_commands(text: str):
    """(kind, logical line) of a page's code: each fenced or indented block line (continuations joined),
    each inline code span. Prose outside code is not a command line."""
    pieces, fence, buf, prose = [], None, "", []
    for line in text.splitlines():
        opening = re.match(r"\s*(`{3,}|~{3,})", line)
        if fence is None and opening:
            fence = opening.group(1)
        elif fence is not None and re.fullmatch(r"\s*" + re.escape(fence[0]) + "{" + str(len(fence)) + r",}\s*", line):
            fence = None
        elif fence is not None or re.match(r" {4,}(\.venv/bin/)?(python|make|scripts/)", line):
            buf += line.rstrip()
            if buf.endswith("\\"):
                buf = buf[:-1] + " "
                continue
            pieces.append(("block", buf))
            buf = ""
        else:
            prose.append(line)
    pieces += [("inline", span) for span in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", "\n".join(prose))]
    for kind, line in pieces:
        for command in re.split(r"&&|\|\||;|\s\|\s|\s&(?:\s|$)|\$\(|\)", re.split(r"(?:^|\s)#", line)[0]):
            yield kind, command


SHOWN_SCRIPT = re.compile(
    r"(?<![\w/.-])(?:\./)?((?:scripts|benchmarks)/\w+\.py)|python[\d.]*\s+-m\s+((?:scripts|benchmarks)\.\w+)"
)
SHOWN_MAKE = re.compile(r"(?:^|\s)make((?:\s+[\w-]+(?:=\S*)?)+)")
# A value the reader fills in: `<repository>`, `SECONDS`, `$seed`, `~/ml-100k`, `/tmp/...`, `postgresql://...`.
PLACEHOLDER = re.compile(r"<.*>|[A-Z][A-Z_]*|.*\.\.\..*|.*\$.*|~.*")


class ParserBuilt(Exception):
    pass


@cache
def script_parser(script: str) -> argparse.ArgumentParser | None:
    """The parser a script's main() builds, taken at its parse_args() (nothing of main after it runs);
    None for a module without main() (benchmarks/loadgen.py, a library). Importing the scripts takes
    about 4 s, nearly all of it TensorFlow (scripts/prepare_data.py's Merlin imports load it)."""
    module = importlib.import_module(script[:-3].replace("/", "."))
    if not hasattr(module, "main"):
        return None

    def built(parser, *args, **kwargs):
        raise ParserBuilt(parser)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", built)
        try:
            module.main()
        except ParserBuilt as e:
            return e.args[0]
    raise AssertionError(f"{script}: main() did not call parse_args")


def filled_in(parser: argparse.ArgumentParser, words: list[str]) -> list[list[str]]:
    """The command lines a synopsis stands for: each placeholder a value its option accepts, each
    `a|b` one of the alternatives, `[--flag]` the flag."""
    lines = [[]]
    for i, word in enumerate(words):
        action = parser._option_string_actions.get(words[i - 1]) if i else None
        if action is not None and action.nargs == 0:
            action = None
        choices = [word]
        if "|" in word and not word.startswith("-"):
            choices = word.split("|")
        elif PLACEHOLDER.fullmatch(word):
            choices = ["x"]
            if action is not None and action.choices:
                choices = [next(iter(action.choices))]
            elif action is not None:
                for value in ("1", "0.5", "127.0.0.1:8001", "15s", "http://x", "configs/default.yaml", "x"):
                    try:
                        (action.type or str)(value)
                    except (argparse.ArgumentTypeError, TypeError, ValueError):
                        continue
                    choices = [value]
                    break
        lines = [line + [choice] for line in lines for choice in choices]
    return lines


def parse_error(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            parser.parse_args(argv)
    except SystemExit:
        return stderr.getvalue().strip().splitlines()[-1]
    return None


def test_every_documented_command_parses_with_its_scripts_parser():
    """`python scripts/x.py --flag value ...`, `python -m benchmarks.x ...` in a code block or span of
    the docs and the notebooks' prose: the script's own argparse parser takes it (the flag exists, the
    value is one of its choices and of its type, no argument is left over). A file the reader makes
    first (`--config myshop/config.yaml`) counts as there; an inline span may name a flag without
    its value (`scripts/evaluate.py --spec`) or leave out a required argument."""
    wrong, checked = [], 0
    for where, text in PROSE:
        for kind, command in shown_commands(text):
            m = SHOWN_SCRIPT.search(command)
            if not m:
                continue
            script = m.group(1) or m.group(2).replace(".", "/") + ".py"
            rest = command[m.end() :].replace("[", " ").replace("]", " ")
            parser = script_parser(script) if (ROOT / script).exists() else None
            if parser is None:
                continue  # a missing script: test_every_flag_of_a_documented_command_exists says so
            checked += 1
            words = [w for w in re.findall(r"<[^>]*>|'[^']*'|\"[^\"]*\"|\S+", rest) if w != "..."]
            words = [w[1:-1] if w[:1] in "'\"" and w[-1:] == w[:1] else w for w in words]
            errors = []
            for argv in filled_in(parser, words):
                error = parse_error(parser, argv)
                made = re.search(r"no such file: (\S+)", error or "")
                if made and made.group(1).split("/")[0] not in REPO_DIRS:
                    error = parse_error(parser, [("configs/default.yaml" if a == made.group(1) else a) for a in argv])
                if error and kind == "inline":
                    if "required" in error or (argv and argv[-1].startswith("-") and "expected" in error):
                        error = None
                if error is None:
                    break
                errors.append(error)
            else:
                wrong.append(f"{where.name}: {script}{command[m.end() :].rstrip()}: {errors[0]}")
    assert checked > 150, checked  # the pages' commands were found
    assert not wrong, wrong


def test_every_documented_make_target_exists():
    """`make demo`, `make test TEST_WORKERS=0` in a code block or span of the docs: `make -n` knows the target."""
    if shutil.which("make") is None:
        pytest.skip("no make")
    targets = set()
    for _, text in PROSE:
        for _, command in shown_commands(text):
            if m := SHOWN_MAKE.search(command):
                targets |= {w for w in m.group(1).split() if "=" not in w}
    assert {"demo", "test"} <= targets
    missing = []
    for target in sorted(targets):
        done = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
        if done.returncode:
            missing.append(f"make {target}: {done.stderr.strip()}")
    assert not missing, missing


def config_keys() -> set[str]:
    from configs import Config

    keys = set()

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            keys.add(prefix + f.name)
            for t in (hints[f.name], *typing.get_args(hints[f.name])):
                if dataclasses.is_dataclass(t):
                    walk(t, f"{prefix}{f.name}.")

    walk(Config, "")
    return keys


def python_name_exists(dotted: str) -> bool:
    """``package.module.name`` (or ``.Class.attribute``) is defined there, read with ast."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:i])
        source = next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.exists()), None)
        if source is None:
            continue
        rest, body = parts[i:], parsed(source).body
        for name in rest[:2]:
            node = next((n for n in ast.walk(ast.Module(body=body, type_ignores=[])) if defines(n, name)), None)
            if node is None:
                return False
            if not isinstance(node, ast.ClassDef):
                return True  # an attribute of a function, a constant or an import: not followed
            body = node.body
        return True
    return False


def defines(node: ast.AST, name: str) -> bool:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name == name
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return any((a.asname or a.name).split(".")[0] == name for a in node.names)
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return any(isinstance(n, ast.Name) and n.id == name for t in targets for n in ast.walk(t))
    if isinstance(node, ast.Attribute):  # self.name = ... in a class
        return node.attr == name and isinstance(node.ctx, ast.Store)
    return False


# What models/train.py logs to MLflow under a config section's name (docs/training.md).
MLFLOW_NAMES = {"tuning.chosen", "tuning.ndcg_at_10", "tuning.best.ndcg_at_10"}


def test_every_dotted_config_key_and_python_name_exists():
    """`serving.ordering.affinity_weight`, `tuning.logq_strength`: a key of the typed config
    (configs/__init__.py); `deployment.rollout.roll_out`, `serving.fused.FusedFunnel.run`: defined
    in that module. A name that is neither (`serving.ordering` is both) is stale."""
    keys = config_keys()
    sections = sorted({k.split(".")[0] for k in keys} | set(PACKAGES))
    dotted = re.compile(r"(?<![\w./$-])((?:" + "|".join(sections) + r")(?:\.[A-Za-z_]\w*)+)(?!\w|\.\w|/)")
    stale = []
    for where, text in PROSE:
        for m in dotted.finditer(text):
            name = m.group(1)
            if re.search(r"\.(py|md|ya?ml|json|html|pbtxt|ipynb)$", name):
                continue
            top = name.split(".")[0]
            if name in keys or name in MLFLOW_NAMES or (top in PACKAGES and python_name_exists(name)):
                continue
            if top not in PACKAGES and not any(k.startswith(top + ".") for k in keys):
                continue
            stale.append(f"{where.name}: {name}")
    assert not stale, stale


def test_notebook_ab_analysis_counts_empty_responses():
    """A notebook's A/B analysis of the server's log passes the responses that showed nothing, as
    ``online.ab_experiment.run_ab_test`` does: without them a user whose responses were all empty
    left its arm (and the SRM count), and a churn after an empty response was dropped."""
    calls = [
        (nb.name, node)
        for nb, kind, source in NOTEBOOK_CELLS
        if kind == "code"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "analyze"
    ]
    assert calls
    assert [name for name, call in calls if "empty_responses" not in {k.arg for k in call.keywords}] == []


STORE_STAGES = ("FeatureLookup", "QueryTower")  # stages with a close() for what they open


@pytest.mark.parametrize("notebook", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_close_the_stages_they_build(notebook):
    """A notebook that builds a feature lookup or a query tower closes it (``Stage.close``): 02 built
    both and left their store connections open, one of them a FeatureLookup never named."""
    code = "\n".join(s for nb, kind, s in NOTEBOOK_CELLS if nb == notebook and kind == "code")
    tree = ast.parse("\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("%", "!"))))
    built, closed = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
            targets = node.targets[0].elts if isinstance(node.targets[0], ast.Tuple) else node.targets
            for target, value in zip(targets, values):
                if isinstance(value, ast.Call) and getattr(value.func, "attr", None) in STORE_STAGES:
                    built.append(getattr(target, "id", None))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "close" and isinstance(node.func.value, ast.Name):
                closed.add(node.func.value.id)
            inner = node.func.value
            if isinstance(inner, ast.Call) and getattr(inner.func, "attr", None) in STORE_STAGES:
                built.append(None)  # used without a name (``FeatureLookup(...).run(...)``): nothing closes it
    assert all(name in closed for name in built), (notebook.name, built, sorted(closed))


def test_notebook_01_pairs_each_label_with_its_own_event(tmp_path, monkeypatch):
    """Notebook 01's "one signal is not relevance" table pairs the processed labels with the raw training
    events row by row. It merged the durations in first: pandas 1.5 returns an inner merge's rows grouped
    by key, so where the events are not already grouped by item (a cudf join's output order on a GPU) each
    label landed on another event and the watched rate per duration bucket was noise. Here the rows
    alternate between a short and a long item, and every short one is watched."""
    import types

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd

    import workflows.pipeline
    from workflows.local_parquet import read_parquet

    nb = ROOT / "notebooks" / "01-dataset-creation.ipynb"
    cell = next(s for name, kind, s in NOTEBOOK_CELLS if name == nb and kind == "code" and "bucket_names" in s)
    n = 40
    item = np.tile([1, 2], n // 2)  # raw ids: 1 lasts 30 s, 2 lasts 1 h
    short = item == 1
    events = pd.DataFrame({"user_id": np.arange(n), "item_id": item, "click": 1})
    events.to_parquet(tmp_path / "train_events.parquet", index=False)
    train = pd.DataFrame(
        {
            "item_id": item + 10,  # encoded ids
            "click": 1,
            "watched": short.astype(float),
            "duration_watch": short.astype(float),
        }
    )
    processed = types.SimpleNamespace(
        train=lambda: types.SimpleNamespace(to_ddf=lambda: types.SimpleNamespace(compute=lambda: train)),
        train_events=tmp_path / "train_events.parquet",
        workflow=lambda: None,
    )
    mapping = pd.DataFrame({"raw": [1, 2], "encoded": [11, 12]})
    monkeypatch.setattr(workflows.pipeline, "category_mapping", lambda workflow, column: mapping)
    world = types.SimpleNamespace(items=pd.DataFrame({"item_id": [2, 1], "duration_seconds": [3600.0, 30.0]}))
    namespace = {
        "processed": processed,
        "world": world,
        "truth": types.SimpleNamespace(clickbait_items=[2]),
        "summary": {"duration_watch_thresholds": {"bucket_edges": [60.0, 300.0, 1200.0]}},
        "read_parquet": read_parquet,
        "pd": pd,
        "np": np,
        "plt": plt,
    }
    exec(compile(cell, str(nb), "exec"), namespace)
    plt.close("all")
    rates = namespace["rates"]
    assert rates.loc["<1 min", "watched"] == 1.0
    assert rates.loc[">20 min", "watched"] == 0.0
