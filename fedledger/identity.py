"""Who each Flower node is, resolved once per node: its partition id and its signer address.

The fedledger ServerApp asks every node once, before the node's first round, with a
``query.identity`` message. The ClientApp's handler (:func:`register`) answers with the
partition id of its node config and, when the run is audited, the address of its signing key
and a signature over ``(run id, node id, partition id)``, which proves it holds that key.
:class:`Roster` (a ``fedledger.core.Identities``) then checks the claims:

- the partition id is a whole number in ``[0, num_partitions)``;
- a partition claimed by two nodes is refused for both (first claims in one batch) or for the
  newcomer (when an earlier node already holds it): nobody takes over another's history
  (except a restarted SuperNode, below);
- a signer address held by another node is refused; a node that signs with a simulation key
  must sign with the key derived for its partition (a node with a ``key-file`` signs with its
  own key, accepted when no other node holds it; enrolment of such keys is the ledger's job);
- a node that does not answer is asked again at the next round; one whose ClientApp has no
  ``query.identity`` handler is refused (not a fedledger ClientApp);
- a SuperNode that restarts (killed, rebooted) connects under a new Flower node id. When the
  node holding its partition is no longer connected and the newcomer proves the *same signer
  key* that node proved, it is that participant again: it takes the partition over (it rejoins,
  logged, listed under ``rejoined``). While the old node id is still connected (the SuperLink
  lets it go after two missed heartbeats) the newcomer is asked again at the next round. In an
  unsigned run (serverless, or ``audit = "none"``) no claim is proven, a first one neither, so a
  newcomer takes over the partition of a node that is no longer connected without a signer.

From then on trust history, detection and topology peers are keyed by this identity; a
partition id that a train reply reports about itself is never read.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid

from fedledger.core import Identity

log = logging.getLogger("fedledger")

MESSAGE_TYPE = "query.identity"
DOMAIN = b"fedledger.identity.v1"


def identity_digest(run_id: int, node_id: int, partition: int) -> bytes:
    from eth_utils import keccak

    return keccak(DOMAIN + struct.pack(">QQQ", int(run_id) % 2**64, int(node_id) % 2**64, int(partition)))


def _sign(account, digest: bytes) -> str:
    from eth_account.messages import encode_defunct

    return "0x" + bytes(account.sign_message(encode_defunct(primitive=digest)).signature).hex()


def _recover(digest: bytes, signature: str) -> str | None:
    from eth_account import Account
    from eth_account.messages import encode_defunct

    try:
        return Account.recover_message(encode_defunct(primitive=digest), signature=bytes.fromhex(signature.removeprefix("0x")))
    except Exception:  # noqa: BLE001  (any malformed signature is just a refusal)
        return None


class Roster:
    """Node id -> Identity, established by one ``query.identity`` exchange per node.

    ``expected_signers``: partition -> address, when the server knows which key each partition
    signs with (simulation keys); None accepts any address a node proves it holds.
    """

    def __init__(self, run_id: int, num_partitions: int, *, signing: bool,
                 expected_signers: Mapping[int, str] | None = None, timeout: float = 300.0):
        self.run_id, self.num_partitions, self.signing = int(run_id), int(num_partitions), bool(signing)
        self.expected = {int(k): v.lower() for k, v in (expected_signers or {}).items()}
        self.timeout = timeout
        self.known: dict[int, Identity] = {}
        self.refused: dict[int, str] = {}
        self.rejoined: dict[int, int] = {}     # node id now -> the node id it first had (it restarted)

    # ------------------------------------------------------------------ core.Identities
    def resolve(self, node_id: int) -> Identity | None:
        return self.known.get(int(node_id))

    def refresh(self, grid: Grid) -> None:
        """Ask every connected node that has no identity yet (at most once each, unless it did not answer)."""
        connected = {int(n) for n in grid.get_node_ids()}
        new = sorted(n for n in connected if n not in self.known and n not in self.refused)
        if not new:
            return
        messages = [Message(RecordDict({"config": ConfigRecord({"run-id": self.run_id})}), dst_node_id=n,
                            message_type=MESSAGE_TYPE) for n in new]
        replies = {int(r.metadata.src_node_id): r for r in grid.send_and_receive(messages, timeout=self.timeout)}
        claims: dict[int, list[tuple[int, Identity]]] = {}
        for node in new:
            ident, reason = self._check(node, replies.get(node))
            if reason is not None:
                if ident is None and reason.startswith("no answer"):
                    log.warning("identity: node %s did not answer (%s); asked again next round", node, reason)
                    continue
                self._refuse(node, reason)
                continue
            claims.setdefault(ident.partition, []).append((node, ident))
        held = {i.partition: n for n, i in self.known.items()}
        signers = {i.signer.lower(): n for n, i in self.known.items() if i.signer}
        for partition, claimants in sorted(claims.items()):
            if len(claimants) > 1:
                for node, _ in claimants:
                    self._refuse(node, f"partition {partition} is claimed by nodes {[n for n, _ in claimants]}")
                continue
            node, ident = claimants[0]
            if partition in held and self._may_rejoin(ident, held[partition]):
                if held[partition] in connected:   # restarted before the SuperLink let its old id go
                    log.warning("identity: node %s claims partition %s of node %s, which is still connected; asked "
                                "again next round (a restarted SuperNode takes it over once the old node is offline)",
                                node, partition, held[partition])
                    continue
                self._take_over(node, ident, held[partition])
                held[partition] = node
                if ident.signer:
                    signers[ident.signer.lower()] = node
            elif partition in held:
                self._refuse(node, f"partition {partition} already belongs to node {held[partition]}")
            elif ident.signer and ident.signer.lower() in signers:
                self._refuse(node, f"signer {ident.signer} already belongs to node {signers[ident.signer.lower()]}")
            else:
                self.known[node] = ident
                held[partition] = node
                if ident.signer:
                    signers[ident.signer.lower()] = node

    # ------------------------------------------------------------------ helpers
    def nodes_by_partition(self) -> dict[int, int]:
        return {i.partition: n for n, i in sorted(self.known.items(), key=lambda kv: kv[1].partition)}

    def to_dict(self) -> dict:
        return {"nodes": {str(n): i.to_dict() for n, i in sorted(self.known.items())},
                "refused": {str(n): r for n, r in sorted(self.refused.items())},
                "rejoined": {str(n): old for n, old in sorted(self.rejoined.items())}}

    def _may_rejoin(self, ident: Identity, holder: int) -> bool:
        """Whether ``ident`` is the participant of ``holder``'s partition again (a restarted
        SuperNode): in a signed run it proved the signer key the holder proved; an unsigned run
        proves no claim (see the module docstring)."""
        if not self.signing:
            return True
        before = self.known[holder].signer
        return bool(ident.signer) and bool(before) and ident.signer.lower() == before.lower()

    def _take_over(self, node: int, ident: Identity, holder: int) -> None:
        del self.known[holder]
        self.known[node] = ident
        self.rejoined[node] = self.rejoined.pop(holder, holder)
        log.warning("identity: node %s rejoins as partition %s (it was node %s, no longer connected; signer %s)",
                    node, ident.partition, holder, ident.signer or "none: unsigned run")

    def _refuse(self, node: int, reason: str) -> None:
        self.refused[node] = reason
        log.warning("identity: node %s refused for this run: %s", node, reason)

    def _check(self, node: int, reply: Message | None) -> tuple[Identity | None, str | None]:
        if reply is None:
            return None, "no answer within the timeout"
        if reply.has_error():
            return None, f"its ClientApp does not answer {MESSAGE_TYPE} ({reply.error.reason}); use the fedledger ClientApp"
        rec = reply.content.config_records.get("identity")
        if rec is None:
            return None, "identity reply without an 'identity' ConfigRecord"
        if rec.get("error"):
            return None, f"the node says: {rec['error']}"
        pid = rec.get("partition-id")
        if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < self.num_partitions:
            return None, f"partition-id {pid!r} is not in [0, {self.num_partitions})"
        signer = None
        if self.signing:
            claimed, signature = str(rec.get("signer", "")), str(rec.get("signature", ""))
            recovered = _recover(identity_digest(self.run_id, node, pid), signature)
            if recovered is None or recovered.lower() != claimed.lower():
                return None, f"identity signature does not prove the key of {claimed or 'an unnamed signer'}"
            expected = self.expected.get(pid) if rec.get("key-source") == "simulation" else None
            if expected is not None and recovered.lower() != expected:
                return None, f"partition {pid} signs with {expected}, not {recovered}"
            signer = recovered
        return Identity(node, int(pid), signer), None


# ---------------------------------------------------------------------- ClientApp side
def register(app, account_fn=None, key_errors: tuple[type[Exception], ...] = ()) -> None:
    """Add ``@app.query("identity")`` to a ClientApp. ``account_fn(context) -> NodeKey | None``
    gives the node's signing key (``.account``, ``.source``: "simulation" or "key-file"); None:
    the run is not signed. A ``key_errors`` exception (no usable key) is answered as the node's
    ``error``, which the server's Roster gives as the reason it refuses the node."""

    @app.query("identity")
    def _identity(msg: Message, context: Context) -> Message:
        cfg = context.node_config
        try:
            pid = int(cfg["partition-id"])
        except (KeyError, TypeError, ValueError):
            return _error_reply(msg, "node config has no partition-id")
        rec: dict = {"partition-id": pid, "num-partitions": int(cfg.get("num-partitions", 0))}
        try:
            key = account_fn(context) if account_fn is not None else None
        except key_errors as exc:
            return _error_reply(msg, str(exc))
        if key is not None:
            rec["key-source"] = key.source
            rec["signer"] = key.account.address
            rec["signature"] = _sign(key.account, identity_digest(context.run_id, context.node_id, pid))
        return Message(RecordDict({"identity": ConfigRecord(rec)}), reply_to=msg)


def _error_reply(msg: Message, reason: str) -> Message:
    return Message(RecordDict({"identity": ConfigRecord({"error": reason})}), reply_to=msg)
