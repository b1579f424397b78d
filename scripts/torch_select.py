"""Which torch build scripts/setup.sh installs, and from where (stdlib only: runs before anything
else is installed).

    python scripts/torch_select.py plan      # prints the pip arguments, one per line; exit 2 + one
                                             # error line when no CPU build can be found
    python scripts/torch_select.py check [fresh]
                                             # after the install: says which build is there; with
                                             # "fresh" (torch was just installed) exit 2 when a CUDA
                                             # build arrived that nobody asked for

The CPU build of ``torch==2.13.0`` (version ``2.13.0+cpu``) comes, in this order, from:

1. ``FEDLEDGER_TORCH`` when set: the user's own pip requirement, taken as is (a GPU user opts in
   with e.g. ``FEDLEDGER_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"``);
2. the torch already in the virtualenv, whatever its build (re-running the set-up keeps it);
3. what pip already reaches with the machine's own configuration (its ``find-links`` and
   indexes), plus ``./wheels`` and ``FEDLEDGER_WHEELS`` (folders of local wheels);
4. PyTorch's CPU wheel index, https://download.pytorch.org/whl/cpu (``FEDLEDGER_TORCH_INDEX``);
5. otherwise nothing: one error line naming the fixes. A plain ``pip install torch`` from PyPI
   would fetch the CUDA build (several GB of nvidia packages); that only happens on request.

The decision is the pure function :func:`plan`; :func:`facts` asks pip (``pip index versions``:
the index pages only, no download) what it can reach.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass

TORCH_VERSION = "2.13.0"
CPU_VERSION = f"{TORCH_VERSION}+cpu"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PYPI = "https://pypi.org/simple"


class SelectionError(RuntimeError):
    """No CPU build of torch can be installed; the message is the one line to print."""


@dataclass(frozen=True)
class Facts:
    """What the set-up knows before installing torch."""

    requested: str = ""                    # FEDLEDGER_TORCH ("" = not set)
    installed: str | None = None           # torch.__version__ in the venv, None if absent
    installed_cuda: str | None = None      # torch.version.cuda of that torch
    local_dirs: tuple[str, ...] = ()       # wheel folders given to pip as --find-links
    configured_has_cpu: bool = False       # pip (machine config + local_dirs) lists 2.13.0+cpu
    cpu_index: str = CPU_INDEX
    cpu_index_has_cpu: bool = False        # the CPU index lists 2.13.0+cpu (reachable)


@dataclass(frozen=True)
class Plan:
    """``pip install`` arguments (empty: nothing to install) and what to tell the user."""

    pip_args: tuple[str, ...]
    source: str


def plan(f: Facts) -> Plan:
    """The torch install for these facts (see the module docstring); SelectionError if none."""
    if f.requested.strip():
        return Plan(tuple(shlex.split(f.requested)), "FEDLEDGER_TORCH (your choice of build)")
    if f.installed is not None:
        build = f"CUDA {f.installed_cuda}" if f.installed_cuda else "CPU"
        return Plan((), f"already installed: torch {f.installed} ({build} build)")
    requirement = f"torch=={CPU_VERSION}"
    if f.configured_has_cpu:
        links = tuple(a for d in f.local_dirs for a in ("--find-links", d))
        where = ", ".join(f.local_dirs) if f.local_dirs else "pip's own configuration"
        return Plan((requirement, *links), f"local CPU wheel ({where})")
    if f.cpu_index_has_cpu:
        return Plan((requirement, "--index-url", f.cpu_index, "--extra-index-url", PYPI),
                    f"PyTorch's CPU wheel index ({f.cpu_index})")
    raise SelectionError(
        f"no CPU build of torch {TORCH_VERSION} is reachable ({f.cpu_index} did not answer and no local wheel "
        f"torch-{CPU_VERSION}-*.whl was found{' in ' + ', '.join(f.local_dirs) if f.local_dirs else ''}): put that "
        f"wheel in ./wheels (or a folder named by FEDLEDGER_WHEELS), or set FEDLEDGER_TORCH='torch=={TORCH_VERSION}' "
        "to accept PyPI's default build (CUDA, several GB)")


def check(version: str, cuda: str | None, requested: str, fresh: bool = True) -> str:
    """The line to print once torch is installed; SelectionError for a CUDA build that was just
    installed without being asked for (an earlier install is kept as it is)."""
    if cuda and fresh and not requested.strip():
        raise SelectionError(f"torch {version} is a CUDA {cuda} build although the CPU build was selected; remove it "
                             f"(pip uninstall torch) and re-run, or set FEDLEDGER_TORCH to keep a GPU build")
    build = f"CUDA {cuda} build" if cuda else "CPU build"
    return f"fedledger: torch {version} ({build}{'' if fresh else ', already installed'})"


# ---------------------------------------------------------------------------- facts from pip
def _pip(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout)


def lists_cpu_build(*pip_args: str, timeout: float = 60.0) -> bool:
    """Whether ``pip index versions torch`` (with ``pip_args``) lists the CPU build."""
    try:
        out = _pip("index", "versions", "torch", "--disable-pip-version-check", *pip_args, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and CPU_VERSION in out.stdout


def installed_torch() -> tuple[str | None, str | None]:
    code = "import torch; print(torch.__version__); print(torch.version.cuda or '')"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    if out.returncode != 0:
        return None, None
    version, cuda = (out.stdout.splitlines() + ["", ""])[:2]
    return version.strip(), (cuda.strip() or None)


def facts(env: dict | None = None, repo: str = ".") -> Facts:
    env = dict(os.environ if env is None else env)
    requested = env.get("FEDLEDGER_TORCH", "")
    version, cuda = installed_torch()
    dirs = [d for d in [os.path.join(repo, "wheels"), *env.get("FEDLEDGER_WHEELS", "").split(os.pathsep)]
            if d and os.path.isdir(d)]
    index = env.get("FEDLEDGER_TORCH_INDEX", CPU_INDEX)
    if requested.strip() or version is not None:
        return Facts(requested, version, cuda, tuple(dirs), cpu_index=index)
    links = [a for d in dirs for a in ("--find-links", d)]
    configured = lists_cpu_build(*links)
    reachable = False if configured else lists_cpu_build("--index-url", index, "--timeout", "15", "--retries", "0",
                                                         timeout=60)
    return Facts(requested, None, None, tuple(dirs), configured, index, reachable)


def main(argv: list[str]) -> int:
    what = argv[1] if len(argv) > 1 else "plan"
    try:
        if what == "plan":
            chosen = plan(facts())
            print(f"fedledger: torch from {chosen.source}", file=sys.stderr)
            print("\n".join(chosen.pip_args))
            return 0
        if what == "check":
            version, cuda = installed_torch()
            if version is None:
                raise SelectionError("torch is not importable after the install; see pip's output above")
            print(check(version, cuda, os.environ.get("FEDLEDGER_TORCH", ""), fresh="fresh" in argv[2:]))
            return 0
    except SelectionError as exc:
        print(f"fedledger: error: {exc}", file=sys.stderr)
        return 2
    print("usage: torch_select.py plan|check", file=sys.stderr)
    return 64


if __name__ == "__main__":
    sys.exit(main(sys.argv))
