#!/usr/bin/env bash
# The main job: set up, then a federated LoRA fine-tuning of SmolLM2-135M-Instruct on the
# chatterbot corpus (4 clients split by category, 3 FedAvg rounds) with every update and
# aggregate recorded on a local anvil devnet, and an audit of that run at the end.
# Extra arguments go to `fedledger run`, e.g.  scripts/quickstart.sh --run-config "num-rounds=5"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
run_config="audit='anvil' num-rounds=3 local-steps=4"
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --run-config) run_config="$run_config $2"; shift 2 ;;
    *) extra+=("$1"); shift ;;
  esac
done
fedledger run --num-supernodes 4 --run-config "$run_config" "${extra[@]}"
