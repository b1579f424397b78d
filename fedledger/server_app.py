"""fedledger ServerApp: reads run-config, evaluates the global adapter centrally on the
held-out split, builds the strategy stack, runs it, and writes the run folder:

    <run-dir>/<run-name>/
        metrics.json     settings, per-round metrics, traffic, rejected updates, trust, ground truth
        adapter/         final global adapter (peft format: adapter_config.json + adapter_model.safetensors)
"""

from __future__ import annotations

import json
import logging
import os
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedledger.clients import model as model_lib
from fedledger.clients.data import DataError
from fedledger.clients.model import ModelError
from fedledger.clients import train as train_lib
from fedledger.strategies.kernels import as_numpy_dict, to_arrayrecord

from .config import ConfigError, Settings
from .strategy_factory import build_strategy
from .task import get_task

log = logging.getLogger("fedledger")
app = ServerApp()


def run_folder(settings: Settings, run_id: int) -> str:
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-run{run_id}"
    path = os.path.abspath(os.path.join(os.path.expanduser(settings.run_dir), name))
    os.makedirs(path, exist_ok=True)
    return path


def make_evaluate_fn(task, settings: Settings, history: dict):
    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        start = time.perf_counter()
        result = task.evaluate(as_numpy_dict(arrays), "heldout", max_batches=None)
        result["eval-seconds"] = time.perf_counter() - start
        history.setdefault(server_round, {})["central"] = result
        log.info("round %s: held-out loss %.4f, perplexity %.2f", server_round, result["eval-loss"], result["perplexity"])
        return MetricRecord(result)

    return evaluate_fn


def make_reference_fn(task, settings: Settings):
    """Server-side reference update on the root split (FLTrust-style trust anchor)."""

    def reference_fn(server_round: int, global_arrays) -> dict:
        model_lib.set_adapter(task.model, as_numpy_dict(global_arrays))
        train_lib.train_steps(task.model, task.examples("root"), task.pad_id, settings.local_steps,
                              settings.batch_size, settings.learning_rate, seed=settings.seed + server_round)
        return model_lib.get_adapter(task.model)

    return reference_fn


def _audit_factory(settings: Settings, folder: str, run_id: int):
    if settings.audit == "none":
        return None, None
    from fedledger.chain.audit_strategy import build_audit

    return build_audit(settings.audit, rpc_url=settings.rpc_url, registry_address=settings.registry_address,
                       run_folder=folder, run_id=run_id, run_config=settings.to_dict())


def _jsonable(record) -> dict:
    return {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in dict(record).items()}


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedledger.chain.ledger import LedgerError
    from fedledger.strategies.topology import TopologyError

    try:
        run(grid, context)
    except (ConfigError, ModelError, DataError, TopologyError, LedgerError) as exc:  # bad input: one line
        # Logged as one line; re-raised so that Flower records the run as failed (SystemExit
        # would be recorded as "completed"). What the ledger already recorded stays recorded.
        log.error("fedledger: error: %s", exc)
        raise RuntimeError(f"fedledger: error: {exc}") from None


def run(grid: Grid, context: Context) -> None:
    """The ServerApp's job: build the strategy stack from run-config, run it, write the run folder."""
    settings = Settings.from_run_config(context.run_config)
    task = get_task(settings, 1)  # the server needs the held-out and root splits only
    folder = run_folder(settings, context.run_id)
    log.info("fedledger: run folder %s", folder)
    num_nodes = len(list(grid.get_node_ids())) or int(settings.get("num-supernodes", 2))

    history: dict = {}
    wrap_audit, ledger_info = _audit_factory(settings, folder, context.run_id)
    strategy = build_strategy(settings, num_nodes, reference_fn=make_reference_fn(task, settings), audit=wrap_audit)

    start = time.perf_counter()
    result = strategy.start(
        grid=grid,
        initial_arrays=to_arrayrecord(task.initial_adapter),
        num_rounds=settings.num_rounds,
        train_config=ConfigRecord({"local-steps": settings.local_steps}),
        evaluate_fn=make_evaluate_fn(task, settings, history),
    )
    wall = time.perf_counter() - start

    final = as_numpy_dict(result.arrays) if result.arrays is not None else task.initial_adapter
    model_lib.set_adapter(task.model, final)
    task.model.save_pretrained(os.path.join(folder, "adapter"))
    for rnd, rec in result.train_metrics_clientapp.items():
        history.setdefault(rnd, {})["train"] = _jsonable(rec)
    for rnd, rec in result.evaluate_metrics_clientapp.items():
        history.setdefault(rnd, {})["federated-eval"] = _jsonable(rec)
    for name in ("traffic", "rejected", "trust_history", "history", "detection"):
        value = _find_attr(strategy, name)
        if value is not None:
            key = {"history": "exchange"}.get(name, name.replace("_", "-"))
            for rnd, entry in (value.items() if isinstance(value, dict) else enumerate(value, start=1)):
                history.setdefault(int(rnd), {})[key] = entry
    summary = {
        "run-id": context.run_id,
        "settings": settings.to_dict(),
        "num-nodes": num_nodes,
        "malicious": settings.malicious_ids(),
        "wall-seconds": wall,
        "rounds": {str(k): history[k] for k in sorted(history)},
        "ledger": ledger_info() if callable(ledger_info) else ledger_info,
    }
    with open(os.path.join(folder, "metrics.json"), "w") as fh:
        json.dump(summary, fh, indent=2, default=str)
    first, last = history.get(0, {}).get("central"), history.get(settings.num_rounds, {}).get("central")
    if first and last:
        log.info("fedledger: held-out perplexity %.2f -> %.2f over %s rounds (%.1f s)",
                 first["perplexity"], last["perplexity"], settings.num_rounds, wall)
    log.info("fedledger: wrote %s", os.path.join(folder, "metrics.json"))
    _write_latest(settings, folder)


def _write_latest(settings: Settings, folder: str) -> None:
    with open(os.path.join(os.path.dirname(folder), "LATEST"), "w") as fh:
        fh.write(folder + "\n")


def _find_attr(strategy, name: str):
    """Look for ``name`` on a strategy or any strategy it wraps."""
    s = strategy
    while s is not None:
        value = s.__dict__.get(name) if hasattr(s, "__dict__") else None
        if value:
            return value
        d = s.__dict__ if hasattr(s, "__dict__") else {}
        s = d.get("inner") or d.get("strategy")  # StrategyWrapper.inner, OnChainAudit.strategy
    return None
