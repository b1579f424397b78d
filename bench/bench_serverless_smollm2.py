"""Server FedAvg vs ring vs gossip vs async gossip with the real SmolLM2-135M (one seed).

The grid in ``bench_serverless.py`` uses the tiny model (SmolLM2 is too slow for 3 seeds x 3
sizes x 4 modes on 2 CPU cores). This run checks its accuracy finding on the real model where
CPU time allows: N peers (chatterbot-corpus split by category), equal local steps in every mode,
held-out perplexity of the peers' examples-weighted mean model after every round, on the same
held-out batches; simulated round time on the same network model (complete graph, 20 ms,
100 Mbit/s links, speed heterogeneity 0.5). Each gossip peer's own model is evaluated too.

    PYTHONPATH=. python bench/bench_serverless_smollm2.py            # N=5, 3 rounds x 4 steps, seeds 42,1,2
    PYTHONPATH=. python bench/bench_serverless_smollm2.py --reuse bench/results/serverless_smollm2.json  # add seeds
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import machine_info, machine_line, write_results  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

MODES = ("server-fedavg", "ring", "gossip", "async-gossip")


def run_mode(mode: str, task, cfg: dict, n: int, args) -> dict:
    from flwr.app import ConfigRecord

    from fedledger.client_app import app as client_app
    from fedledger.config import Settings
    from fedledger.inprocess import InProcessGrid
    from fedledger.strategies.kernels import as_numpy_dict, to_arrayrecord

    settings = Settings.from_run_config({**cfg, "strategy": "fedavg" if mode == "server-fedavg" else mode,
                                         "speed-heterogeneity": args.heterogeneity})
    grid = InProcessGrid(client_app, n, settings.to_run_config())
    ppl: dict[int, float] = {}

    def evaluate(rnd, arrays):
        ppl[rnd] = float(task.evaluate(as_numpy_dict(arrays), "heldout", max_batches=args.eval_batches)["perplexity"])
        print(f"  {mode:14s} round {rnd}: held-out perplexity {ppl[rnd]:.3f}", flush=True)

    t0 = time.perf_counter()
    init, train_config = to_arrayrecord(task.initial_adapter), ConfigRecord({"local-steps": args.local_steps})
    if mode == "server-fedavg":
        history = run_hub(settings, grid, n, init, train_config, args.rounds, evaluate)
    else:
        history = relay_for(mode, settings).run(grid, grid.node_of, init, args.rounds, train_config=train_config,
                                                evaluate_fn=evaluate).history
    sim = [h.get("sim-round-seconds") for h in history]
    out = {"perplexity": ppl, "sim-round-seconds": sim, "wall-seconds": time.perf_counter() - t0}
    if mode in ("gossip", "async-gossip"):  # peers hold different models: what does each one get?
        from fedledger.client_peer import MODEL_KEY

        own = [float(task.evaluate(as_numpy_dict(c.state[MODEL_KEY]), "heldout", max_batches=args.eval_batches)["perplexity"])
               for c in grid.contexts.values() if MODEL_KEY in c.state.array_records]
        out["peer-perplexity"] = own
        print(f"  {mode:14s} each peer's own model: {', '.join(f'{x:.3f}' for x in own)}", flush=True)
    return out


def relay_for(mode: str, settings):
    """The serverless runner the settings describe."""
    from fedledger.strategies.relay import build_relay

    t = settings.topology
    return build_relay(mode, topology=t.topology, local_steps=settings.train.local_steps, step_seconds=t.step_seconds,
                       seed=settings.run.seed, latency=t.link_latency, bandwidth=t.link_bandwidth,
                       heterogeneity=t.speed_heterogeneity, gossip_k=t.gossip_k, gossip_steps=t.gossip_steps,
                       ring_order=t.ring_order, staleness_exponent=t.staleness_exponent)


def run_hub(settings, grid, n: int, init, train_config, rounds: int, evaluate) -> list[dict]:
    """Server FedAvg through the round pipeline, accounted on the same network model; returns
    the per-round ``exchange`` entries."""
    from flwr.serverapp.strategy import FedAvg

    from fedledger.core.pipeline import RoundPipeline
    from fedledger.strategies import topology as T
    from fedledger.strategies.accounting import HubAccounting

    t = settings.topology
    topo = T.build(t.topology, n, seed=settings.run.seed, latency=t.link_latency, bandwidth=t.link_bandwidth,
                   heterogeneity=t.speed_heterogeneity)
    accounting = HubAccounting(topo, local_steps=settings.train.local_steps, step_seconds=t.step_seconds,
                               peer_of=grid.partition_of.get)
    hub = RoundPipeline(FedAvg(fraction_evaluate=0.0, min_evaluate_nodes=0, min_available_nodes=n),
                        observers=[accounting])
    hub.start(grid=grid, initial_arrays=init, num_rounds=rounds, train_config=train_config, evaluate_fn=evaluate)
    return [hub.reports[r].extra["exchange"] for r in sorted(hub.reports)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--peers", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=4)
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--eval-batches", type=int, default=6)
    ap.add_argument("--heterogeneity", type=float, default=0.5)
    ap.add_argument("--seeds", default="42,1,2")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--reuse", metavar="JSON", help="take the seeds already in this earlier result file (same settings)")
    ap.add_argument("--out", default=None, help="folder for serverless_smollm2.json / .md (default bench/results)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    for name in ("flwr", "fedledger"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from fedledger.config import Settings
    from fedledger.task import get_task

    n, t0 = args.peers, time.perf_counter()
    results: dict[str, dict] = {}  # seed -> mode -> result
    if args.reuse:
        import json

        with open(args.reuse) as fh:
            old = json.load(fh)
        same = ("model", "peers", "rounds", "local_steps", "learning_rate", "eval_batches", "heterogeneity")
        if any(old["args"].get(k) != getattr(args, k) for k in same):
            raise SystemExit(f"{args.reuse} was run with other settings; not reusing it")
        results.update(old["results"])
    for seed in [s for s in args.seeds.split(",") if s and s not in results]:
        cfg = {"model": args.model, "num-rounds": args.rounds, "local-steps": args.local_steps,
               "learning-rate": args.learning_rate, "seed": int(seed), "gossip-k": 2, "gossip-steps": 1}
        task = get_task(Settings.from_run_config(cfg), n)
        results[seed] = {mode: run_mode(mode, task, cfg, n, args) for mode in args.modes.split(",") if mode}
    info = machine_info()
    md = report(results, args, info, time.perf_counter() - t0)
    write_results("serverless_smollm2", {"args": vars(args), "results": results, "machine": info}, md, args.out)
    print(md)


def report(results: dict, args, info: dict, wall: float) -> str:
    import numpy as np

    seeds = sorted(results, key=lambda x: int(x))
    modes = list(results[seeds[0]])
    rounds = sorted(int(k) for k in results[seeds[0]][modes[0]]["perplexity"])

    def ms(values) -> str:
        return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"

    def final(seed, mode):
        p = results[seed][mode]["perplexity"]
        return p[str(rounds[-1])] if str(rounds[-1]) in p else p[rounds[-1]]

    rows = []
    for mode in modes:
        per_round = [ms([results[s][mode]["perplexity"].get(str(r), results[s][mode]["perplexity"].get(r)) for s in seeds])
                     for r in rounds]
        vs = [100 * (final(s, mode) / final(s, "server-fedavg") - 1) for s in seeds] if "server-fedavg" in modes else []
        vs_txt = (f"{np.mean(vs):+.2f} % ± {np.std(vs):.2f}" if len(vs) > 1 else f"{vs[0]:+.2f} %") if vs else "n/a"
        own = [x for s in seeds for x in results[s][mode].get("peer-perplexity", [])]
        spread = f"{min(own):.3f}-{max(own):.3f}" if own else "= the mean model"
        sim = np.mean([sum(x for x in results[s][mode]["sim-round-seconds"] if x is not None) for s in seeds])
        rows.append(f"| {mode} | " + " | ".join(per_round) + f" | {vs_txt} | {spread} | {sim:.1f} |")
    head = " | ".join(f"r{r}" for r in rounds)
    return f"""# Serverless exchanges with SmolLM2-135M (`bench/bench_serverless_smollm2.py`)

{machine_line(info)} Wall of this invocation {wall:.0f} s.

Model {args.model}, {args.peers} peers (chatterbot-corpus by category), {args.rounds} rounds x {args.local_steps} local steps
(batch 8, lr {args.learning_rate}), seeds {', '.join(seeds)} (mean ± sd), gossip k=2 (1 mixing step per round), speed
heterogeneity {args.heterogeneity}. Held-out perplexity of the peers' examples-weighted mean model on the first
{args.eval_batches} held-out batches of 16 (r0 = base model); the final mean model vs server FedAvg of the same seed
(negative = serverless better); the range of the perplexities of the models the peers themselves hold after the last
round, over all seeds (server FedAvg and the ring give every peer the same model; gossip peers only approach
consensus); simulated seconds of all rounds on the network model (complete graph, 20 ms, 100 Mbit/s).

| mode | {head} | final vs server FedAvg | peers' own models | simulated s |
|---|{'---|' * len(rounds)}---|---|---|
""" + "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
