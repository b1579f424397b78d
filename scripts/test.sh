#!/usr/bin/env bash
# Set up, then run the tests. With no argument: the default suite (fast, < 15 min on 2 cores).
#   scripts/test.sh slow        end-to-end and heavier tests (flwr simulations with strategies)
#   scripts/test.sh deployment  flower-superlink + 2-3 flower-supernode processes on 127.0.0.1 (one serverless ring with a SuperNode killed)
#   scripts/test.sh faults      injected faults: anvil SIGKILLed and restarted, fedledger run SIGKILLed and resumed, a SuperNode killed and rejoining
#   scripts/test.sh packaging   wheel + sdist, the wheel in a fresh virtualenv, a run from an empty folder
#   scripts/test.sh all         everything (GPU tests skip themselves without a GPU)
#   scripts/test.sh -- ARGS     pass ARGS to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0 TOKENIZERS_PARALLELISM=false
target=${1:-default}
case "$target" in
  default)    args=(-q -rs) ;;
  slow)       args=(-q -rs -m slow) ;;
  deployment) args=(-q -rs -m deployment) ;;
  faults)     args=(-q -rs -m faults) ;;
  packaging)  args=(-q -rs -m packaging) ;;
  gpu)        args=(-q -rs -m gpu) ;;
  all)        args=(-q -rs -m "") ;;
  --)         shift; exec python -m pytest "$@" ;;
  *) echo "usage: scripts/test.sh [default|slow|deployment|faults|packaging|gpu|all|-- pytest-args]" >&2; exit 2 ;;
esac
rc=0
python -m pytest "${args[@]}" || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "scripts/test.sh: no test is marked '$target': that target is misconfigured" >&2
fi
exit "$rc"
