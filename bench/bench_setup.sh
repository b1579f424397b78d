#!/usr/bin/env bash
# Set-up wall time and venv size on this machine: a clean copy of the committed tree in a
# temporary folder, scripts/setup.sh run there from scratch (fresh .venv, chain tools), then the
# copy is deleted. Prints the numbers bench/results/setup.md records.
#   bash bench/bench_setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d /tmp/fedledger-setup.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
git archive HEAD | tar -x -C "$tmp"
cd "$tmp"
start=$(date +%s)
env -u VIRTUAL_ENV bash scripts/setup.sh > setup.log 2>&1 || { tail -5 setup.log; exit 1; }
wall=$(( $(date +%s) - start ))
grep '^fedledger: torch' setup.log
echo "set-up wall: ${wall} s"
echo "venv size: $(du -sh .venv | cut -f1) (.tools: $(du -sh .tools | cut -f1))"
echo "nvidia packages: $(.venv/bin/pip list 2>/dev/null | grep -ci nvidia || true)"
.venv/bin/python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
