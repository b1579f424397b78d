"""An installable package: metadata Flower and the package index expect, no configuration warning
from ``flwr run``, and (``packaging`` target) a wheel that runs from a fresh virtualenv without
the checkout: ``fedledger --help``, the subpackages, a tiny audited simulation from an empty folder."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)


def test_pyproject_carries_licence_authors_and_classifiers():
    project = _pyproject()["project"]
    assert project["license"] == "Apache-2.0" and (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert project["license-files"] == ["LICENSE"]
    assert project["authors"] and project["description"] and project["readme"] == "README.md"
    assert any(c.startswith("Programming Language :: Python :: 3.11") for c in project["classifiers"])
    assert any(c.startswith("Development Status") for c in project["classifiers"])


@pytest.mark.parametrize("which", ["checkout", "installed app"])
def test_flower_finds_no_configuration_warning(which, tmp_path):
    from flwr.cli.config_utils import load_and_validate

    from fedledger.app_folder import write_app

    folder = ROOT if which == "checkout" else Path(write_app(str(tmp_path / "app")))
    _, warnings = load_and_validate(folder / "pyproject.toml", check_module=False)
    assert warnings == []


def test_the_installed_app_has_the_checkout_defaults_key_for_key(tmp_path):
    from fedledger.app_folder import write_app
    from fedledger.config import Settings, pyproject_defaults

    installed = pyproject_defaults(write_app(str(tmp_path / "app")))
    checkout = pyproject_defaults(str(ROOT))
    assert sorted(installed) == sorted(checkout)
    assert Settings.from_run_config(installed) == Settings.from_run_config(checkout)


# ---------------------------------------------------------------------------- the packaging target
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "fedledger", "core", "strategies", "clients", "chain")


def _build(kind: str, out: Path, source: Path) -> Path:
    """setuptools' PEP 517 hook in this environment (what `python -m build --no-isolation` calls),
    on a copy of the package's sources (the build leaves egg-info and build/ behind)."""
    if not source.exists():
        source.mkdir()
        for name in SOURCES:
            if (ROOT / name).is_dir():
                shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(ROOT / name, source / name)
    code = (f"from setuptools import build_meta as b; print(b.build_{kind}({str(out)!r}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True, timeout=300,
                          env=_clean_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


def _fresh_venv(folder: Path, wheel: Path) -> Path:
    """A new virtualenv with ``wheel`` installed (no dependencies), then given this environment's
    installed libraries (torch, flwr, ...) through a path entry, so nothing is downloaded. The wheel
    goes in first, so pip never sees this environment's own fedledger (an editable checkout), and
    that one is never imported: the .pth files of the reused folder are not executed."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(folder)], check=True, timeout=300, env=_clean_env())
    python = folder / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   timeout=300, env=_clean_env())
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "reused-libraries.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


SHIM = """import importlib.metadata as m, pathlib, sys
for ep in m.distribution(sys.argv[1]).entry_points:
    if ep.group == "console_scripts":
        module, _, attr = ep.value.partition(":")
        top = attr.split(".")[0]
        path = pathlib.Path(sys.executable).parent / ep.name
        path.write_text(f"#!{sys.executable}\\nimport sys\\nfrom {module} import {top}\\nsys.exit({attr}())\\n")
        path.chmod(0o755)
"""


def _console_scripts(python: Path, dist: str) -> None:
    """``dist``'s console scripts in the fresh venv's bin, run by its interpreter (``flwr run``
    looks flower-superlink, flwr-serverapp ... up on PATH)."""
    subprocess.run([str(python), "-c", SHIM, dist], check=True, timeout=60, env=_clean_env())


def _clean_env() -> dict:
    """This environment without the checkout on PYTHONPATH or an active virtualenv."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


@pytest.mark.packaging
def test_the_wheel_runs_an_audited_simulation_from_an_empty_folder_without_the_checkout(tmp_path):
    dist = tmp_path / "dist"
    dist.mkdir()
    wheel, sdist = _build("wheel", dist, tmp_path / "src"), _build("sdist", dist, tmp_path / "src")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert "fedledger/chain/__init__.py" in names and "fedledger/strategies/__init__.py" in names
    assert any(n.startswith("fedledger/chain/") and n.endswith(".json") for n in names)  # the contract's ABI
    assert any(n.endswith("licenses/LICENSE") for n in names)
    with tarfile.open(sdist) as tf:
        members = {m.name.split("/", 1)[1] for m in tf.getmembers() if "/" in m.name}
    assert {"LICENSE", "README.md", "pyproject.toml"} <= members

    python = _fresh_venv(tmp_path / "venv", wheel)
    _console_scripts(python, "flwr")
    bin_dir = python.parent
    empty = tmp_path / "empty"
    empty.mkdir()
    env = _clean_env()
    env.update(PATH=f"{bin_dir}{os.pathsep}/usr/bin:/bin", HF_HUB_OFFLINE="1", FLWR_TELEMETRY_ENABLED="0")

    def run(*cmd, timeout=120):
        return subprocess.run(list(cmd), cwd=empty, env=env, capture_output=True, text=True, timeout=timeout)

    helped = run(str(bin_dir / "fedledger"), "--help")
    assert helped.returncode == 0 and "fedledger report" in helped.stdout, helped.stderr[-2000:]
    where = run(str(python), "-c", "import fedledger, fedledger.strategies, fedledger.clients, fedledger.chain; "
                                   "print(fedledger.__file__, fedledger.chain.__file__)")
    assert where.returncode == 0, where.stderr[-2000:]
    assert all(p.startswith(str(tmp_path / "venv")) for p in where.stdout.split()), where.stdout
    assert str(ROOT) not in where.stdout

    out = run(str(bin_dir / "fedledger"), "run", "--num-supernodes", "2", "--run-config",
              "model='tiny' num-rounds=1 local-steps=1 eval-batches=1 audit='eth-tester'", timeout=900)
    text = out.stdout + out.stderr
    # eth-tester: the chain lived in the ServerApp's process, so the audit checks the aggregator's own
    # copy of the events, finds no problem and says it could not check them against a chain (exit 3)
    assert out.returncode == 3, text[-4000:]
    assert "running the installed fedledger app" in text
    assert "audit: no problem found, but the events are the aggregator's own copy" in text, text[-4000:]
    report = re.search(r"fedledger: report (\S+report\.html)", text)
    assert report and os.path.exists(report.group(1)) and report.group(1).startswith(str(empty))
    assert "Recommended property" not in text and "configuration warning" not in text.lower()
