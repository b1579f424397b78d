"""The set-up's torch selection (scripts/torch_select.py): the CPU build from a local wheel or
PyTorch's CPU index, a GPU build only on request, one error line otherwise. The decision is a
pure function; the facts come from ``pip index versions`` against a fake, file:// index here
(no venv is built, nothing is installed)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("torch_select", os.path.join(ROOT, "scripts", "torch_select.py"))
ts = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("torch_select", ts)  # dataclasses look their module up
_spec.loader.exec_module(ts)

WHEEL = f"torch-{ts.CPU_VERSION}-cp{sys.version_info.major}{sys.version_info.minor}-" \
        f"cp{sys.version_info.major}{sys.version_info.minor}-manylinux_2_28_x86_64.whl"


# ---------------------------------------------------------------------------- the pure decision
def test_a_requested_build_is_installed_as_given():
    p = ts.plan(ts.Facts(requested="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"))
    assert p.pip_args == ("torch==2.13.0", "--index-url", "https://download.pytorch.org/whl/cu128")
    assert "FEDLEDGER_TORCH" in p.source


def test_an_installed_torch_is_kept_and_named():
    p = ts.plan(ts.Facts(installed="2.13.0+cu128", installed_cuda="12.8", configured_has_cpu=True))
    assert p.pip_args == () and "CUDA 12.8" in p.source


def test_a_local_cpu_wheel_comes_before_the_cpu_index():
    p = ts.plan(ts.Facts(local_dirs=("./wheels",), configured_has_cpu=True, cpu_index_has_cpu=True))
    assert p.pip_args == (f"torch=={ts.CPU_VERSION}", "--find-links", "./wheels") and "local" in p.source


def test_the_cpu_index_is_used_when_no_local_wheel_is_there():
    p = ts.plan(ts.Facts(cpu_index_has_cpu=True))
    assert p.pip_args[:3] == (f"torch=={ts.CPU_VERSION}", "--index-url", ts.CPU_INDEX)


def test_without_any_cpu_build_the_set_up_stops_with_one_line_naming_the_fixes():
    with pytest.raises(ts.SelectionError) as err:
        ts.plan(ts.Facts(local_dirs=("/x/wheels",)))
    msg = str(err.value)
    assert "\n" not in msg and "./wheels" in msg and "FEDLEDGER_TORCH" in msg and "/x/wheels" in msg


def test_a_cuda_build_nobody_asked_for_is_refused_after_the_install():
    with pytest.raises(ts.SelectionError, match="CUDA 12.8 build"):
        ts.check("2.13.0", "12.8", requested="")
    assert ts.check("2.13.0", "12.8", requested="torch==2.13.0") == "fedledger: torch 2.13.0 (CUDA 12.8 build)"
    assert "already installed" in ts.check("2.13.0", "12.8", requested="", fresh=False)
    assert ts.check("2.13.0+cpu", None, requested="") == "fedledger: torch 2.13.0+cpu (CPU build)"


# ---------------------------------------------------------------------------- facts from a fake pip index
@pytest.fixture
def isolated_pip(monkeypatch, tmp_path):
    """pip sees no machine configuration and no real index; torch looks uninstalled."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT", "PIP_NO_INDEX", "FEDLEDGER_TORCH",
                "FEDLEDGER_WHEELS", "FEDLEDGER_TORCH_INDEX"):
        monkeypatch.delenv(var, raising=False)
    empty = tmp_path / "empty-index"
    empty.mkdir()
    monkeypatch.setenv("PIP_INDEX_URL", empty.as_uri())
    monkeypatch.setattr(ts, "installed_torch", lambda: (None, None))
    return tmp_path


def _index_with_cpu_wheel(root) -> str:
    """A file:// 'simple' index listing a CPU torch wheel (pip reads the name, never the file)."""
    (root / "simple" / "torch").mkdir(parents=True)
    (root / WHEEL).write_bytes(b"")
    (root / "simple" / "torch" / "index.html").write_text(f'<a href="../../{WHEEL}">{WHEEL}</a>\n')
    return (root / "simple").as_uri()


def test_a_wheel_in_the_repos_wheels_folder_is_found(isolated_pip):
    (isolated_pip / "wheels").mkdir()
    (isolated_pip / "wheels" / WHEEL).write_bytes(b"")
    f = ts.facts(dict(os.environ, FEDLEDGER_TORCH_INDEX=(isolated_pip / "nowhere").as_uri()), repo=str(isolated_pip))
    assert f.configured_has_cpu and f.local_dirs == (str(isolated_pip / "wheels"),)
    assert ts.plan(f).pip_args == (f"torch=={ts.CPU_VERSION}", "--find-links", str(isolated_pip / "wheels"))


def test_a_reachable_cpu_index_is_found(isolated_pip):
    url = _index_with_cpu_wheel(isolated_pip / "pytorch")
    f = ts.facts(dict(os.environ, FEDLEDGER_TORCH_INDEX=url), repo=str(isolated_pip))
    assert not f.configured_has_cpu and f.cpu_index_has_cpu
    assert ts.plan(f).pip_args[:3] == (f"torch=={ts.CPU_VERSION}", "--index-url", url)


def test_the_plan_command_fails_with_one_line_when_nothing_is_reachable(isolated_pip):
    env = dict(os.environ, FEDLEDGER_TORCH_INDEX=(isolated_pip / "nowhere").as_uri())
    code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('t', sys.argv[1]); "
            "m = importlib.util.module_from_spec(s); sys.modules['t'] = m; s.loader.exec_module(m); "
            "m.installed_torch = lambda: (None, None); sys.exit(m.main(['x', 'plan']))")
    out = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "scripts", "torch_select.py")],
                         capture_output=True, text=True, env=env, cwd=str(isolated_pip), timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedledger: error: no CPU build of torch 2.13.0")
