"""The notebooks run top to bottom (slow target); each is linked from the README."""

import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


def test_every_notebook_is_linked_from_the_readme():
    with open(os.path.join(ROOT, "README.md")) as fh:
        readme = fh.read()
    names = [os.path.basename(p) for p in NOTEBOOKS]
    assert "frameworks.ipynb" in names and len(names) >= 6, names
    assert [n for n in names if f"](notebooks/{n})" not in readme] == []


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes(path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
