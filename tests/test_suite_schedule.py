"""The suite's own schedule: the recorded scope durations ``make test`` sorts by (tests/conftest.py)."""

import json
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def test_recorded_durations_name_existing_scopes_longest_first():
    from conftest import SCOPE_DURATIONS, scope_of

    seconds = json.loads(SCOPE_DURATIONS.read_text())
    assert list(seconds.values()) == sorted(seconds.values(), reverse=True)
    modules = {scope.split("::")[0] for scope in seconds}
    assert all((TESTS.parent / module).is_file() for module in modules), modules
    # the scope of a class's test is its class, of a module-level test its module (as --dist loadscope)
    assert scope_of("tests/test_notebooks.py::TestNotebook_00_quickstart::test_executes") == (
        "tests/test_notebooks.py::TestNotebook_00_quickstart"
    )
    assert scope_of("tests/test_notebooks.py::test_is_valid_nbformat_with_cell_ids[00-quickstart]") == (
        "tests/test_notebooks.py"
    )


def test_a_run_under_xdist_records_every_workers_scopes(tmp_path):
    out = tmp_path / "durations.json"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider", "--record-scope-durations",
         str(out), "tests/test_ordering.py", "tests/test_item_index.py"],
        cwd=TESTS.parent, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    seconds = json.loads(out.read_text())
    assert set(seconds) == {"tests/test_ordering.py", "tests/test_item_index.py"}
    assert all(s > 0 for s in seconds.values()) and list(seconds.values()) == sorted(seconds.values(), reverse=True)
