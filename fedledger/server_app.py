"""fedledger ServerApp: typed settings, one identity per node, the round pipeline, the run folder.

    settings (validated once, before any model loads; what needs the model's config or the
    data: fedledger.frameworks.preflight) -> the nodes and who they are (Roster)
    -> [the ledger trail] -> hub: RoundPipeline(Flower strategy, trust, trail, accounting)
                             serverless: a relay runner (ring / gossip / async gossip)
                             kd / split: a framework runner (KD-FedLLM, Split-FedLLM)
    -> central evaluation each round (one log line per round) -> the run folder:

    <run-dir>/<time>-run<id>/
        metrics.json     settings, framework, identities, per-round reports (kept / rejected with
                         reasons / distrusted, bytes, seconds, trust, exchange), per-client work
                         (``clients``: bytes up/down, round trips, compute seconds, FLOPs, peak
                         RSS) and ``server-seconds``, central evaluation (loss, perplexity,
                         accuracy, exact match), detection
        adapter/         final global adapter (peft format: adapter_config.json + adapter_model.safetensors)
        audit/           (audited runs) the ledger's artifacts: see fedledger.chain.store
"""

from __future__ import annotations

import json
import logging
import os
import time

from . import logs

logs.quiet_libraries()  # before peft / bitsandbytes are imported: they log at import time

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from fedledger.chain.store import new_run_folder  # noqa: E402
from fedledger.clients import model as model_lib  # noqa: E402
from fedledger.clients import train as train_lib  # noqa: E402
from fedledger.clients.data import DataError  # noqa: E402
from fedledger.clients.model import ModelError  # noqa: E402
from fedledger.core.pipeline import to_record  # noqa: E402
from fedledger.core.update import decode_global  # noqa: E402
from fedledger.strategies.detection import detection_metrics  # noqa: E402

from .config import FRAMEWORK_STRATEGIES, ConfigError, Settings  # noqa: E402
from .frameworks import build_runner, preflight  # noqa: E402
from .identity import Roster  # noqa: E402
from .strategy_factory import build_pipeline, build_relay  # noqa: E402
from .task import get_task  # noqa: E402

log = logging.getLogger("fedledger")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedledger.chain.ledger import LedgerError
    from fedledger.strategies.topology import TopologyError

    logs.configure()
    logs.quiet_libraries()
    try:
        run(grid, context)
    except (ConfigError, ModelError, DataError, TopologyError, LedgerError) as exc:  # bad input: one line
        # Logged as one line; re-raised so that Flower records the run as failed (SystemExit
        # would be recorded as "completed"). What the ledger already recorded stays recorded.
        log.error("error: %s", exc)
        raise RuntimeError(f"fedledger: error: {exc}") from None


def run(grid: Grid, context: Context, *, settle: float = 3.0) -> str:
    """The whole run; returns the run folder. ``settle``: seconds the number of connected nodes
    must stay unchanged before the run starts (SuperNodes of a deployment connect one by one)."""
    settings = Settings.from_run_config(context.run_config)
    nodes = connected_nodes(grid, settle=settle)
    settings.check_nodes(len(nodes))
    preflight(settings, len(nodes))  # what needs the model's config or the data, before any weights load
    folder = run_folder(settings, context.run_id)
    log.info("run folder %s", folder)
    roster = Roster(context.run_id, len(nodes), signing=settings.audit.ledger != "none",
                    expected_signers=simulation_signers(settings, context, len(nodes)))
    trail, ledger_info = audit_trail(settings, folder, context.run_id)  # a chain that is not there fails fast
    task = get_task(settings, 1)  # the server needs the held-out and root splits only
    evaluation = CentralEvaluation(task, settings.strategy.num_rounds)
    train_config = ConfigRecord({"local-steps": settings.train.local_steps})
    initial = to_record(task.initial_adapter)
    start = time.perf_counter()
    max_examples = settings.strategy.max_num_examples or len(task.splits["partitions"][0])
    if settings.serverless:
        roster.refresh(grid)
        runner = build_relay(settings, len(nodes))
        result = runner.run(grid, roster.nodes_by_partition(), initial, settings.strategy.num_rounds,
                            train_config=train_config, evaluate_fn=evaluation.relay(runner))
        final, rounds = result.arrays, relay_rounds(result, settings)
    elif settings.strategy.name in FRAMEWORK_STRATEGIES:  # KD-FedLLM, Split-FedLLM: their own round runners
        roster.refresh(grid)
        runner = build_runner(settings, task, len(nodes), identities=roster, trail=trail, max_examples=max_examples)
        result = runner.run(grid, roster.nodes_by_partition(), initial, settings.strategy.num_rounds,
                            train_config=train_config, evaluate_fn=evaluation.framework(runner))
        final, rounds = result.arrays, framework_rounds(result)
    else:
        pipeline = build_pipeline(settings, len(nodes), identities=roster, trail=trail,
                                  reference_fn=reference_fn(task, settings), max_examples=max_examples)
        result = pipeline.start(grid=grid, initial_arrays=initial, num_rounds=settings.strategy.num_rounds,
                                train_config=train_config, evaluate_fn=evaluation.hub(pipeline))
        final, rounds = result.arrays, hub_rounds(pipeline, result, settings)
    wall = time.perf_counter() - start
    for rnd, central in evaluation.results.items():
        rounds.setdefault(rnd, {})["central"] = central
    write_run(folder, settings, context.run_id, nodes, roster, rounds, wall, final, task,
              ledger_info() if ledger_info else None)
    return folder


# ---------------------------------------------------------------------- set-up
def connected_nodes(grid: Grid, settle: float = 3.0, limit: float = 120.0) -> list[int]:
    """The node ids once the number of connected nodes has stopped growing for ``settle`` s."""
    deadline, stable_since, last = time.monotonic() + limit, time.monotonic(), -1
    while True:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        now = time.monotonic()
        if len(nodes) != last:
            last, stable_since = len(nodes), now
        if (nodes and now - stable_since >= settle) or now > deadline:
            if not nodes:
                raise ConfigError("no SuperNode connected within 120 s; start the SuperNodes (see README, Deployment)")
            return nodes
        time.sleep(0.5)


def simulation_signers(settings: Settings, context: Context, num_partitions: int) -> dict[int, str] | None:
    """The address each partition's simulation key has (checked for nodes that sign with one)."""
    if settings.audit.ledger == "none":
        return None
    from fedledger.chain import signing

    return {p: signing.simulation_account(p).address for p in range(num_partitions)}


def audit_trail(settings: Settings, folder: str, run_id: int):
    """(LedgerTrail, info function) for an audited run, else (None, None)."""
    if settings.audit.ledger == "none":
        return None, None
    from fedledger.chain.audit_strategy import build_trail

    a = settings.audit
    return build_trail(a.ledger, folder, run_id, rpc_url=a.rpc_url, registry_address=a.registry_address,
                       chain_id=a.chain_id or None, private_key_file=a.aggregator_key_file or None,
                       run_info={"run-config": settings.to_run_config()})


def run_folder(settings: Settings, run_id: int) -> str:
    return new_run_folder(settings.run.run_dir, run_id)


def reference_fn(task, settings: Settings):
    """Server-side reference update on the root split (FLTrust-style trust anchor)."""

    def train_reference(server_round: int, global_arrays) -> dict:
        model_lib.set_adapter(task.model, dict(global_arrays))
        train_lib.train_steps(task.model, task.examples("root"), task.pad_id, settings.train.local_steps,
                              settings.train.batch_size, settings.train.learning_rate,
                              seed=settings.run.seed + server_round)
        return model_lib.get_adapter(task.model)

    return train_reference


class CentralEvaluation:
    """The global adapter on the held-out split after every round, and the round's log line."""

    def __init__(self, task, num_rounds: int):
        self.task, self.num_rounds = task, num_rounds
        self.results: dict[int, dict] = {}

    def _evaluate(self, server_round: int, arrays: ArrayRecord) -> dict:
        start = time.perf_counter()
        result = self.task.evaluate(decode_global(arrays), "heldout", max_batches=None)
        result["eval-seconds"] = time.perf_counter() - start
        self.results[server_round] = result
        return result

    def hub(self, pipeline):
        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            result = self._evaluate(server_round, arrays)
            report = pipeline.reports.get(server_round)
            shown = report.to_dict() if report else {}
            if report:  # the whole round as the user waited for it: train, aggregate, ledger, evaluation
                shown["wall-seconds"] = time.perf_counter() - report.started
            log.info("%s", logs.round_line(server_round, self.num_rounds, shown, result))
            return MetricRecord(result)

        return evaluate_fn

    def framework(self, runner):
        """KD / split: the global adapter, or (KD with client-side distillation) the mean of what
        the clients measured on their own adapters (``arrays`` None)."""
        def evaluate_fn(server_round: int, arrays: ArrayRecord | None) -> MetricRecord:
            if arrays is not None:
                result = self._evaluate(server_round, arrays)
            else:
                entry = next((h for h in reversed(runner.history) if h.get("round") == server_round), {})
                result = {**entry.get("client-eval", {}).get("mean", {}), "source": "mean of the clients' own models"}
                self.results[server_round] = result
            report = runner.reports.get(server_round)
            log.info("%s", logs.round_line(server_round, self.num_rounds, report.to_dict() if report else {}, result))
            return MetricRecord({k: v for k, v in result.items() if isinstance(v, (int, float))})

        return evaluate_fn

    def relay(self, runner):
        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            result = self._evaluate(server_round, arrays)
            entry = next((h for h in reversed(runner.history) if h.get("round") == server_round), {})
            log.info("%s", logs.round_line(server_round, self.num_rounds, entry, result))
            return MetricRecord(result)

        return evaluate_fn


# ---------------------------------------------------------------------- results
def _detection(settings: Settings, excluded, participants) -> dict | None:
    if not settings.attack.malicious and settings.attack.name == "none":
        return None
    return detection_metrics(excluded, settings.attack.malicious, participants)


def hub_rounds(pipeline, result, settings: Settings) -> dict[int, dict]:
    rounds: dict[int, dict] = {}
    for rnd, report in sorted(pipeline.reports.items()):
        d = report.to_dict()
        entry = {"report": d, "traffic": {"bytes-sent": report.bytes_sent, "bytes-received": report.bytes_received,
                                          "messages-sent": report.sent},
                 "clients": hub_clients(report), "server-seconds": float(sum(report.seconds.values()))}
        if "exchange" in d:
            entry["exchange"] = d["exchange"]
        if report.trust is not None:
            entry["trust"] = report.trust
        participants = [k["partition"] for k in report.kept] + [r.get("partition") for r in report.rejected
                                                                 if r.get("partition") is not None]
        excluded = [k["partition"] for k in report.distrusted] + [r.get("partition") for r in report.rejected
                                                                   if r.get("partition") is not None]
        detection = _detection(settings, excluded, participants)
        if detection is not None:
            entry["detection"] = detection
        rounds[rnd] = entry
    for rnd, rec in result.train_metrics_clientapp.items():
        rounds.setdefault(rnd, {})["train"] = _jsonable(rec)
    for rnd, rec in result.evaluate_metrics_clientapp.items():
        rounds.setdefault(rnd, {})["federated-eval"] = _jsonable(rec)
    return rounds


def framework_rounds(result) -> dict[int, dict]:
    """KD / split rounds for metrics.json: the report, the accounting entry, per-client work."""
    rounds: dict[int, dict] = {}
    for entry in result.history:
        rnd = int(entry["round"])
        report = result.reports[rnd]
        rounds[rnd] = {"report": report.to_dict(), "exchange": entry, "clients": entry["clients"],
                       "server-seconds": entry["server-seconds"],
                       "traffic": {"bytes-sent": report.bytes_sent, "bytes-received": report.bytes_received},
                       "train": _jsonable(report.metrics)}
        if report.trust is not None:
            rounds[rnd]["trust"] = report.trust
    return rounds


def hub_clients(report) -> dict[str, dict]:
    """Per-client work of a hub round, in the fields the KD and split runners report."""
    out = {}
    for k in report.kept:
        m, node = k.get("metrics", {}), k["node-id"]
        out[str(k["partition"] if k.get("partition") is not None else f"node-{node}")] = {
            "bytes-up": int(report.up_bytes.get(node, 0)), "bytes-down": int(report.down_bytes.get(node, 0)),
            "round-trips": 1, "compute-seconds": float(m.get("compute-seconds", 0.0)),
            "flops": float(m.get("flops", 0.0)), "peak-rss-mb": float(m.get("peak-rss-mb", 0.0))}
    return out


def relay_rounds(result, settings: Settings) -> dict[int, dict]:
    rounds: dict[int, dict] = {}
    for entry in result.history:
        rnd = int(entry["round"])
        rounds.setdefault(rnd, {})["exchange"] = entry
        if "distrusted" in entry:
            detection = _detection(settings, entry["distrusted"], entry.get("participants", []))
            if detection is not None:
                rounds[rnd]["detection"] = detection
    for rnd, metrics in result.train_metrics.items():
        rounds.setdefault(int(rnd), {})["train"] = _jsonable(metrics)
    return rounds


def write_run(folder: str, settings: Settings, run_id: int, nodes: list[int], roster: Roster, rounds: dict,
              wall: float, final: ArrayRecord | None, task, ledger: dict | None) -> None:
    if final is not None:
        model_lib.set_adapter(task.model, dict(decode_global(final)))
        task.model.save_pretrained(os.path.join(folder, "adapter"))
    else:
        log.info("no global adapter to save: with kd-variant='client' every client keeps its own")
    summary = {
        "run-id": run_id,
        "settings": settings.to_run_config(),
        "framework": settings.framework,
        "num-nodes": len(nodes),
        "identities": roster.to_dict(),
        "malicious": list(settings.attack.malicious),
        "wall-seconds": wall,
        "rounds": {str(k): rounds[k] for k in sorted(rounds)},
        "ledger": ledger,
    }
    with open(os.path.join(folder, "metrics.json"), "w") as fh:
        json.dump(summary, fh, indent=2, default=str)
    first, last = rounds.get(0, {}).get("central"), rounds.get(settings.strategy.num_rounds, {}).get("central")
    if first and last:
        log.info("held-out perplexity %.2f -> %.2f over %s rounds (%.1f s)", first["perplexity"], last["perplexity"],
                 settings.strategy.num_rounds, wall)
    if not settings.serverless and not any(r.get("report", {}).get("aggregated") for r in rounds.values()):
        log.warning("no round aggregated any update: the global adapter never changed (see the rejected replies "
                    "in metrics.json)")
    log.info("wrote %s", os.path.join(folder, "metrics.json"))
    with open(os.path.join(os.path.dirname(folder), "LATEST"), "w") as fh:
        fh.write(folder + "\n")


def _jsonable(record) -> dict:
    return {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in dict(record).items()}
