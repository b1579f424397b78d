"""Chain benchmark: gas and wall time per round on anvil, this registry (two roles, enrolment, run
record, EIP-712 commitments, the clients' inclusion check, contests) beside the previous one (the
v1 artifact in bench/baseline/, deployed and driven in the same run), audit time for 10,000
records, signature recovery (EIP-191 vs EIP-712), canonical hashing vs raw hashlib.sha256.

- Gas per round: the aggregator's three writes of a round (``openRound``, the records,
  ``commitAggregate(runId, round, aggregateHash, documentHash)``), called directly, for
  N = 4, 16, 64, 256 clients; v1 batched and one transaction per update, v2 batched. v2's
  one-time costs per run (``enrol`` of the N signers by the admin, ``openRun``) and the clients'
  side (each client's inclusion check before a round: its ``eth_call`` reads, from its own HTTP
  connection; one ``contest`` transaction) are measured in the same loop.
- Audit: 40 rounds x 250 signing clients through the real round pipeline
  (``OnChainAudit(FedAvg)`` driven by Flower's ``Strategy.start`` over an in-process grid of a
  ClientApp that signs its typed commitments), then ``audit_run`` on the live chain (every record
  and aggregate verified, FedAvg recomputed by ``core.replay``).

    python bench/bench_chain.py [--quick] [--out DIR]

Writes chain.json and chain.md to ``--out`` (default bench/results). Fixed seeds. Needs anvil
(bash scripts/install_chain_tools.sh).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from common import GridPartitions, cpu_model  # noqa: E402

from fedledger.chain import devnet, signing  # noqa: E402
from fedledger.chain.audit import audit_run  # noqa: E402
from fedledger.chain.hashing import update_hash  # noqa: E402
from fedledger.chain.ledger import Ledger, UpdateEntry  # noqa: E402
from fedledger.chain.store import ArtifactStore  # noqa: E402


def machine_info() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=HERE).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "chain"], capture_output=True, text=True,
                                    cwd=os.path.dirname(HERE)).stdout.strip())
    except OSError:
        commit, dirty = "", False
    cpu = cpu_model()
    anvil = devnet.find_anvil()
    anvil_v = subprocess.run([anvil, "--version"], capture_output=True, text=True).stdout.splitlines()[0] if anvil else ""
    import web3

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"load-average-1min": load, "platform": platform.platform(), "python": platform.python_version(), "cpu": cpu, "cpus": os.cpu_count(),
            "commit": commit + ("+uncommitted chain/" if dirty else ""), "anvil": anvil_v, "web3": web3.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


V1_ARTIFACT = os.path.join(HERE, "baseline", "UpdateRegistry.v1.json")


class V1Registry:
    """The previous registry (one owner, EIP-191 signatures, no enrolment), driven directly."""

    def __init__(self, w3, owner: str):
        from fedledger.chain.ledger import load_artifact

        art = load_artifact(V1_ARTIFACT)
        factory = w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
        self.w3, self.owner = w3, owner
        receipt = self._tx(factory.constructor())
        self.deploy_gas = int(receipt["gasUsed"])
        self.contract = w3.eth.contract(address=receipt["contractAddress"], abi=art["abi"])

    def _tx(self, fn) -> dict:
        h = fn.transact({"from": self.owner})
        receipt = self.w3.eth.wait_for_transaction_receipt(h, timeout=60, poll_latency=0.01)
        assert receipt["status"] == 1
        return receipt

    def round(self, run_id: int, rnd: int, entries: list[UpdateEntry], batched: bool) -> list[dict]:
        f = self.contract.functions
        receipts = [self._tx(f.openRound(run_id, rnd))]
        chunks = [entries] if batched else [[e] for e in entries]
        for chunk in chunks:
            receipts.append(self._tx(f.recordUpdates(run_id, rnd, [e.client for e in chunk],
                                                     [bytes.fromhex(e.update_hash[2:]) for e in chunk],
                                                     [e.num_examples for e in chunk],
                                                     [bytes.fromhex(e.signature[2:]) for e in chunk])))
        receipts.append(self._tx(f.commitAggregate(run_id, rnd, os.urandom(32), os.urandom(32))))
        return receipts


def v1_entries(n: int, run_id: int, rnd: int, accounts, rng) -> list[UpdateEntry]:
    """Records as v1 took them: an EIP-191 signature over (domain, run id, round, hash)."""
    from eth_account.messages import encode_defunct
    from eth_utils import keccak

    out = []
    for i in range(n):
        h = "0x" + rng.bytes(32).hex()
        digest = keccak(b"fedledger.update.v1" + run_id.to_bytes(8, "big") + rnd.to_bytes(8, "big") + bytes.fromhex(h[2:]))
        sig = "0x" + bytes(accounts[i].sign_message(encode_defunct(primitive=digest)).signature).hex()
        out.append(UpdateEntry(accounts[i].address, h, int(rng.integers(10, 100)), sig))
    return out


def v2_entries(ledger: Ledger, n: int, run_id: int, rnd: int, global_hash: str, accounts, rng) -> list[UpdateEntry]:
    """Records as clients sign them now: an EIP-712 commitment under this registry's domain."""
    out = []
    for i in range(n):
        c = signing.Commitment(ledger.chain_id, ledger.address, run_id, rnd, global_hash, "0x" + rng.bytes(32).hex(),
                               int(rng.integers(10, 100)))
        out.append(UpdateEntry(accounts[i].address, c.update_hash, c.num_examples, signing.sign(accounts[i], c)))
    return out


def bench_rounds(url: str, sizes, rounds: int, accounts) -> tuple[list[dict], dict]:
    """Per N: v1 batched, v1 one tx per update, v2 batched (+ enrolment, run record, client checks, a contest)."""
    from fedledger.chain import inclusion

    rng = np.random.default_rng(0)
    ledger = Ledger.connect(url)                          # v2: dev account #1 deploys as admin, #0 aggregates
    admin = ledger.admin()
    v1 = V1Registry(ledger.w3, ledger.w3.eth.accounts[0])
    once = {"deploy-gas-v1": v1.deploy_gas, "deploy-gas-v2": ledger.tx_log[0]["gas"]}
    rows, run_id = [], 1000
    for n in sizes:
        for mode in ("v1 batched", "v1 per-update"):
            run_id += 1
            gas, wall = [], []
            for rnd in range(1, rounds + 1):
                entries = v1_entries(n, run_id, rnd, accounts, rng)
                t0 = time.perf_counter()
                receipts = v1.round(run_id, rnd, entries, batched=mode == "v1 batched")
                wall.append(time.perf_counter() - t0)
                gas.append(sum(int(r["gasUsed"]) for r in receipts))
            rows.append(_row(n, mode, len(receipts), gas, wall))
        run_id += 1
        t0 = time.perf_counter()
        admin.enrol([a.address for a in accounts[:n + 1]])      # N clients + one whose update will be dropped
        enrol_s = time.perf_counter() - t0
        enrol_gas = admin.tx_log[-1]["gas"]
        admin.fund([a.address for a in accounts[:n + 1]])
        g = "0x" + rng.bytes(32).hex()
        start = len(ledger.tx_log)
        ledger.open_run(run_id, "0x" + rng.bytes(32).hex(), g)
        open_run_gas = ledger.tx_log[start]["gas"]
        reader = Ledger.connect(url, ledger.address, read_only=True)   # a client's own connection
        requests = count_requests(reader)
        gas, wall, checks, calls, last = [], [], [], [], {}
        for rnd in range(1, rounds + 1):
            requests.clear()
            t0 = time.perf_counter()
            for i in range(n):                                  # every client checks the chain before it trains
                inclusion.check(reader, run_id, rnd, g, accounts[i].address, last.get(i))
            checks.append((time.perf_counter() - t0) / n)
            calls.append(requests.count("eth_call") / n)
            entries = v2_entries(ledger, n, run_id, rnd, g, accounts, rng)
            start = len(ledger.tx_log)
            t0 = time.perf_counter()
            ledger.open_round(run_id, rnd)
            ledger.record_updates(run_id, rnd, entries)
            g = "0x" + rng.bytes(32).hex()
            ledger.commit_aggregate(run_id, rnd, g, "0x" + rng.bytes(32).hex())
            wall.append(time.perf_counter() - t0)
            gas.append(sum(t["gas"] for t in ledger.tx_log[start:]))
            n_tx = len(ledger.tx_log) - start
            last = {i: inclusion.Sent(ledger.chain_id, ledger.address, rnd, "", e.update_hash, e.num_examples,
                                      e.signature) for i, e in enumerate(entries)}
        dropped = accounts[n]                                   # its commitment of the last round was left out
        c = signing.Commitment(ledger.chain_id, ledger.address, run_id, rounds, "0x" + "11" * 32, "0x" + "22" * 32, 7)
        contester = reader.writer(dropped)
        t0 = time.perf_counter()
        contester.contest(run_id, rounds, c.global_hash, c.update_hash, 7, signing.sign(dropped, c), dropped.address)
        contest_s = time.perf_counter() - t0
        row = _row(n, "v2 batched", n_tx, gas, wall)
        row.update({"enrol-gas": enrol_gas, "enrol-gas-per-signer": round(enrol_gas / (n + 1), 1),
                    "enrol-seconds": round(enrol_s, 3), "open-run-gas": open_run_gas,
                    "check-ms-per-client": round(1000 * float(np.median(checks)), 2),
                    "check-eth-calls": " / ".join(f"{c:g}" for c in calls), "contest-gas": contester.tx_log[-1]["gas"],
                    "contest-seconds": round(contest_s, 3)})
        rows.append(row)
        for r in rows[-3:]:
            print(json.dumps(r), flush=True)
    return rows, once


def count_requests(ledger: Ledger) -> list[str]:
    """The JSON-RPC methods ``ledger``'s connection sends from now on (appended as they go)."""
    seen: list[str] = []
    provider = ledger.w3.provider
    send = provider.make_request

    def counted(method, params):
        seen.append(str(method))
        return send(method, params)

    provider.make_request = counted
    provider._request_func_cache = (None, None)   # web3 binds make_request when it builds the middleware chain
    return seen


def _row(n: int, mode: str, n_tx: int, gas: list, wall: list) -> dict:
    return {"clients": n, "mode": mode, "tx-per-round": n_tx, "gas-per-round": int(np.mean(gas)),
            "gas-per-record": round(float(np.mean(gas)) / n, 1), "seconds-per-round": round(float(np.median(wall)), 3)}


def bench_signatures(repeats: int = 200) -> dict:
    """CPU time to recover one signer: the previous EIP-191 digest vs today's EIP-712 commitment."""
    from eth_account import Account
    from eth_account.messages import encode_defunct
    from eth_utils import keccak

    acct = signing.simulation_account(0)
    h = "0x" + "ab" * 32
    digest = keccak(b"fedledger.update.v1" + (7).to_bytes(8, "big") + (3).to_bytes(8, "big") + bytes.fromhex(h[2:]))
    old_msg = encode_defunct(primitive=digest)
    old_sig = acct.sign_message(old_msg).signature
    c = signing.Commitment(31337, "0x" + "5f" * 20, 7, 3, "0x" + "cd" * 32, h, 42)
    new_sig = signing.sign(acct, c)
    t_old, t_new = [], []
    for _ in range(repeats):     # interleaved
        t0 = time.perf_counter()
        Account.recover_message(old_msg, signature=old_sig)
        t_old.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        signing.recover(c, new_sig)
        t_new.append(time.perf_counter() - t0)
    out = {"eip191-us": round(1e6 * float(np.median(t_old)), 1), "eip712-us": round(1e6 * float(np.median(t_new)), 1)}
    out["ratio"] = round(out["eip712-us"] / out["eip191-us"], 3)
    print(json.dumps(out), flush=True)
    return out


def signing_client_app(run_id: int, step: float = 0.05):
    """A ClientApp whose node ``i`` trains ``global + step * noise(round, i)`` on ``10 + i % 90``
    examples and signs its typed commitment with its simulation key, as the client mod does
    (without the mod's inclusion check, which ``bench_rounds`` measures on its own)."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from fedledger.core.pipeline import to_record
    from fedledger.core.update import decode_global

    app = ClientApp()
    accounts: dict[int, object] = {}

    @app.train()
    def train(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        told = msg.content["audit"]
        rnd = int(told["server-round"])
        account = accounts.setdefault(pid, signing.simulation_account(pid))
        rng = np.random.default_rng([rnd, pid])
        received = decode_global(msg.content["arrays"])
        arrays = {k: (v + step * rng.standard_normal(v.shape)).astype(np.float32) for k, v in received.items()}
        commitment = signing.Commitment(int(told["chain-id"]), str(told["registry"]), run_id, rnd,
                                        update_hash(received), "", 10 + pid % 90)
        return Message(RecordDict({"arrays": to_record(arrays),
                                   "metrics": MetricRecord({"num-examples": 10 + pid % 90}),
                                   "audit": ConfigRecord(signing.audit_record(arrays, commitment, account))}),
                       reply_to=msg)

    return app


def bench_audit(url: str, records: int, per_round: int, tmp: str) -> dict:
    """Run ``records // per_round`` audited FedAvg rounds of ``per_round`` signing clients (tiny
    adapters) through the round pipeline on a fresh registry (its admin enrols the simulation
    signers), then audit the run on the live chain."""
    from flwr.serverapp.strategy import FedAvg

    from fedledger.chain.audit_strategy import OnChainAudit
    from fedledger.core.pipeline import to_record
    from fedledger.inprocess import InProcessGrid

    logging.getLogger("flwr").setLevel(logging.ERROR)  # Flower logs every round of the 40
    ledger = Ledger.connect(url)
    run_id, rounds = 7, records // per_round
    folder = os.path.join(tmp, "audit-run")
    grid = InProcessGrid(signing_client_app(run_id), per_round, {}, run_id=run_id, seed=1)
    fedavg = FedAvg(fraction_evaluate=0.0, min_evaluate_nodes=0, min_train_nodes=per_round,
                    min_available_nodes=per_round)
    pipeline = OnChainAudit(fedavg, ledger, ArtifactStore(folder), run_id, identities=GridPartitions(grid))
    rng = np.random.default_rng(1)
    initial = {"l.lora_A": rng.standard_normal((4, 8)).astype(np.float32),
               "l.lora_B": rng.standard_normal((8, 4)).astype(np.float32)}
    start_tx = len(ledger.tx_log)
    t0 = time.perf_counter()
    pipeline.start(grid=grid, initial_arrays=to_record(initial), num_rounds=rounds)
    write_s = time.perf_counter() - t0
    kept = [len(pipeline.reports[r].kept) for r in sorted(pipeline.reports)]
    t0 = time.perf_counter()
    report = audit_run(folder, ledger=ledger)
    audit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    events = ledger.events(run_id)
    events_s = time.perf_counter() - t0
    n_rec = sum(r.kind == "update" for r in report.rows)
    aggregates = [r for r in report.rows if r.kind == "aggregate"]
    out = {"records": n_rec, "rounds": rounds, "clients-per-round": per_round, "ok": report.ok,
           "verdict": report.verdict, "accepted-per-round": min(kept) if kept else 0,
           "aggregates-recomputed": sum(r.status == "OK" for r in aggregates),
           "transactions": len(ledger.tx_log) - start_tx,
           "write-seconds": round(write_s, 2), "audit-seconds": round(audit_s, 2),
           "read-events-seconds": round(events_s, 2), "events": len(events),
           "audit-records-per-second": round(n_rec / audit_s, 1)}
    print(json.dumps(out), flush=True)
    return out


def lora_like(rank: int, layers: int = 30, hidden: int = 576, kv: int = 192, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for layer in range(layers):
        for mod, dout in (("q_proj", hidden), ("k_proj", kv), ("v_proj", kv), ("o_proj", hidden)):
            p = f"base_model.model.model.layers.{layer}.self_attn.{mod}"
            out[f"{p}.lora_A.weight"] = rng.standard_normal((rank, hidden)).astype(np.float32)
            out[f"{p}.lora_B.weight"] = rng.standard_normal((dout, rank)).astype(np.float32)
    return out


def bench_hashing(repeats: int = 41) -> list[dict]:
    rows = []
    cases = {"SmolLM2 LoRA r=16 (240 tensors)": lora_like(16), "LoRA r=128 (240 tensors)": lora_like(128),
             "one 64 MiB tensor": {"w": np.random.default_rng(0).standard_normal(16 * 2**20).astype(np.float32)}}
    for name, arrays in cases.items():
        raw = b"".join(np.ascontiguousarray(v).tobytes() for _, v in sorted(arrays.items()))
        nbytes = len(raw)
        t_ours, t_raw = [], []
        k = 1  # one call per sample, many interleaved samples: least exposed to other load
        for _ in range(repeats):  # interleaved, best of N
            t0 = time.perf_counter()
            for _ in range(k):
                update_hash(arrays)
            t_ours.append((time.perf_counter() - t0) / k)
            t0 = time.perf_counter()
            for _ in range(k):
                hashlib.sha256(raw).digest()
            t_raw.append((time.perf_counter() - t0) / k)
        ours, base = nbytes / min(t_ours) / 1e6, nbytes / min(t_raw) / 1e6
        rows.append({"case": name, "MB": round(nbytes / 1e6, 2), "canonical-MB/s": round(ours, 1),
                     "hashlib-MB/s": round(base, 1), "ratio": round(ours / base, 3)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def to_markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["# Chain benchmark (`bench/bench_chain.py`)", "",
             f"Machine: {m['platform']}, {m['cpu']}, {m['cpus']} CPUs; python {m['python']}, web3 {m['web3']}, "
             f"{m['anvil']}; commit {m['commit'] or 'n/a'}; {m['date']}; 1-min load average at start "
             f"{m.get('load-average-1min')} (the 2 cores are shared with other jobs: timings are noisy).", "",
             "Both registries are deployed on the same anvil and driven in the same run: v1 is the previous "
             "contract (`bench/baseline/UpdateRegistry.v1.json`: one owner, EIP-191 signatures over run, round "
             "and update hash, no enrolment); v2 is today's (admin and aggregator roles, enrolment checked per "
             "record, `openRun`, EIP-712 commitments over chain id, registry, run, round, global, update, count; "
             "`contest`).", "",
             f"## The aggregator's gas and wall time per round (open + records + commit; deploy: v1 "
             f"{res['deploy-gas-v1']:,} gas, v2 {res['deploy-gas-v2']:,} gas)", "",
             "| clients | registry, mode | tx/round | gas/round | gas/record | s/round |", "|---:|---|---:|---:|---:|---:|"]
    for r in res["rounds"]:
        lines.append(f"| {r['clients']} | {r['mode']} | {r['tx-per-round']} | {r['gas-per-round']:,} | "
                     f"{r['gas-per-record']:,.0f} | {r['seconds-per-round']:.3f} |")
    lines += ["", "## v2 beside v1, batched: the price of enrolment and typed commitments per round", "",
              "| clients | v1 gas/round | v2 gas/round | v2 / v1 |", "|---:|---:|---:|---:|"]
    for n, v1, v2 in _batched_pairs(res["rounds"]):
        lines.append(f"| {n} | {v1['gas-per-round']:,} | {v2['gas-per-round']:,} | "
                     f"{v2['gas-per-round'] / v1['gas-per-round']:.3f} |")
    lines += ["", "## v2 once per run, and the clients' side", "",
              "Enrolment is the admin's one transaction for N + 1 signers (once per federation, not per run); "
              "`openRun` is the aggregator's, once per run. The inclusion check is what each client does before "
              "it trains a round (read-only `eth_call`s from its own HTTP connection, no gas; median per client "
              "over the rounds); a contest is one transaction from the dropped client's own key.", "",
              "| clients | enrol gas | enrol gas/signer | enrol s | openRun gas | check ms/client | check eth_calls "
              "(round 1 / later) | contest gas | contest s |",
              "|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in res["rounds"]:
        if r["mode"] != "v2 batched":
            continue
        lines.append(f"| {r['clients']} | {r['enrol-gas']:,} | {r['enrol-gas-per-signer']:,.0f} | {r['enrol-seconds']:.3f} | "
                     f"{r['open-run-gas']:,} | {r['check-ms-per-client']:.2f} | {r['check-eth-calls']} | "
                     f"{r['contest-gas']:,} | {r['contest-seconds']:.3f} |")
    sig = res["signatures"]
    lines += ["", f"Recovering one signer on the server (median of interleaved calls): EIP-191 {sig['eip191-us']} us, "
              f"EIP-712 commitment {sig['eip712-us']} us (ratio {sig['ratio']}).", ""]
    a = res["audit"]
    lines += ["## Audit", "",
              f"{a['records']:,} records ({a['rounds']} rounds x {a['clients-per-round']} signing clients through the "
              f"round pipeline, `OnChainAudit(FedAvg)`; {a['aggregates-recomputed']} of {a['rounds']} FedAvg aggregates "
              f"recomputed bit-exactly): audit {a['audit-seconds']} s ({a['audit-records-per-second']:,} records/s; "
              f"reading the {a['events']:,} events alone {a['read-events-seconds']} s); all OK: {a['ok']} "
              f"(\"{a['verdict']}\"). Running the {a['rounds']} rounds (clients sign, the server decodes, verifies "
              f"{a['records']:,} signatures, stores the files and sends {a['transactions']} transactions) took "
              f"{a['write-seconds']} s.", "",
              f"## Canonical hashing vs raw hashlib.sha256 on the same bytes (best of {res.get('hashing-repeats', 41)} "
              f"interleaved single calls; the raw baseline hashes the same tensor bytes pre-concatenated in one buffer)", "",
              "| input | MB | canonical MB/s | hashlib MB/s | ratio |", "|---|---:|---:|---:|---:|"]
    for h in res["hashing"]:
        lines.append(f"| {h['case']} | {h['MB']} | {h['canonical-MB/s']} | {h['hashlib-MB/s']} | {h['ratio']} |")
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--only", choices=["all", "hashing"], default="all",
                    help="hashing: re-measure hashing only and merge into the existing chain.json")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for chain.json / chain.md")
    args = ap.parse_args()
    out = args.out
    if args.only == "hashing":
        with open(os.path.join(out, "chain.json")) as fh:
            res = json.load(fh)
        res["machine"], res["hashing"] = machine_info(), bench_hashing()
        _write(res, out)
        return 0
    sizes = [4, 16] if args.quick else [4, 16, 64, 256]
    records = 1000 if args.quick else 10_000
    res: dict = {"machine": machine_info(), "seeds": {"rounds": 0, "audit": 1, "hashing": 0}}
    res["hashing-repeats"] = 5 if args.quick else 41
    res["hashing"] = bench_hashing(res["hashing-repeats"])
    with tempfile.TemporaryDirectory() as tmp:
        d = os.path.join(tmp, "devnet")
        port = free_port()
        devnet.start(port=port, state_dir=d)
        try:
            url = f"http://127.0.0.1:{port}"
            os.environ[signing.KEY_DIR_ENV] = os.path.join(tmp, "keys")   # this run's own simulation keys
            accounts = [signing.simulation_account(i) for i in range(max(sizes) + 1)]
            res["rounds"], once = bench_rounds(url, sizes, 2, accounts)
            res.update(once)
            res["signatures"] = bench_signatures(50 if args.quick else 400)
            res["audit"] = bench_audit(url, records, 250, tmp)
        finally:
            devnet.stop(d)
    _write(res, out)
    return 0


def _batched_pairs(rows: list[dict]):
    by = {(r["clients"], r["mode"]): r for r in rows}
    for n in sorted({r["clients"] for r in rows}):
        if (n, "v1 batched") in by and (n, "v2 batched") in by:
            yield n, by[(n, "v1 batched")], by[(n, "v2 batched")]


def plot(res: dict, path: str) -> None:
    """Gas per round and transactions per round against N, both registries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_gas, ax_tx) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, style in (("v1 batched", "o--"), ("v1 per-update", "s:"), ("v2 batched", "^-")):
        rows = [r for r in res["rounds"] if r["mode"] == mode]
        n = [r["clients"] for r in rows]
        ax_gas.plot(n, [r["gas-per-round"] for r in rows], style, label=mode)
        ax_tx.plot(n, [r["tx-per-round"] for r in rows], style, label=mode)
    for ax, title in ((ax_gas, "aggregator gas per round"), (ax_tx, "aggregator transactions per round")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("clients per round (N)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("fedledger registry on anvil: v2 (enrolment, EIP-712) beside v1, same run")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write(res: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "chain.json"), "w") as fh:
        json.dump(res, fh, indent=2)
    with open(os.path.join(out, "chain.md"), "w") as fh:
        fh.write(to_markdown(res))
    if res.get("rounds"):
        plot(res, os.path.join(out, "chain.png"))
    print(to_markdown(res))


if __name__ == "__main__":
    sys.exit(main())
