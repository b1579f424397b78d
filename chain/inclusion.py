"""No silent drop: what a client checks on chain before it trains, and how it contests.

Every audited train instruction carries the server's ``audit`` ConfigRecord (:class:`Instruction`:
chain id, registry, ledger kind, round, weight key). Before the handler trains round ``r``,
the client mod (``chain.mods.audit_mod``, the one path of the fedledger ClientApp and of any
audited app) reads the registry from **this node's own** RPC URL (node-config ``rpc-url``;
else the run-config's, which whoever submitted the run chose) and refuses to train, with one
line that says why, unless:

1. the node at that URL is the chain the instruction names, and the registry there is this
   version's UpdateRegistry (code compared with the artifact) and matches node-config
   ``registry-address`` when the node pins one;
2. this node's signer is enrolled on it and the run is open;
3. its own signed record of the last round it sent an update for is on chain: the update hash
   it signed, under its address. If that round was committed without it, the client was
   dropped: it posts its signed commitment with ``contest(...)`` (the registry recovers the
   signer with ecrecover and keeps the proof; the audit shows the round ``DROPPED``) and
   refuses;
4. the chain is at round ``r - 1``, committed (round 1: the run was just opened), and the
   global model it received hashes to the chain's current global: the last committed
   aggregate, or the run's initial global.

What it sent is kept in ``context.state`` (``fedledger.sent``: round, hashes, count,
signature). The check is 3-4 ``eth_call`` reads per round and costs no gas; a contest is one
transaction paid by the client's own key (funded by the admin on a devnet). An eth-tester run
keeps its chain inside the ServerApp's process, where no client can read it: then (and only
then, unless the node-config names an ``rpc-url``) the client trains without the check and says
so once.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Context, Message
from flwr.common import log

from fedledger.core.update import AUDIT_KEY, NUM_EXAMPLES

from .ledger import DEFAULT_RPC, Ledger, LedgerError

STATE_KEY = "fedledger.sent"
RPC_URL, REGISTRY_ADDRESS = "rpc-url", "registry-address"
IN_PROCESS = "eth-tester"


class Refusal(Exception):
    """Why this node does not train this round (one line); ``dropped``: the record it was left out of."""

    def __init__(self, reason: str, dropped: "Sent | None" = None):
        super().__init__(reason)
        self.dropped = dropped


@dataclass(frozen=True)
class Instruction:
    """The server's ``audit`` ConfigRecord of a train instruction."""

    chain_id: int
    registry: str
    ledger: str
    server_round: int
    weight_key: str = NUM_EXAMPLES
    run_id: int | None = None   # the run on the ledger (a resumed run keeps its first run's); None: Flower's

    def ledger_run(self, context: Context) -> int:
        """The run id the node signs for and checks on chain: the instruction's, else Flower's own.
        A server that names another run gains nothing: the node checks that run on chain (open,
        at this round, from the global it was sent) before it trains."""
        return int(self.run_id) if self.run_id is not None else int(context.run_id)

    @classmethod
    def of(cls, msg: Message) -> "Instruction | None":
        """The instruction's audit record; None when the server sent none (not an audited server).
        Raises ValueError (one line) for a malformed one."""
        rec = msg.content.config_records.get(AUDIT_KEY)
        if rec is None:
            return None
        try:
            registry = str(rec["registry"])
            if not (registry.startswith("0x") and len(registry) == 42):
                raise ValueError
            run_id = rec.get("run-id")
            return cls(int(rec["chain-id"]), registry, str(rec.get("ledger", "")), int(rec["server-round"]),
                       str(rec.get("weight-key", NUM_EXAMPLES)), None if run_id is None else int(run_id))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"the server's '{AUDIT_KEY}' instruction is malformed ({dict(rec)}); is the server "
                             f"fedledger's OnChainAudit?") from None


@dataclass(frozen=True)
class Sent:
    """The signed commitment this node last sent (kept in ``context.state``)."""

    chain_id: int
    registry: str
    round: int
    global_hash: str
    update_hash: str
    num_examples: int
    signature: str

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({"chain-id": self.chain_id, "registry": self.registry, "round": self.round,
                             "global-hash": self.global_hash, "update-hash": self.update_hash,
                             "num-examples": self.num_examples, "signature": self.signature})

    @classmethod
    def from_record(cls, rec) -> "Sent":
        return cls(int(rec["chain-id"]), str(rec["registry"]), int(rec["round"]), str(rec["global-hash"]),
                   str(rec["update-hash"]), int(rec["num-examples"]), str(rec["signature"]))


def remember(context: Context, sent: Sent) -> None:
    context.state[STATE_KEY] = sent.to_record()


def last_sent(context: Context, instruction: Instruction) -> Sent | None:
    """What this node last sent on the registry the instruction names (None: nothing yet)."""
    rec = context.state.config_records.get(STATE_KEY)
    if rec is None:
        return None
    sent = Sent.from_record(rec)
    same = sent.chain_id == instruction.chain_id and sent.registry.lower() == instruction.registry.lower()
    return sent if same else None


# ---------------------------------------------------------------------------- the check
_CHAINS: dict[tuple, Ledger] = {}      # (rpc url, chain id, registry) -> read-only ledger (one per process)
_UNCHECKED: set[tuple] = set()          # (node, run) told once that it trains without the check


def check_before_training(context: Context, instruction: Instruction, global_hash: str, key) -> None:
    """Raise :class:`Refusal` when this node must not train this round (see the module docstring);
    a dropped node contests first."""
    chain = client_chain(context, instruction)
    if chain is None:
        return
    try:
        check(chain, instruction.ledger_run(context), instruction.server_round, global_hash, key.address,
              last_sent(context, instruction))
    except Refusal as refusal:
        if refusal.dropped is None:
            raise
        raise Refusal(f"{refusal}; {contest(chain, instruction.ledger_run(context), refusal.dropped, key)}",
                      refusal.dropped) from None
    except LedgerError as exc:
        raise Refusal(f"cannot check the chain: {exc}") from None


def client_chain(context: Context, instruction: Instruction) -> Ledger | None:
    """The registry as this node reads it; None when it cannot (an in-process eth-tester chain)."""
    own_url = context.node_config.get(RPC_URL)
    if not own_url and instruction.ledger == IN_PROCESS:
        if (context.node_id, context.run_id) not in _UNCHECKED:
            _UNCHECKED.add((context.node_id, context.run_id))
            log(WARNING, "fedledger: node %s trains without the inclusion check: the run's chain is an eth-tester "
                "chain inside the ServerApp's process (give the node-config an rpc-url to check a real one)",
                context.node_id)
        return None
    pinned = context.node_config.get(REGISTRY_ADDRESS)
    if pinned and str(pinned).lower() != instruction.registry.lower():
        raise Refusal(f"the server names registry {instruction.registry}, this node's node-config "
                      f"registry-address is {pinned}")
    url = str(own_url or context.run_config.get(RPC_URL) or DEFAULT_RPC)
    cache_key = (url, instruction.chain_id, instruction.registry.lower())
    if cache_key not in _CHAINS:
        try:
            _CHAINS[cache_key] = Ledger.connect(url, instruction.registry, chain_id=instruction.chain_id,
                                                read_only=True, timeout=10.0)
        except LedgerError as exc:
            raise Refusal(f"cannot check the chain the server names: {exc}") from None
    return _CHAINS[cache_key]


def check(chain: Ledger, run_id: int, server_round: int, global_hash: str, me: str, last: Sent | None) -> None:
    """The four checks of the module docstring, on ``chain``, for round ``server_round``."""
    if not chain.is_enrolled(me):
        raise Refusal(f"this node's signer {me} is not enrolled on registry {chain.address}; ask the federation's "
                      f"admin to enrol it")
    run = chain.get_run(run_id)
    if not run["opened-at"]:
        raise Refusal(f"run {run_id} is not open on registry {chain.address}")
    if last is not None and last.round < server_round:
        _check_recorded(chain, run_id, me, last)
    current = run["current-round"]
    if current != server_round - 1:
        raise Refusal(f"the server asks for round {server_round}, but the chain's run {run_id} is at round {current}")
    if current and not chain.get_round(run_id, current)["committed"]:
        raise Refusal(f"round {current} is not committed on chain; the server asks for round {server_round}")
    if run["current-global"] != global_hash:
        raise Refusal(f"the global model I received hashes to {global_hash[:12]}..., but the chain's current global "
                      f"(round {current}'s result) is {run['current-global'][:12]}...")


def _check_recorded(chain: Ledger, run_id: int, me: str, last: Sent) -> None:
    recorded = chain.update_hash_of(run_id, last.round, me)
    if recorded == last.update_hash:
        return
    if recorded is not None:
        raise Refusal(f"round {last.round} records update {recorded[:12]}... as mine, but I signed "
                      f"{last.update_hash[:12]}...")
    if chain.get_round(run_id, last.round)["committed"]:
        raise Refusal(f"dropped: my signed record of round {last.round} (update {last.update_hash}) is not on "
                      f"chain: the aggregator committed round {last.round} without it", dropped=last)
    raise Refusal(f"round {last.round}, where I sent update {last.update_hash[:12]}..., is not committed on chain")


def contest(chain: Ledger, run_id: int, dropped: Sent, key) -> str:
    """Post the dropped commitment with ``contest`` from this node's own key; what happened, as text."""
    try:
        writer = chain.writer(key.account)
        writer.contest(run_id, dropped.round, dropped.global_hash, dropped.update_hash, dropped.num_examples,
                       dropped.signature, key.address)
    except LedgerError as exc:
        return f"could not contest it: {exc}"
    except Exception as exc:  # noqa: BLE001  (e.g. no funds: the node refuses the transaction)
        return f"could not contest it ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    tx = writer.tx_log[-1]["tx"] if writer.tx_log else "already on chain"
    log(INFO, "fedledger: contested round %s of run %s on registry %s (tx %s)", dropped.round, run_id, chain.address, tx)
    return f"contested on chain (tx {tx})"


__all__ = ["Instruction", "Refusal", "STATE_KEY", "Sent", "check", "check_before_training", "client_chain",
           "contest", "last_sent", "remember"]
