"""Audit an audited run: chain events vs the artifact store.

For every round recorded on chain, and every client record in it:

- ``MISSING``       the stored update (or aggregate) file is absent, a round opened on chain was
                    never committed, or a client the run folder lists has no record on chain;
- ``MISMATCH``      the stored file's canonical hash differs from the hash on chain (a flipped
                    byte, swapped files), or the recomputed FedAvg aggregate differs;
- ``BAD-SIGNATURE`` the signature on chain does not recover to the recorded client address for
                    (run id, round, update hash);
- ``OK``            otherwise.

When the run used a trust wrapper (PageRankTrust), the round's trust scores stored in
``round.json`` are re-hashed (canonical JSON) and compared with the hash committed on chain
(row ``trust``).

The records digest the contract committed with each aggregate is recomputed from the events, so
a dropped or reordered event is caught too. For FedAvg-family strategies whose aggregate is the
weighted mean by num-examples (``FedAvg``, ``FedProx``), the aggregate is recomputed from the stored
client updates exactly as Flower's ``aggregate_arrayrecords`` does (float32, weights
``w / sum(w)`` as Python floats, accumulated in the recorded client order) and compared
bit-exactly (``--atol`` allows a tolerance).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .hashing import json_hash, update_hash
from .ledger import Ledger, LedgerError, records_digest
from .signing import recover_signer
from .store import ArtifactStore

# Flower's own strategies (flwr.serverapp.strategy) whose aggregate is the plain
# num-examples-weighted mean of the client arrays.
FEDAVG_LIKE = {"FedAvg", "FedProx"}
ZERO_HASH = "0x" + "00" * 32


@dataclass
class Row:
    round: int
    client: str          # address, "aggregate", or "trust" (the round's trust scores)
    status: str          # OK | MISMATCH | MISSING | BAD-SIGNATURE
    detail: str = ""


@dataclass
class AuditReport:
    run_id: int
    registry: str
    chain_id: int
    source: str
    rows: list[Row] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r.status == "OK" for r in self.rows)

    @property
    def problems(self) -> list[Row]:
        return [r for r in self.rows if r.status != "OK"]

    def to_dict(self) -> dict:
        return {"ok": self.ok, "run-id": self.run_id, "registry-address": self.registry, "chain-id": self.chain_id,
                "source": self.source, "seconds": round(self.seconds, 3),
                "records": sum(1 for r in self.rows if r.client not in ("aggregate", "trust")),
                "problems": len(self.problems), "rows": [asdict(r) for r in self.rows]}

    def table(self) -> str:
        lines = [f"audit of run {self.run_id}: registry {self.registry} on chain {self.chain_id} ({self.source})",
                 f"{'round':>5}  {'client':<42}  {'status':<13}  detail"]
        for r in self.rows:
            lines.append(f"{r.round:>5}  {r.client:<42}  {r.status:<13}  {r.detail}")
        n = len(self.problems)
        lines.append("audit: OK, every record verified" if n == 0 else f"audit: {n} problem(s) found")
        return "\n".join(lines)


def fedavg_recompute(updates: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """Flower's ``aggregate_arrayrecords`` maths, same operations in the same order."""
    total = sum(float(w) for w in weights)
    factors = [float(w) / total for w in weights]
    out: dict[str, np.ndarray] = {}
    for arrays, f in zip(updates, factors, strict=True):
        for k, v in arrays.items():
            if k not in out:
                out[k] = v * f
            else:
                out[k] += v * f
    return out


def _hash_file(path: str) -> tuple[str | None, dict | None]:
    if not os.path.exists(path):
        return None, None
    try:
        arrays = ArtifactStore.load_arrays(path)
    except Exception:  # a corrupted header: the file no longer parses
        return "unreadable", None
    return update_hash(arrays), arrays


def audit_events(events: list[dict], store: ArtifactStore, run_id: int, strategy: str = "", atol: float = 0.0,
                 recompute: bool = True) -> list[Row]:
    rows: list[Row] = []
    rounds: dict[int, dict] = {}
    for e in events:
        if e.get("run-id") != run_id:
            continue
        r = rounds.setdefault(e["round"], {"opened": False, "updates": [], "aggregate": None, "trust": None})
        if e["event"] == "RoundOpened":
            r["opened"] = True
        elif e["event"] == "UpdateRecorded":
            r["updates"].append(e)
        elif e["event"] == "AggregateCommitted":
            r["aggregate"] = e
        elif e["event"] == "TrustCommitted":
            r["trust"] = e
    for rnd in sorted(rounds):
        r = rounds[rnd]
        updates = sorted(r["updates"], key=lambda e: e["index"])
        loaded: list[dict | None] = []
        on_chain = set()
        for e in updates:
            client = e["client"]
            on_chain.add(client.lower())
            h, arrays = _hash_file(store.update_path(rnd, client))
            loaded.append(arrays if h == e["update-hash"] else None)
            if h is None:
                rows.append(Row(rnd, client, "MISSING", "stored update file not found"))
                continue
            if h != e["update-hash"]:
                what = "stored update cannot be read" if h == "unreadable" else \
                    f"stored update hashes to {h[:12]}..., chain has {e['update-hash'][:12]}..."
                rows.append(Row(rnd, client, "MISMATCH", what))
                continue
            try:
                signer = recover_signer(run_id, rnd, e["update-hash"], e["signature"])
            except ValueError:
                signer = None
            if signer is None or signer.lower() != client.lower():
                rows.append(Row(rnd, client, "BAD-SIGNATURE", f"signature recovers to {signer}"))
                continue
            rows.append(Row(rnd, client, "OK", f"{e['num-examples']} examples"))
        manifest = store.read_round(rnd)
        if manifest:
            for c in manifest.get("clients", []):
                if c["client"].lower() not in on_chain:
                    rows.append(Row(rnd, c["client"], "MISSING", "listed in round.json but not recorded on chain"))
        trust_row = _trust_row(rnd, r["trust"], manifest)
        if trust_row is not None:
            rows.append(trust_row)
        agg = r["aggregate"]
        if agg is None:
            rows.append(Row(rnd, "aggregate", "MISSING", "round opened on chain but no aggregate committed"))
            continue
        digest = records_digest(updates)
        if digest != agg["records-digest"] or agg["num-records"] != len(updates):
            rows.append(Row(rnd, "aggregate", "MISMATCH", "committed records digest does not match the recorded events"))
            continue
        if agg["aggregate-hash"] == ZERO_HASH:
            rows.append(Row(rnd, "aggregate", "OK", "no aggregate this round"))
            continue
        h, agg_arrays = _hash_file(store.aggregate_path(rnd))
        if h is None:
            rows.append(Row(rnd, "aggregate", "MISSING", "stored aggregate file not found"))
            continue
        if h != agg["aggregate-hash"]:
            rows.append(Row(rnd, "aggregate", "MISMATCH", f"stored aggregate hashes to {h[:12]}..., chain has "
                                                          f"{agg['aggregate-hash'][:12]}..."))
            continue
        detail = "hash matches"
        if recompute and strategy in FEDAVG_LIKE:
            if any(a is None for a in loaded) or not loaded:
                detail += "; not recomputed (client updates unavailable)"
            else:
                re = fedavg_recompute(loaded, [e["num-examples"] for e in updates])  # type: ignore[arg-type]
                if update_hash(re) == h:
                    detail += f"; {strategy} recomputed bit-exactly"
                elif atol > 0 and re.keys() == agg_arrays.keys() and all(
                        np.allclose(re[k], agg_arrays[k], atol=atol, rtol=0) for k in re):
                    detail += f"; {strategy} recomputed within atol={atol} (not bit-exact)"
                else:
                    rows.append(Row(rnd, "aggregate", "MISMATCH",
                                    f"{strategy} recomputed from the recorded updates differs from the aggregate"))
                    continue
        rows.append(Row(rnd, "aggregate", "OK", detail))
    return rows


def _trust_row(rnd: int, event: dict | None, manifest: dict | None) -> Row | None:
    """The round's trust scores (round.json) against the hash committed on chain, if any."""
    stored = (manifest or {}).get("trust")
    if event is None:
        return None if stored is None else Row(rnd, "trust", "MISSING", "trust scores in round.json but none on chain")
    if stored is None:
        return Row(rnd, "trust", "MISSING", "trust hash on chain but no trust scores in round.json")
    h = json_hash(stored)
    if h != event["trust-hash"]:
        return Row(rnd, "trust", "MISMATCH", f"stored trust scores hash to {h[:12]}..., chain has {event['trust-hash'][:12]}...")
    excluded = stored.get("excluded", []) if isinstance(stored, dict) else []
    return Row(rnd, "trust", "OK", f"trust scores match; excluded {excluded}")


def audit_run(run_folder: str, rpc_url: str | None = None, registry_address: str | None = None,
              ledger: Ledger | None = None, atol: float = 0.0) -> AuditReport:
    """Audit the run stored in ``run_folder`` (the run folder or its ``audit/`` subfolder)."""
    start = time.perf_counter()
    store = ArtifactStore.__new__(ArtifactStore)
    root = os.path.abspath(run_folder)
    store.root = root if os.path.basename(root) == "audit" else os.path.join(root, "audit")
    info_path = os.path.join(store.root, "ledger.json")
    if not os.path.exists(info_path):
        raise LedgerError(f"no audit record at {info_path}; pass the folder of a run made with audit=\"anvil\" "
                          f"or audit=\"eth-tester\"")
    info = store.read_info()
    run_id = int(info["run-id"])
    if ledger is not None:
        events, source = ledger.events(run_id), f"live chain ({ledger.kind})"
    elif info.get("kind") == "eth-tester" and not rpc_url:
        events = store.read_events()
        source = "eth-tester: the in-process chain ended with the run; events exported at run time"
    else:
        url = rpc_url or info.get("rpc-url")
        ledger = Ledger.connect(url, registry_address or info["registry-address"],
                                chain_id=None if registry_address else info.get("chain-id"),
                                deploy_block=info.get("deploy-block", 0))
        events, source = ledger.events(run_id), f"live chain at {url}"
    report = AuditReport(run_id, ledger.address if ledger else info["registry-address"],
                         ledger.chain_id if ledger else info.get("chain-id", 0), source)
    strategy = info.get("strategy", "")
    if not str(info.get("strategy-module", "flwr.")).startswith("flwr."):
        strategy = ""  # a user's own class may share the name but not Flower's maths: hash checks only
    report.rows = audit_events(events, store, run_id, strategy=strategy, atol=atol)
    if not events:
        report.rows.append(Row(0, "-", "MISSING", f"no events of run {run_id} on the registry"))
    report.seconds = time.perf_counter() - start
    return report
