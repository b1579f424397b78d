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
                         top-1 accuracy, exact match), detection
        checkpoint.pkl   (hub strategies) after every completed round: global adapter, strategy and
                         trust state, ledger position, reports (core.checkpoint); run-config
                         resume=<this folder> (fedledger run --resume) continues from it (kd / split
                         runs keep no checkpoint: resume is refused for them at start-up)
        adapter/         final global adapter (peft format: adapter_config.json + adapter_model.safetensors)
        audit/           (audited runs) the ledger's artifacts: see fedledger.chain.store
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import threading
import time

from . import logs, progress

logs.quiet_libraries()  # before peft / bitsandbytes are imported: they log at import time

import numpy as np  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from fedledger.chain.store import new_run_folder  # noqa: E402
from fedledger.clients import model as model_lib  # noqa: E402
from fedledger.clients import train as train_lib  # noqa: E402
from fedledger.clients.data import DataError  # noqa: E402
from fedledger.clients.model import ModelError  # noqa: E402
from fedledger.core.checkpoint import Checkpoint, CheckpointError  # noqa: E402
from fedledger.core.checkpoint import resume as resume_pipeline  # noqa: E402
from fedledger.core.pipeline import to_record  # noqa: E402
from fedledger.core.update import decode_global  # noqa: E402
from fedledger.strategies.detection import detection_metrics  # noqa: E402
from fedledger.strategies.relay import RelayStopped  # noqa: E402

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
    except (ConfigError, ModelError, DataError, TopologyError, LedgerError, CheckpointError,
            RelayStopped) as exc:  # one line
        # Logged as one line; re-raised so that Flower records the run as failed (SystemExit
        # would be recorded as "completed"). What the ledger already recorded stays recorded.
        log.error("error: %s", exc)
        raise RuntimeError(f"fedledger: error: {exc}") from None


def run(grid: Grid, context: Context, *, settle: float = 3.0) -> str:
    """The whole run; returns the run folder. ``settle``: seconds the number of connected nodes
    must stay unchanged before the run starts (SuperNodes of a deployment connect one by one).
    With run-config ``resume`` = a run folder, the run continues there after its last completed
    round (its checkpoint), under the same run id on the ledger."""
    settings = Settings.from_run_config(context.run_config)
    resumed = Resumed.load(settings) if settings.run.resume else None
    nodes = connected_nodes(grid, settle=settle)
    settings.check_nodes(len(nodes))
    preflight(settings, len(nodes))  # what needs the model's config or the data, before any weights load
    if resumed is not None:
        resumed.check_nodes(len(nodes))
    folder = resumed.folder if resumed is not None else run_folder(settings, context.run_id)
    ledger_run_id = resumed.ledger_run_id if resumed is not None else context.run_id
    log.info("run folder %s%s", folder, f" (resumed after round {resumed.round})" if resumed is not None else "")
    roster = Roster(context.run_id, len(nodes), signing=settings.audit.ledger != "none",
                    expected_signers=simulation_signers(settings, context, len(nodes)))
    trail, ledger_info = audit_trail(settings, folder, ledger_run_id,   # a chain that is not there fails fast
                                     registry=resumed.registry if resumed is not None else None)
    task = get_task(settings, 1)  # the server needs the held-out and root splits only
    evaluation = CentralEvaluation(task, settings)
    train_config = ConfigRecord({"local-steps": settings.train.local_steps})
    initial = to_record(task.initial_adapter)
    marks = progress.RoundMarks(settings.strategy.num_rounds) if progress.enabled() else None  # fedledger run's live line
    if marks:
        grid, trail = marks.grid(grid), marks.trail(trail)
    start = time.perf_counter()
    max_examples = settings.strategy.max_num_examples or len(task.splits["partitions"][0])
    stopped = None
    if settings.serverless:
        roster.refresh(grid)
        runner = build_relay(settings, len(nodes))
        try:
            result = runner.run(grid, roster.nodes_by_partition(), initial, settings.strategy.num_rounds,
                                train_config=train_config, evaluate_fn=_marked(marks, evaluation.relay(runner)),
                                peers_fn=lambda: connected_peers(grid, roster))
        except RelayStopped as exc:   # fewer live peers than min-train-nodes: keep what the rounds did
            result, stopped = exc.result, exc
        finally:
            evaluation.close()
        final, rounds = result.arrays, relay_rounds(result, settings)
    elif settings.strategy.name in FRAMEWORK_STRATEGIES:  # KD-FedLLM, Split-FedLLM: their own round runners
        roster.refresh(grid)
        runner = build_runner(settings, task, len(nodes), identities=roster, trail=trail, max_examples=max_examples)
        try:
            result = runner.run(grid, roster.nodes_by_partition(), initial, settings.strategy.num_rounds,
                                train_config=train_config, evaluate_fn=_marked(marks, evaluation.framework(runner)))
        finally:
            evaluation.close()
        final, rounds = result.arrays, framework_rounds(result)
    else:
        checkpoint = Checkpoint(folder, extra_fn=lambda: {"central": dict(evaluation.results), "num-nodes": len(nodes),
                                                          "run-config": settings.to_run_config(),
                                                          "ledger-run-id": ledger_run_id})
        pipeline = build_pipeline(settings, len(nodes), identities=roster, trail=trail,
                                  reference_fn=reference_fn(task, settings, evaluation), max_examples=max_examples,
                                  checkpoint=checkpoint)
        first_round = 1
        if resumed is not None:
            first_round, initial = resumed.restore(pipeline, evaluation)
        try:
            result = pipeline.start(grid=grid, initial_arrays=initial, num_rounds=settings.strategy.num_rounds,
                                    train_config=train_config, evaluate_fn=_marked(marks, evaluation.hub(pipeline)),
                                    first_round=first_round)
        finally:
            evaluation.close()
        final, rounds = result.arrays, hub_rounds(pipeline, result, settings)
    wall = time.perf_counter() - start
    for rnd, central in evaluation.results.items():
        rounds.setdefault(rnd, {})["central"] = central
    if evaluation.full is not None:
        rounds.setdefault(settings.strategy.num_rounds, {})["central-full"] = evaluation.full
    write_run(folder, settings, ledger_run_id, nodes, roster, rounds, wall, final, task,
              ledger_info() if ledger_info else None)
    if stopped is not None:
        raise RelayStopped(f"{stopped}; the rounds so far are in {folder}")
    return folder


def connected_peers(grid: Grid, roster: Roster) -> dict[int, int]:
    """Partition -> node id of the connected nodes, after asking any new node who it is (a
    SuperNode that restarted comes back under a new node id and takes its partition back)."""
    roster.refresh(grid)
    online = {int(n) for n in grid.get_node_ids()}
    return {p: n for p, n in roster.nodes_by_partition().items() if n in online}


class Resumed:
    """A run folder's checkpoint, checked against the settings of the run that resumes it."""

    #: run-config keys a resumed run may change (the rest must be the run's own)
    MAY_CHANGE = ("resume", "num-rounds", "ledger-wait", "run-dir", "rpc-url")

    def __init__(self, folder: str, state: dict):
        self.folder, self.state = folder, state
        self.round = int(state["round"])
        extra = state.get("extra", {})
        self.ledger_run_id = int(extra.get("ledger-run-id"))
        self.registry = (state.get("trail") or {}).get("registry")

    @classmethod
    def load(cls, settings: Settings) -> "Resumed":
        folder = os.path.abspath(os.path.expanduser(settings.run.resume))
        try:
            state = Checkpoint(folder).load()
        except CheckpointError as exc:
            raise ConfigError(f"run-config resume={settings.run.resume!r}: {exc}", "resume") from None
        before, now = state["extra"].get("run-config", {}), settings.to_run_config()
        changed = sorted(k for k in set(before) | set(now) if k not in cls.MAY_CHANGE and before.get(k) != now.get(k))
        if changed:
            raise ConfigError(f"run-config resume: {', '.join(f'{k}={now.get(k)!r} (the run had {before.get(k)!r})' for k in changed)}"
                              f" differ from the run being resumed; resume with its settings (only "
                              f"{', '.join(cls.MAY_CHANGE[1:])} may change)", "resume")
        if settings.strategy.num_rounds <= int(state["round"]):
            raise ConfigError(f"run-config resume: the run already completed {state['round']} of num-rounds="
                              f"{settings.strategy.num_rounds}; nothing to resume (raise num-rounds to go on)", "resume")
        return cls(folder, state)

    def check_nodes(self, num_nodes: int) -> None:
        had = int(self.state["extra"].get("num-nodes", num_nodes))
        if had != num_nodes:
            raise ConfigError(f"run-config resume: the run had {had} nodes, {num_nodes} are connected now; resume with "
                              f"the same federation (--num-supernodes {had})", "resume")

    def restore(self, pipeline, evaluation: "CentralEvaluation") -> tuple[int, ArrayRecord]:
        """Put the checkpoint into ``pipeline`` and ``evaluation``: (first round to run, its global)."""
        resume_pipeline(pipeline, self.state)
        evaluation.results.update(self.state["extra"].get("central", {}))
        initial = to_record(self.state["global"])
        if self.round not in evaluation.results:   # the run stopped before it evaluated the checkpointed round
            evaluation._evaluate(self.round, initial,
                                 lambda result: logs.round_line(self.round, evaluation.num_rounds, {}, result))
        return self.round + 1, initial


def _marked(marks, evaluate_fn):
    return marks.evaluate_fn(evaluate_fn) if marks else evaluate_fn


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
    """The address each partition's simulation key has (checked for nodes that sign with one):
    derived from the federation secret in this machine's key folder, as the simulated nodes do."""
    if settings.audit.ledger == "none":
        return None
    from fedledger.chain import signing

    return {p: signing.simulation_account(p).address for p in range(num_partitions)}


def audit_trail(settings: Settings, folder: str, run_id: int, registry: str | None = None):
    """(LedgerTrail, info function) for an audited run, else (None, None). ``registry``: the one a
    resumed run continues on (else the settings' registry-address)."""
    if settings.audit.ledger == "none":
        return None, None
    from fedledger.chain.audit_strategy import build_trail

    a = settings.audit
    return build_trail(a.ledger, folder, run_id, rpc_url=a.rpc_url, registry_address=registry or a.registry_address,
                       chain_id=a.chain_id or None, private_key_file=a.aggregator_key_file or None,
                       admin_key_file=a.admin_key_file or None, enrol=a.enrol, wait=a.ledger_wait,
                       run_info={"run-config": settings.to_run_config()})


def run_folder(settings: Settings, run_id: int) -> str:
    return new_run_folder(settings.run.run_dir, run_id)


def reference_fn(task, settings: Settings, evaluation: "CentralEvaluation"):
    """Server-side reference update on the root split (FLTrust-style trust anchor). It waits for a
    background evaluation that still uses the model."""

    def train_reference(server_round: int, global_arrays) -> dict:
        with evaluation.model_in_use() as model:
            model_lib.set_adapter(model, dict(global_arrays))
            train_lib.train_steps(model, task.examples("root"), task.pad_id, settings.train.local_steps,
                                  settings.train.batch_size, settings.train.learning_rate,
                                  seed=settings.run.seed + server_round)
            return model_lib.get_adapter(model)

    return train_reference


class CentralEvaluation:
    """The global adapter on the held-out split after every round, and the round's log line.

    Each round evaluates one fixed, seeded sample of ``eval-sample`` held-out examples (the same
    examples every round, so rounds compare); after the last round the whole split is evaluated
    too (``full``). With ``eval-overlap`` a round's evaluation runs on a background thread while
    the next round trains (the server is idle then); whoever else needs the model (the trust
    reference, the final save) waits for it through :meth:`model_in_use`.
    """

    def __init__(self, task, settings: Settings):
        self.task, self.num_rounds = task, settings.strategy.num_rounds
        self.full_split = task.examples("heldout")
        self.sample = fixed_sample(self.full_split, settings.eval.sample, settings.run.seed)
        if not any(label != -100 for example in self.sample for label in example["labels"]):
            log.warning("no held-out examples: the held-out split has no answer token to score (every answer cut "
                        "off at max-length=%s, or no record held out), so held-out loss, perplexity and accuracy "
                        "are not measured (NaN in metrics.json); raise max-length or heldout-fraction",
                        settings.data.max_length)
        self.overlap = settings.eval.overlap
        self.results: dict[int, dict] = {}
        self.full: dict | None = None          # the whole split after the last round (when sampled)
        self._lock = threading.Lock()          # the model: one user at a time
        self._pending: concurrent.futures.Future | None = None
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fedledger-eval") \
            if self.overlap else None

    @property
    def sampled(self) -> bool:
        return len(self.sample) < len(self.full_split)

    @contextlib.contextmanager
    def model_in_use(self):
        """Hold the server's model (waits for a background evaluation that is using it)."""
        with self._lock:
            yield self.task.model

    def wait(self) -> None:
        """Finish a background evaluation (its error, if any, is raised here)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        self.wait()
        if self._worker is not None:
            self._worker.shutdown(wait=True)

    def _evaluate(self, server_round: int, arrays: ArrayRecord, line) -> dict:
        start = time.perf_counter()
        adapter = decode_global(arrays)
        with self.model_in_use():
            result = self.task.evaluate_examples(adapter, self.sample)
            if self.task.splits.get("tasks"):   # the held-out task set (task-eval-size > 0): greedy answers
                result["exact-match"] = self.task.exact_match(adapter)
            result["eval-seconds"] = time.perf_counter() - start
            self.results[server_round] = result
            if server_round == self.num_rounds and self.sampled:
                t = time.perf_counter()
                self.full = self.task.evaluate_examples(adapter, self.full_split)
                self.full["eval-seconds"] = time.perf_counter() - t
        log.info("%s", line(result))
        return result

    def _schedule(self, server_round: int, arrays: ArrayRecord, line) -> MetricRecord | None:
        self.wait()  # one evaluation at a time, in round order
        if self.overlap and server_round < self.num_rounds:
            self._pending = self._worker.submit(self._evaluate, server_round, arrays, line)
            return None
        return MetricRecord(_scalars(self._evaluate(server_round, arrays, line)))

    def hub(self, pipeline):
        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            report = pipeline.reports.get(server_round)
            entry = report.to_dict() if report else {}

            def line(result: dict) -> str:
                if report:  # the whole round as the user waited for it: train, aggregate, ledger, evaluation
                    entry["wall-seconds"] = time.perf_counter() - report.started
                return logs.round_line(server_round, self.num_rounds, entry, result)

            return self._schedule(server_round, arrays, line)

        return evaluate_fn

    def framework(self, runner):
        """KD / split: the global adapter, or (KD with client-side distillation) the mean of what
        the clients measured on their own adapters (``arrays`` None). Always in the foreground:
        the runner's server half (KD distillation, the split server part) uses the same model
        between rounds (eval-overlap is refused for these strategies, see config)."""
        def evaluate_fn(server_round: int, arrays: ArrayRecord | None) -> MetricRecord:
            report = runner.reports.get(server_round)

            def line(result: dict) -> str:
                return logs.round_line(server_round, self.num_rounds, report.to_dict() if report else {}, result)

            self.wait()
            if arrays is not None:
                result = self._evaluate(server_round, arrays, line)
            else:
                entry = next((h for h in reversed(runner.history) if h.get("round") == server_round), {})
                result = {**entry.get("client-eval", {}).get("mean", {}), "source": "mean of the clients' own models"}
                self.results[server_round] = result
                log.info("%s", line(result))
            return MetricRecord(_scalars(result))

        return evaluate_fn

    def relay(self, runner):
        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            entry = next((h for h in reversed(runner.history) if h.get("round") == server_round), {})
            return self._schedule(server_round, arrays,
                                  lambda result: logs.round_line(server_round, self.num_rounds, entry, result))

        return evaluate_fn


def fixed_sample(examples: list, size: int, seed: int) -> list:
    """``size`` examples drawn once (seeded, kept in split order); all of them for 0 or a larger size."""
    if size <= 0 or size >= len(examples):
        return list(examples)
    rng = np.random.default_rng(seed + 1009)
    return [examples[i] for i in sorted(rng.choice(len(examples), size=size, replace=False))]


def _scalars(result: dict) -> dict:
    return {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


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
    full = rounds.get(settings.strategy.num_rounds, {}).get("central-full")
    if first and last and logs.is_number(first.get("perplexity")) and logs.is_number(last.get("perplexity")):
        what = f"sample of {last['num-examples']}" if full else "held-out split"
        log.info("held-out perplexity (%s) %.2f -> %.2f over %s rounds (%.1f s)%s", what, first["perplexity"],
                 last["perplexity"], settings.strategy.num_rounds, wall,
                 f"; whole held-out split ({full['num-examples']}) after the last round: {full['perplexity']:.2f}"
                 if full else "")
    if not settings.serverless and not any(r.get("report", {}).get("aggregated") for r in rounds.values()):
        log.warning("no round aggregated any update: the global adapter never changed (see the rejected replies "
                    "in metrics.json)")
    log.info("wrote %s", os.path.join(folder, "metrics.json"))
    with open(os.path.join(os.path.dirname(folder), "LATEST"), "w") as fh:
        fh.write(folder + "\n")


def _jsonable(record) -> dict:
    return {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in dict(record).items()}
