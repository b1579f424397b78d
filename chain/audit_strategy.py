"""``OnChainAudit``: wrap any Flower Message-API strategy so that every client update and every
aggregate is stored (safetensors) and committed to the ``UpdateRegistry``.

Per round: the wrapper re-hashes each train reply's ArrayRecord, checks the reply's ``audit``
ConfigRecord (``update-hash``, ``signature``, ``signer``; see docs/INTERFACES.md) and refuses,
with a logged reason, a reply whose claimed hash differs, whose signature does not recover to the
claimed signer, that carries no audit record, or whose signer already answered in this round.
It then sends O(1) transactions: ``openRound``, one ``recordUpdates`` batch (client address,
update hash, num-examples, signature, in the order the inner strategy receives them) and, after
the inner strategy aggregated the accepted replies, ``commitAggregate`` (``commitAggregateWithTrust``
when the wrapped stack holds a trust wrapper: the round's trust scores are kept in ``round.json``
and their canonical-JSON SHA-256 goes on chain with the aggregate).

The wrapper delegates ``configure_train``/``aggregate_train``/``configure_evaluate``/
``aggregate_evaluate``/``summary`` to the wrapped strategy and everything else through
``__getattr__``; it does not depend on fedledger's own strategies.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from .hashing import HASH_FORMAT, json_hash, update_hash
from .ledger import Ledger, LedgerError, UpdateEntry
from .signing import recover_signer
from .store import ArtifactStore

log = logging.getLogger("fedledger.chain")
ZERO_HASH = "0x" + "00" * 32


def _numpy_dict(record: ArrayRecord) -> dict:
    return {k: v.numpy() for k, v in record.items()}


def _reply_arrays(content, key: str) -> ArrayRecord | None:
    if key in content.array_records:
        return content.array_records[key]
    recs = list(content.array_records.values())
    return recs[0] if len(recs) == 1 else None


class OnChainAudit(Strategy):
    """Audit trail around ``strategy``. ``weighted_by_key``: the MetricRecord key recorded as the
    client's weight (Flower's FedAvg family uses ``num-examples``)."""

    def __init__(self, strategy: Strategy, ledger: Ledger, store: ArtifactStore, run_id: int,
                 weighted_by_key: str = "num-examples", arrayrecord_key: str = "arrays", audit_key: str = "audit",
                 require_audit_record: bool = True, run_info: dict | None = None):
        self.strategy = strategy
        self.ledger, self.store, self.run_id = ledger, store, int(run_id)
        self.weighted_by_key, self.arrayrecord_key, self.audit_key = weighted_by_key, arrayrecord_key, audit_key
        self.require_audit_record = require_audit_record
        self.flagged: dict[int, list[dict]] = {}
        ledger.on_events = store.append_events
        store.write_info({**ledger.info(), "run-id": self.run_id, "hash-format": HASH_FORMAT,
                          "strategy": type(strategy).__name__,
                          "strategy-module": type(strategy).__module__,
                          "weighted-by-key": weighted_by_key, **(run_info or {})})

    # ----------------------------------------------------------------- delegation
    def __getattr__(self, name: str) -> Any:
        if name == "strategy":  # not yet set (e.g. during unpickling)
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        log.info("\t├── OnChainAudit: registry %s on chain %s (%s)", self.ledger.address, self.ledger.chain_id, self.ledger.kind)
        self.strategy.summary()

    # ----------------------------------------------------------------- the audit
    def check_reply(self, server_round: int, msg: Message) -> tuple[dict | None, str | None]:
        """(record, None) for an acceptable reply, (None, reason) otherwise."""
        content = msg.content
        arrays = _reply_arrays(content, self.arrayrecord_key)
        if arrays is None:
            return None, "no ArrayRecord"
        audit = content.config_records.get(self.audit_key)
        if audit is None:
            if self.require_audit_record:
                return None, f"no '{self.audit_key}' ConfigRecord (client not signing)"
            return None, "unsigned"
        numpy_arrays = _numpy_dict(arrays)
        actual = update_hash(numpy_arrays)
        claimed, signature, signer = (str(audit.get("update-hash", "")), str(audit.get("signature", "")),
                                      str(audit.get("signer", "")))
        if claimed.lower() != actual:
            return None, f"claimed update-hash {claimed[:12]}... differs from the received arrays' hash {actual[:12]}..."
        try:
            recovered = recover_signer(self.run_id, server_round, actual, signature)
        except (ValueError, TypeError) as exc:
            return None, f"bad signature ({exc})"
        if recovered.lower() != signer.lower():
            return None, f"signature recovers to {recovered}, not the claimed signer {signer}"
        weight = 0
        for rec in content.metric_records.values():
            if self.weighted_by_key in rec:
                weight = rec[self.weighted_by_key]
                break
        return {"client": recovered, "node-id": int(msg.metadata.src_node_id), "update-hash": actual,
                "signature": signature, "num-examples": int(weight), "arrays": numpy_arrays}, None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        accepted_msgs: list[Message] = []
        accepted: list[dict] = []
        refused: list[dict] = []
        seen: set[str] = set()
        for msg in replies:
            if msg.has_error():
                accepted_msgs.append(msg)  # the inner strategy counts failures itself
                continue
            rec, reason = self.check_reply(server_round, msg)
            if rec is not None and rec["client"].lower() in seen:
                rec, reason = None, f"signer {rec['client']} already answered in this round"
            if rec is None:
                node = int(msg.metadata.src_node_id)
                log.warning("fedledger audit: round %s: refused reply of node %s: %s", server_round, node, reason)
                refused.append({"node-id": node, "reason": reason})
                continue
            seen.add(rec["client"].lower())
            self.store.save_update(server_round, rec["client"], rec.pop("arrays"))
            accepted.append(rec)
            accepted_msgs.append(msg)
        self.flagged[server_round] = refused

        self.ledger.open_round(self.run_id, server_round)
        self.ledger.record_updates(self.run_id, server_round, [
            UpdateEntry(r["client"], r["update-hash"], r["num-examples"], r["signature"]) for r in accepted])

        arrays, metrics = self.strategy.aggregate_train(server_round, accepted_msgs)

        agg_hash = ZERO_HASH
        if arrays is not None:
            agg = _numpy_dict(arrays)
            agg_hash = update_hash(agg)
            self.store.save_aggregate(server_round, agg)
        record = {"round": server_round, "run-id": self.run_id, "clients": accepted, "refused": refused,
                  "aggregate-hash": agg_hash, "strategy": type(self.strategy).__name__}
        trust = (getattr(self.strategy, "trust_history", None) or {}).get(server_round)
        trust_hash = None
        if trust is not None:  # a trust wrapper inside (PageRankTrust): its scores go on the ledger too
            record["trust"] = json.loads(json.dumps(trust, default=float))
            trust_hash = json_hash(record["trust"])
        self.store.write_round(server_round, record)
        self.ledger.commit_aggregate(self.run_id, server_round, agg_hash, trust_hash=trust_hash)
        return arrays, metrics


def build_ledger(kind: str, rpc_url: str = "http://127.0.0.1:8545", registry_address: str = "",
                 chain_id: int | None = None) -> Ledger:
    """``kind``: ``"anvil"`` (any JSON-RPC node at ``rpc_url``) or ``"eth-tester"`` (in-process)."""
    if kind == "eth-tester":
        return Ledger.in_process()
    if kind in ("anvil", "rpc"):
        return Ledger.connect(rpc_url, registry_address or None, chain_id=chain_id)
    raise LedgerError(f"unknown audit kind {kind!r}; use audit=\"anvil\" or audit=\"eth-tester\"")


def build_audit(kind: str, rpc_url: str, registry_address: str, run_folder: str, run_id: int,
                run_config: dict | None = None):
    """For the ServerApp: returns ``(wrap, info)`` where ``wrap(strategy) -> OnChainAudit`` and
    ``info()`` gives the ledger description (registry address, chain id, ...) for metrics.json."""
    ledger = build_ledger(kind, rpc_url, registry_address)
    store = ArtifactStore(run_folder)
    holder: dict = {}

    def wrap(strategy: Strategy) -> OnChainAudit:
        holder["audit"] = OnChainAudit(strategy, ledger, store, run_id,
                                       run_info={"run-config": run_config} if run_config else None)
        return holder["audit"]

    def info() -> dict:
        d = {**ledger.info(), "run-id": int(run_id), "transactions": len(ledger.tx_log),
             "gas-used": sum(t["gas"] for t in ledger.tx_log), "artifacts": store.root}
        if "audit" in holder:
            d["refused-replies"] = {str(k): v for k, v in holder["audit"].flagged.items() if v}
        return d

    return wrap, info
