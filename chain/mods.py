"""Sign the train replies of any Flower ClientApp: the client mod ``audit_mod`` and ``audited``.

A new ClientApp takes the mod like any of Flower's own::

    app = ClientApp(mods=[audit_mod])

A ClientApp that already exists keeps its code: Flower 1.42 binds an app's mods when each
handler is decorated, so a mod cannot be added to the app object afterwards. ``audited(app)``
returns a new ``ClientApp(mods=[audit_mod])`` that forwards every handler the original
registered (train, evaluate, query, custom actions) to it::

    audited_app = audited(app)    # pyproject.toml: clientapp = "yourapp.client_app:audited_app"

What the mod does with each message:

- anything but a train message (``train`` or ``train.<action>``), or a run with run-config
  ``audit = "none"``: nothing, the handler runs as it would without the mod;
- a train message: *before* the handler runs, it resolves this node's key (:func:`node_key`)
  and checks the chain the instruction's ``audit`` record names (:mod:`.inclusion`: this node
  is enrolled, its signed record of the last round it sent is on chain, the global model it
  received is the chain's current global; a dropped node contests). A node that cannot sign or
  finds the chain wrong logs one line and replies with that line as an error: it does not
  train, and the server records the refusal once. Then the handler runs and, when its reply
  holds exactly one ``ArrayRecord`` (any key; any tensor names, shapes and dtypes an
  ``ArrayRecord`` carries) and one MetricRecord with a whole-number weight (``num-examples``,
  or the key the instruction names), the mod adds the ConfigRecord ``audit``: the node's
  EIP-712 typed commitment (:class:`~.signing.Commitment`: chain id, registry, run id, round,
  the hash of the global model it received, the canonical SHA-256 of its arrays, its example
  count), the signature and its address. The reply is otherwise untouched. A reply it cannot
  sign goes out unsigned with one log line; the server refuses it with its reason.
- the round it signs: the instruction's ``audit`` record names it (``server-round``).

The mod is outermost when it comes first in ``mods``: it signs the reply as it leaves the node,
after every other mod (e.g. Flower's ``LocalDpMod``) has changed it.

The fedledger ServerApp also asks each node ``query.identity``; the mod does not answer it:
that ServerApp sends its own LoRA adapter, which only the fedledger ClientApp trains.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING

from flwr.app import ConfigRecord, Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common import log

from fedledger.core.update import AUDIT_KEY

from . import inclusion
from .inclusion import Instruction

KEY_FILE = "key-file"
ALLOW_SIMULATION_KEYS = "allow-simulation-keys"
SIMULATION, DEPLOYMENT, LOCAL = "simulation", "deployment", "local"
#: ``flwr.common.constant.ErrorCode.MOD_FAILED_PRECONDITION``: a mod refused to run the handler.
MOD_FAILED_PRECONDITION = 6
_CATEGORIES = ("train", "evaluate", "query")


class SigningKeyError(ValueError):
    """This node has no key it may sign with; the message is one line naming the fix."""


# ---------------------------------------------------------------------------- the mod
#: fedledger's own framework messages whose handler checks the chain and signs by itself
#: (:func:`check_framework`, :func:`sign_framework`): a ``train.split`` message carries the
#: global client-side adapter only at step 1 and a gradient after it, and only the round's last
#: reply is an update; a ``train.kd_distill`` reply carries no update at all.
SELF_AUDITED = frozenset({"train.split", "train.kd_distill"})


def audit_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower client mod: check the chain, then sign the train reply of any ClientApp (see the
    module docstring)."""
    if not _is_train(msg) or not signs(context) or msg.metadata.message_type in SELF_AUDITED:
        return call_next(msg, context)
    try:
        key = node_key(context)
        instruction = Instruction.of(msg)
    except (SigningKeyError, ValueError) as exc:
        return _refuse(msg, context, str(exc))
    server_round = instruction.server_round if instruction is not None else instruction_round(msg)
    global_hash = _global_hash(msg)
    if instruction is not None and global_hash is not None:
        try:
            inclusion.check_before_training(context, instruction, global_hash, key)
        except inclusion.Refusal as refusal:
            return _refuse(msg, context, str(refusal))
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    if instruction is not None and not reply.content.array_records and reply.metadata.message_type == "train.kd":
        return reply   # KD's train reply carries metrics only; its signed update is the logit reply
    if instruction is None:   # the server asks for no signed record: it does not audit this run
        if UNSIGNED_NOTED not in context.state.config_records:   # the node's state lives for the run
            context.state[UNSIGNED_NOTED] = ConfigRecord({"round": server_round or 0})
            log(WARNING, "fedledger: the train reply of node %s goes out unsigned: the instruction carries no "
                "'audit' record (the server does not audit this run, or is not fedledger's OnChainAudit); so do "
                "its later replies in this run", context.node_id)
        return reply
    problem, record, weight = _signable(reply, instruction, server_round, global_hash)
    if problem is not None:
        log(WARNING, "fedledger: the train reply of node %s goes out unsigned: %s; the server refuses it",
            context.node_id, problem)
        return reply
    from . import signing

    commitment = signing.Commitment(instruction.chain_id, instruction.registry, instruction.ledger_run(context),
                                    server_round, global_hash, "", weight)
    try:
        audit = signing.audit_record(record, commitment, key.account)
    except (TypeError, ValueError) as exc:  # an Array that does not decode to numpy
        log(WARNING, "fedledger: the train reply of node %s goes out unsigned: its arrays cannot be hashed (%s)",
            context.node_id, exc)
        return reply
    reply.content[AUDIT_KEY] = ConfigRecord(audit)
    inclusion.remember(context, inclusion.Sent(instruction.chain_id, instruction.registry, server_round,
                                               global_hash, audit["update-hash"], weight, audit["signature"]))
    return reply


# ---------------------------------------------------------------------------- framework replies
def check_framework(msg: Message, context: Context, global_hash: str) -> Message | None:
    """For a handler that signs by itself (:data:`SELF_AUDITED`, KD's logit query): before it
    trains, the same chain check as the mod's, for the global model ``global_hash`` it received.
    None: go on (or the run is not audited, or the server sent no instruction: the reply then
    goes out unsigned and the server refuses it); else the error reply to send instead."""
    if not signs(context):
        return None
    try:
        key = node_key(context)
        instruction = Instruction.of(msg)
    except (SigningKeyError, ValueError) as exc:
        return _refuse(msg, context, str(exc))
    if instruction is None:
        return None
    try:
        inclusion.check_before_training(context, instruction, global_hash, key)
    except inclusion.Refusal as refusal:
        return _refuse(msg, context, str(refusal))
    return None


def sign_framework(msg: Message, context: Context, arrays, global_hash: str | None, weight: int
                   ) -> ConfigRecord | None:
    """The reply's ``audit`` record for a handler that signs by itself: the same EIP-712
    commitment as an adapter update's (``update-hash`` = the canonical hash of ``arrays``,
    ``global-hash`` = the global model this node received and trained from, ``num-examples`` =
    ``weight``), remembered for the next round's chain check. None (one log line) when the run is
    not audited or it cannot sign; the server then refuses the reply with its reason."""
    if not signs(context):
        return None
    try:
        key = node_key(context)
        instruction = Instruction.of(msg)
    except (SigningKeyError, ValueError) as exc:
        log(WARNING, "fedledger: the reply of node %s goes out unsigned: %s", context.node_id, exc)
        return None
    if instruction is None or global_hash is None:
        log(WARNING, "fedledger: the reply of node %s goes out unsigned: %s", context.node_id,
            "the message carries no 'audit' instruction" if instruction is None else
            "this node holds no global model of this round (its train message did not reach it)")
        return None
    from . import signing

    commitment = signing.Commitment(instruction.chain_id, instruction.registry, instruction.ledger_run(context),
                                    instruction.server_round, global_hash, "", int(weight))
    audit = signing.audit_record(arrays, commitment, key.account)
    inclusion.remember(context, inclusion.Sent(instruction.chain_id, instruction.registry, instruction.server_round,
                                               global_hash, audit["update-hash"], int(weight), audit["signature"]))
    return ConfigRecord(audit)


def _refuse(msg: Message, context: Context, reason: str) -> Message:
    """This node does not train: one log line, and the reason as the reply's error."""
    log(ERROR, "fedledger: node %s does not train: %s", context.node_id, reason)
    return Message(Error(code=MOD_FAILED_PRECONDITION, reason=f"fedledger: {reason}"), reply_to=msg)


def _global_hash(msg: Message) -> str | None:
    """The canonical hash of the global model the instruction carries (its one ArrayRecord)."""
    records = msg.content.array_records
    if len(records) != 1:
        return None
    from .hashing import update_hash

    try:
        return update_hash(next(iter(records.values())))
    except (TypeError, ValueError):
        return None


#: the node state's record that its replies of this run go out unsigned (logged once)
UNSIGNED_NOTED = "fedledger.unsigned-noted"


def _signable(reply: Message, instruction, server_round, global_hash):
    """(why the reply cannot be signed or None, its one ArrayRecord, its whole-number weight)."""
    if global_hash is None:
        return "the instruction does not carry exactly one ArrayRecord (the global model)", None, None
    arrays = reply.content.array_records
    if len(arrays) != 1:
        return f"it holds {len(arrays)} ArrayRecords, not one", None, None
    metrics = list(reply.content.metric_records.values())
    weight = metrics[0].get(instruction.weight_key) if len(metrics) == 1 else None
    if isinstance(weight, float) and weight.is_integer():
        weight = int(weight)
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
        return f"it has no whole-number '{instruction.weight_key}' in exactly one MetricRecord", None, None
    return None, next(iter(arrays.values())), weight


def audited(client_app: ClientApp) -> ClientApp:
    """A ``ClientApp(mods=[audit_mod])`` that forwards every handler ``client_app`` registered.

    Each forwarded message goes through ``client_app`` itself (its lifespan, its own mods, its
    handler), so the original behaves exactly as before; the mod wraps it from outside. Call it
    after the last ``@app.train()`` / ``@app.evaluate()`` / ``@app.query()`` of the module."""
    if not isinstance(client_app, ClientApp):
        raise TypeError(f"audited() takes a flwr ClientApp, got {type(client_app).__name__}")
    if client_app._call is not None:  # noqa: SLF001  (Flower keeps a client_fn app's handler here)
        raise ValueError("audited() forwards @app.train()/@app.evaluate() handlers; a ClientApp(client_fn=...) "
                         "takes the mod directly: ClientApp(client_fn=..., mods=[audit_mod])")
    names = sorted(client_app._registered_funcs)  # noqa: SLF001  ("train.default", "query.identity", ...)
    if not names:
        raise ValueError("audited(): the ClientApp has no handler yet; call it after its @app.train() and "
                         "@app.evaluate() functions (at the end of the module)")
    wrapped = ClientApp(mods=[audit_mod])

    def forward(msg: Message, context: Context) -> Message:
        return client_app(msg, context)

    for name in names:
        category, action = name.split(".", 1)
        if category not in _CATEGORIES:
            raise ValueError(f"audited(): handler {name!r} is not a train, evaluate or query handler")
        getattr(wrapped, category)(action)(forward)
    return wrapped


# ---------------------------------------------------------------------------- what it reads
def signs(context: Context) -> bool:
    """Whether this run is signed: always, unless the run-config says ``audit = "none"``."""
    return str(context.run_config.get("audit", "")).strip().lower() != "none"


def instruction_round(msg: Message) -> int | None:
    """The round of a server instruction: ``server-round`` of a ConfigRecord, else the group id."""
    for record in msg.content.config_records.values():
        value = record.get("server-round")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    try:
        return int(msg.metadata.group_id)
    except (TypeError, ValueError):
        return None


def _is_train(msg: Message) -> bool:
    return msg.metadata.message_type.split(".", 1)[0] == "train"


# ---------------------------------------------------------------------------- keys
@dataclass(frozen=True)
class NodeKey:
    """The account a node signs with and where it came from (``"key-file"`` or ``"simulation"``)."""

    account: object
    source: str

    @property
    def address(self) -> str:
        return self.account.address


def node_key(context: Context) -> NodeKey:
    """This node's signing key.

    - node-config ``key-file``: an encrypted JSON keystore (password in ``$FEDLEDGER_KEY_PASSWORD``)
      or a file holding one 0x-hex key; read once per process (again when the file changes);
    - else the simulation key of the node's ``partition-id`` (derived from the federation secret
      in this machine's key folder: :func:`~.signing.simulation_account`), except
      in a deployment (:func:`flower_runtime`), which refuses it unless the node-config says
      ``allow-simulation-keys=true`` (test benches).

    Raises :class:`SigningKeyError` (one line) when there is no usable key."""
    from . import signing

    cfg = context.node_config
    key_file = cfg.get(KEY_FILE)
    if key_file:
        try:
            return NodeKey(_keyfile_account(str(key_file)), "key-file")
        except signing.KeyFileError as exc:
            raise SigningKeyError(str(exc)) from None
    runtime = flower_runtime()
    if runtime == DEPLOYMENT and not _truthy(cfg.get(ALLOW_SIMULATION_KEYS, False)):
        raise SigningKeyError(f"this SuperNode has no {KEY_FILE} in its node-config, and a deployment does not sign "
                              f"with a simulation key (whoever reads the key folder can derive it); start the "
                              f"SuperNode with --node-config "
                              f"\"{KEY_FILE}='/path/key.json'\" (or {ALLOW_SIMULATION_KEYS}=true on a test bench)")
    partition = cfg.get("partition-id")
    if isinstance(partition, bool) or not isinstance(partition, int):
        raise SigningKeyError(f"the node-config has neither {KEY_FILE} nor a whole-number partition-id "
                              f"({partition!r}); give the SuperNode --node-config \"{KEY_FILE}='/path/key.json'\"")
    account = _simulation_account(partition)
    if runtime == DEPLOYMENT:
        log(WARNING, "fedledger: node %s signs with the simulation key of partition %s (%s=true): whoever reads "
            "the key folder can derive it; test benches only", context.node_id, partition, ALLOW_SIMULATION_KEYS)
    return NodeKey(account, "simulation")


def flower_runtime() -> str:
    """Where this ClientApp call runs: ``"deployment"``, ``"simulation"`` or ``"local"``.

    Flower 1.42's Context cannot tell (a simulated node's node-config is ``partition-id`` and
    ``num-partitions``, which a SuperNode may be given too), but the call stack can: a deployed
    ClientApp is called by the SuperNode runtime (``flwr.supernode.runtime.run_clientapp``, in the
    ``flwr-clientapp`` process), a simulated one by the simulation engine
    (``flwr.simulation.ray_transport``). ``"local"``: neither (a test or an in-process grid
    calling the app directly), treated like a simulation."""
    frame = sys._getframe(1)  # noqa: SLF001
    while frame is not None:
        module = str(frame.f_globals.get("__name__", ""))
        if module.startswith("flwr.supernode."):
            return DEPLOYMENT
        if module.startswith(("flwr.simulation.", "flwr.server.superlink.fleet.vce")):
            return SIMULATION
        frame = frame.f_back
    return LOCAL


_KEY_FILES: dict[tuple, object] = {}   # (path, mtime, size) -> account: a keystore's KDF runs once
_SIMULATION_KEYS: dict[tuple[str, int], object] = {}   # (key folder, partition) -> account


def _keyfile_account(path: str):
    from . import signing

    full = os.path.abspath(os.path.expanduser(path))
    try:
        st = os.stat(full)
        cache_key = (full, st.st_mtime_ns, st.st_size)
    except OSError:
        return signing.account_from_keyfile(path)  # raises the one-line KeyFileError
    if cache_key not in _KEY_FILES:
        _KEY_FILES[cache_key] = signing.account_from_keyfile(path)
    return _KEY_FILES[cache_key]


def _simulation_account(partition: int):
    from . import signing

    cache_key = (signing.key_dir(), partition)
    if cache_key not in _SIMULATION_KEYS:
        _SIMULATION_KEYS[cache_key] = account = signing.simulation_account(partition)
        log(INFO, "fedledger: partition %s signs with its simulation key %s (derived from the federation secret in "
            "%s: simulations only)", partition, account.address, cache_key[0])
    return _SIMULATION_KEYS[cache_key]


def _truthy(value) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


__all__ = ["ALLOW_SIMULATION_KEYS", "KEY_FILE", "NodeKey", "SELF_AUDITED", "SigningKeyError", "audit_mod", "audited",
           "check_framework", "flower_runtime", "instruction_round", "node_key", "sign_framework", "signs"]
