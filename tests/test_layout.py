"""The tree is the pipeline: packages depend downwards only, no module imports another in a circle,
and no module reaches into another's private names (read from the source with ``ast``)."""

import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Lower layers first: a package may import from packages before it, never after.
LAYERS = ["configs", "workflows", "models", "serving", "deployment", "evaluation", "online", "benchmarks", "scripts"]


def modules() -> dict[str, Path]:
    out = {}
    for package in LAYERS:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def imports(path: Path):
    """``(imported module, imported names)`` of every absolute import in ``path``, function-local included."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []


def project_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = {name: set() for name in mods}
    for name, path in mods.items():
        for target, names in imports(path):
            if target in mods:
                graph[name].add(target)
            graph[name].update(f"{target}.{n}" for n in names if f"{target}.{n}" in mods)
    return graph


def test_packages_import_only_lower_layers():
    wrong = []
    for name, targets in project_graph().items():
        for target in targets:
            if LAYERS.index(target.split(".")[0]) > LAYERS.index(name.split(".")[0]):
                wrong.append(f"{name} -> {target}")
    assert not wrong, wrong


def test_no_module_imports_in_a_circle():
    graph = project_graph()
    state, cycles = {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_no_private_names_are_imported_across_modules():
    mods = modules()
    private = [
        f"{name}: from {target} import {n}"
        for name, path in mods.items()
        for target, names in imports(path)
        if target.split(".")[0] in LAYERS
        for n in names
        if n.startswith("_")
    ]
    assert not private, private


def test_every_package_is_installed_by_the_project():
    text = (ROOT / "pyproject.toml").read_text()
    for package in LAYERS[:-1]:  # scripts/ are run, not imported
        assert f'"{package}*"' in text, package


def test_every_module_and_triton_entry_point_imports():
    """A moved or renamed module shows up here, not first inside a server's stub."""
    import importlib
    import runpy

    # the Airflow DAG needs Airflow, which this environment does not install (tests/test_retraining.py
    # checks its task list against the local runner's steps)
    for name in modules():
        if not name.startswith("scripts") and name != "online.airflow_dag":
            importlib.import_module(name)
    for entry in sorted((ROOT / "triton_repo").glob("*/1/model.py")):
        assert "TritonPythonModel" in runpy.run_path(str(entry)), entry


def direct_parquet_reads(source: str, where: str) -> list[str]:
    """``pd.read_parquet``, ``from pandas import read_parquet`` and ``read_dispatch(...)`` in ``source``."""
    direct = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Attribute)
            and node.attr == "read_parquet"
            and isinstance(node.value, ast.Name)
            and node.value.id in ("pd", "pandas")
        ):
            direct.append(f"{where}:{node.lineno} {node.value.id}.read_parquet")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "read_dispatch":
            direct.append(f"{where}:{node.lineno} read_dispatch")
        elif isinstance(node, ast.ImportFrom) and node.module == "pandas":
            direct += [
                f"{where}:{node.lineno} from pandas import read_parquet" for a in node.names if a.name == "read_parquet"
            ]
    return direct


def notebook_code_cells(path: Path):
    """``(cell id, Python source)`` of each code cell of the notebook at ``path``, IPython magics and shell
    lines turned into the calls IPython runs for them."""
    from IPython.core.inputtransformer2 import TransformerManager

    transform = TransformerManager().transform_cell
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code":
            source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
            yield cell.get("id"), transform(source)


def test_host_parquet_reads_go_through_the_local_parquet_helper():
    """``pd.read_parquet`` on a local path hands pyarrow a Python file object, whose buffers can abort the
    process at exit (workflows/local_parquet.py): no module outside tests/, and no notebook code cell, calls
    it, or Merlin's parquet dispatch, itself."""
    helper = "workflows.local_parquet"
    direct = []
    for name, path in modules().items():
        if name != helper:
            direct += direct_parquet_reads(path.read_text(), name)
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks
    for path in notebooks:
        for cell_id, source in notebook_code_cells(path):
            direct += direct_parquet_reads(source, f"notebooks/{path.name}[{cell_id}]")
    assert not direct, direct


def logic_lines(path: Path) -> int:
    """Lines of ``path`` that are code: not blank, not comments, docstrings, imports or ``add_argument``
    calls (a script's command line is declared there, however long)."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        declared = isinstance(node, (ast.Import, ast.ImportFrom)) or (
            isinstance(node, ast.Expr)
            and (
                isinstance(node.value, ast.Constant)
                or (isinstance(node.value, ast.Call) and getattr(node.value.func, "attr", "") == "add_argument")
            )
        )
        if declared:
            skip.update(range(node.lineno, node.end_lineno + 1))
    lines = path.read_text().splitlines()
    return sum(
        1 for i, line in enumerate(lines, 1) if line.strip() and not line.strip().startswith("#") and i not in skip
    )


def test_scripts_and_triton_entry_points_stay_thin():
    """A script parses its command line and calls library code; what a test or another script would
    want (a readiness check, an argument type) lives in a package. scripts/monitor.py carried its
    Prometheus readiness check and three argument types (148 lines of logic); each Triton ``model.py``
    only names its stage class over serving/triton_model.py."""
    thick = {
        str(path.relative_to(ROOT)): n for path in (ROOT / "scripts").glob("*.py") if (n := logic_lines(path)) > 120
    }
    assert not thick, thick
    for entry in sorted((ROOT / "triton_repo").glob("*/1/model.py")):
        defined = [n for n in ast.parse(entry.read_text()).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        assert [n.name for n in defined] == ["TritonPythonModel"] and logic_lines(entry) <= 10, entry


def test_no_private_module_attributes_are_used_across_modules():
    """``from x import _name`` is caught above; ``import x`` (or ``from pkg import x``) then ``x._name``
    reaches in the same way."""
    mods = modules()
    reached = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        bound = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                bound.update({a.asname: a.name for a in node.names if a.asname and a.name in mods})
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:
                    if f"{node.module}.{a.name}" in mods:
                        bound[a.asname or a.name] = f"{node.module}.{a.name}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                parts, value = [], node.value
                while isinstance(value, ast.Attribute):
                    parts.insert(0, value.attr)
                    value = value.value
                if not isinstance(value, ast.Name):
                    continue
                target = ".".join([bound.get(value.id, value.id), *parts])
                if target in mods and target != name:
                    reached.append(f"{name}:{node.lineno} {target}.{node.attr}")
    assert not reached, reached
