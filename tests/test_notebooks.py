"""Every notebook executes top to bottom (they are documentation that must not rot).

Each notebook is its own test class. ``make test`` runs pytest-xdist with ``--dist loadscope``,
which keeps a class (or else a module) on one worker: as one parametrized function the six
notebooks - the slowest tests of the suite - ran one after another on a single worker. As six
classes they spread over the workers, and ``conftest.py`` schedules the longest scopes first so no
long one is left running alone at the end.
"""

import os
import re
import tempfile
from pathlib import Path

import nbformat
import pytest
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def execute(path: Path, workdir: Path) -> KernelManager:
    """Run every cell of ``path`` in a fresh kernel with ``workdir`` as its folder; the kernel is shut
    down after (the returned manager has none)."""
    nb = nbformat.read(path, as_version=4)
    # The kernel talks over Unix sockets in a directory of its own, not TCP: a TCP kernel picks free
    # ports and binds them later, and a worker starting a server (or another kernel) in between took
    # one ("Address already in use", the kernel died before replying). A short /tmp path keeps the
    # sockets under the 107-character limit whatever pytest's tmp_path is.
    # The connection file goes there too (jupyter_client's default is a tmp*.json in /tmp, left
    # behind). The kernel's TMPDIR is the test's own folder: the notebooks make their work folders
    # with tempfile.mkdtemp, 2.2 GB in /tmp after a day of test runs; pytest prunes its own.
    with tempfile.TemporaryDirectory(prefix="kernel-") as sockets:
        km = KernelManager(
            kernel_name="python3",
            transport="ipc",
            ip=str(Path(sockets) / "k"),
            connection_file=str(Path(sockets) / "kernel.json"),
        )
        client = NotebookClient(nb, km=km, timeout=900, resources={"metadata": {"path": str(workdir)}})
        # cleanup_kc: nbclient shuts down only a kernel whose manager it made itself. Given ours, it
        # left each notebook's kernel running (1.2-1.5 GB each) until the pytest worker exited.
        client.execute(cleanup_kc=True, env={**os.environ, "TMPDIR": str(workdir)})
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, f"{path.name}: {[e.get('ename') for e in errors]}"
    # Every notebook makes its work folder with mkdtemp: it is here, not in /tmp.
    assert any(re.fullmatch(r"[a-z]+-[a-z0-9_]{8}", p.name) for p in workdir.iterdir() if p.is_dir()), path.name
    return km


def _notebook_class(path: Path) -> type:
    @pytest.mark.slow
    def test_executes(self, tmp_path):
        execute(path, tmp_path)

    name = "TestNotebook_" + path.stem.replace("-", "_")
    return type(name, (), {"test_executes": test_executes, "__doc__": f"notebooks/{path.name} executes."})


for _path in NOTEBOOKS:
    _cls = _notebook_class(_path)
    globals()[_cls.__name__] = _cls


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_is_valid_nbformat_with_cell_ids(path):
    """Each cell has an id (nbformat 4.5; a missing one is a warning today, an error in later nbformat)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
    assert all(cell.get("id") for cell in nb.cells)


def test_a_notebooks_kernel_is_shut_down_once_it_has_run(tmp_path):
    """Each notebook's kernel stayed alive until its pytest worker ended: six kernels of 1.2-1.5 GB
    each held at once by the end of ``make test``."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import tempfile\ntempfile.mkdtemp(prefix='tiny-')")]
    path = tmp_path / "tiny.ipynb"
    nbformat.write(nb, path)
    workdir = tmp_path / "work"
    workdir.mkdir()
    km = execute(path, workdir)
    assert not km.has_kernel
