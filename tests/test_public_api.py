"""The public API: every ``from fedledger... import ...`` line of the README works as written, every
name the packages export is in the README, and the package imports stay cheap."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import fedledger.chain
import fedledger.core
import fedledger.strategies

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "README.md")) as fh:
    README = fh.read()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
IMPORTS = [line.strip() for block in PYTHON_BLOCKS for line in block.splitlines()
           if line.strip().startswith("from fedledger")]


@pytest.mark.parametrize("line", IMPORTS)
def test_every_readme_import_works_as_written(line):
    namespace: dict = {}
    exec(line, namespace)  # noqa: S102
    names = [n.strip() for n in line.split(" import ", 1)[1].split(",")]
    assert all(namespace[n] is not None for n in names)


@pytest.mark.parametrize("package", [fedledger.chain, fedledger.strategies])
def test_every_exported_name_is_documented_and_imported_in_the_readme(package):
    imported = {n.strip() for line in IMPORTS if line.startswith(f"from {package.__name__} import ")
                for n in line.split(" import ", 1)[1].split(",")}
    assert set(package.__all__) <= imported, sorted(set(package.__all__) - imported)
    api = README[README.index("### Public API"):README.index("### Audit it without fedledger")]
    undocumented = [n for n in package.__all__ if f"`{n}" not in api]
    assert not undocumented, undocumented
    for name in package.__all__:
        assert getattr(package, name).__module__.startswith(package.__name__ + ".")


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        fedledger.chain.Nope  # noqa: B018


@pytest.mark.parametrize("module, absent", [
    ("fedledger.chain.hashing", "eth_account"),
    ("fedledger.chain", "web3"),
    ("fedledger.chain.signing", "web3"),
    ("fedledger.strategies.kernels", "networkx"),
    ("fedledger.strategies", "networkx"),
])
def test_package_imports_stay_cheap(module, absent):
    code = f"import sys, {module}; print({absent!r} in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.stdout.strip() == "False", out.stdout + out.stderr
