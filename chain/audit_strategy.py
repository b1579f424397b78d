"""``OnChainAudit``: any Flower Message-API strategy, with every round recorded on the ledger.

``OnChainAudit(strategy, ledger, store, run_id)`` is a ``core.pipeline.RoundPipeline`` whose
audit trail is a :class:`~fedledger.chain.trail.LedgerTrail`: each reply is decoded and
validated once (a malformed reply is refused with its reason, never aggregated), its signed
record verified, every accepted update and every refused reply recorded (three transactions a
round) and the aggregate committed with the round document. Stacked with another pipeline
(``PageRankTrust``) it merges into one pipeline, in either order.

In a Flower ServerApp of your own, one line builds it from the run-config
(:mod:`.run_config` lists the keys and their defaults)::

    strategy = OnChainAudit.from_context(FedAvg(...), context)

For the fedledger ServerApp: :func:`build_ledger` (a ledger from settings) and
:func:`build_trail` (the trail and an ``info()`` for ``metrics.json``), to hand to
``RoundPipeline(trail=...)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from logging import INFO

from flwr.app import ArrayRecord, Context
from flwr.common import log
from flwr.serverapp.strategy import Strategy

from fedledger.core.checkpoint import Checkpoint, CheckpointError, resume
from fedledger.core.pipeline import Identities, RoundPipeline, to_record

from .ledger import DEFAULT_RPC, Ledger, LedgerError
from .run_config import LedgerConfig
from .store import ArtifactStore, new_run_folder
from .trail import Enrolment, LedgerTrail


class OnChainAudit(RoundPipeline):
    """``strategy`` behind one decode and a :class:`LedgerTrail` on ``ledger`` / ``store``.

    ``require_audit_record``: refuse replies without a signed ``audit`` record (default).
    ``identities``: node id -> Identity (default: the node id alone). ``run_info``: extra keys
    for ``run.json``. ``max_examples``: upper bound of a reply's ``num-examples``. ``enrol``:
    who the registry's admin enrols when the run begins (:class:`~.trail.Enrolment`:
    ``"simulation"``, ``"none"`` or 0x addresses); ``admin``: the registry written by its admin
    (default: ``ledger.admin()``: ``$FEDLEDGER_ADMIN_KEY``, else a devnet's second unlocked
    account).
    """

    def __init__(self, strategy: Strategy, ledger: Ledger, store: ArtifactStore, run_id: int, *,
                 require_audit_record: bool = True, identities: Identities | None = None,
                 run_info: Mapping | None = None, max_examples: int | None = None,
                 enrol: str = "simulation", admin: Ledger | None = None, checkpoint: Checkpoint | None = None) -> None:
        enrolment = Enrolment(enrol)
        if admin is None and enrolment.policy != "none":
            admin = ledger.admin()
        trail = LedgerTrail(ledger, store, run_id, require_audit_record=require_audit_record, run_info=run_info,
                            admin=admin, enrolment=enrolment)
        super().__init__(strategy, trail=trail, identities=identities, max_examples=max_examples,
                         checkpoint=checkpoint)
        self.first_round, self._resumed_arrays = 1, None

    def resume_point(self, initial_arrays: ArrayRecord) -> tuple[ArrayRecord, int]:
        """(the arrays to start from, the first round): ``(initial_arrays, 1)`` for a new run; for a
        run built by :meth:`from_context` with run-config ``resume`` = a run folder, the global of
        its last completed round and the round after it. Pass both to ``start``::

            arrays, first = strategy.resume_point(arrays)
            strategy.start(grid, arrays, num_rounds, first_round=first)"""
        if self._resumed_arrays is None:
            return initial_arrays, 1
        return self._resumed_arrays, self.first_round

    @classmethod
    def from_context(cls, strategy: Strategy, context: Context, *, require_audit_record: bool = True,
                     identities: Identities | None = None, run_info: Mapping | None = None,
                     max_examples: int | None = None, **settings) -> "OnChainAudit":
        """``strategy`` audited as the run-config of ``context`` says (:class:`LedgerConfig`).

        ``settings`` override run-config keys by field name (``audit="eth-tester"``,
        ``rpc_url=...``, ``run_dir=...``); the other keywords are the constructor's. The run
        folder ``<run-dir>/<time>-run<id>/`` is created now and logged with the registry;
        ``audit/run.json`` in it names the ledger (kind, RPC URL, chain id, registry, deploy
        block) from the first round on, and ``run.json`` records the app's run-config.
        ``fedledger audit --run-id <id> --runs <run-dir>`` audits it. Bad values and an
        unreachable chain raise one :class:`LedgerError` line.

        Every completed round is checkpointed in the run folder (``core.checkpoint``). With
        run-config ``resume`` = a run folder, the run continues there: same ledger run id and
        registry, the wrapped strategy's and trust stage's state back; :meth:`resume_point` gives
        the arrays and the first round to ``start`` from."""
        config = LedgerConfig.from_run_config(context.run_config, **settings)
        state = _checkpoint_of(config.resume) if config.resume else None
        run_id = int(state["trail"]["run-id"]) if state else int(context.run_id)
        registry = state["trail"]["registry"] if state else config.registry_address
        ledger = build_ledger(config.audit, config.rpc_url, registry, chain_id=config.chain_id_or_none,
                              private_key_file=config.aggregator_key_file or None,
                              admin_key_file=config.admin_key_file or None, wait=config.ledger_wait)
        admin = build_admin(ledger, config.enrol, config.admin_key_file or None) if state is None else None
        folder = os.path.abspath(config.resume) if state else new_run_folder(config.run_dir, run_id)
        info = {"run-config": {k: v for k, v in context.run_config.items()}, **(run_info or {})}
        checkpoint = Checkpoint(folder, extra_fn=lambda: {"ledger-run-id": run_id})
        audit = cls(strategy, ledger, ArtifactStore(folder), run_id, require_audit_record=require_audit_record,
                    identities=identities, run_info=info, max_examples=max_examples,
                    enrol=config.enrol if state is None else "none", admin=admin, checkpoint=checkpoint)
        if state is not None:
            resume(audit, state)
            audit.first_round, audit._resumed_arrays = int(state["round"]) + 1, to_record(state["global"])
        where = f"at {ledger.rpc_url}" if ledger.rpc_url else "in this process (eth-tester; ends with the ServerApp)"
        log(INFO, "fedledger: run %s is audited on registry %s, chain %s %s; run folder %s%s; audit it with: "
            "fedledger audit --run-id %s --runs %s", run_id, ledger.address, ledger.chain_id, where, folder,
            f" (resumed after round {state['round']})" if state else "", run_id, os.path.dirname(folder))
        return audit


def _checkpoint_of(folder: str) -> dict:
    try:
        return Checkpoint(os.path.abspath(os.path.expanduser(folder))).load()
    except CheckpointError as exc:
        raise LedgerError(f"run-config resume={folder!r}: {exc}") from None


def build_ledger(kind: str, rpc_url: str = DEFAULT_RPC, registry_address: str = "", chain_id: int | None = None,
                 private_key: str | None = None, private_key_file: str | None = None,
                 admin_key_file: str | None = None, wait: float = 0.0) -> Ledger:
    """The aggregator's ledger. ``kind``: ``"anvil"`` (any JSON-RPC node at ``rpc_url``) or
    ``"eth-tester"`` (in-process: its first funded account is the aggregator, its second the
    admin; keys do not apply). ``chain_id`` None or 0: whatever the node reports. Key:
    ``private_key``, ``private_key_file``, else ``$FEDLEDGER_AGGREGATOR_KEY``; a new registry
    (``registry_address`` empty) is deployed by the admin (``admin_key_file``, else
    ``$FEDLEDGER_ADMIN_KEY``, else a devnet's second unlocked account). ``wait``: seconds a write
    waits for a node that stops answering (:meth:`Ledger.patiently`)."""
    if kind == "eth-tester":
        return Ledger.in_process()
    if kind in ("anvil", "rpc"):
        return Ledger.connect(rpc_url, registry_address or None, chain_id=chain_id or None, private_key=private_key,
                              private_key_file=private_key_file or None, admin_key_file=admin_key_file or None,
                              wait=wait)
    raise LedgerError(f"unknown audit kind {kind!r}; use audit=\"anvil\" or audit=\"eth-tester\"")


def build_admin(ledger: Ledger, enrol: str, admin_key_file: str | None = None) -> Ledger | None:
    """The registry written by its admin when the run enrols anyone (``enrol`` not ``"none"``), else None."""
    if Enrolment(enrol).policy == "none":
        return None
    return ledger.admin(private_key_file=admin_key_file or None)


def build_trail(kind: str, run_folder: str, run_id: int, *, rpc_url: str = DEFAULT_RPC, registry_address: str = "",
                chain_id: int | None = None, private_key_file: str | None = None, admin_key_file: str | None = None,
                enrol: str = "simulation", require_audit_record: bool = True,
                run_info: Mapping | None = None, wait: float = 0.0) -> tuple[LedgerTrail, Callable[[], dict]]:
    """For the ServerApp: ``(trail, info)``. ``RoundPipeline(strategy, trail=trail, ...)`` records
    the run under ``<run_folder>/audit/``; ``info()`` describes the ledger and its cost."""
    ledger = build_ledger(kind, rpc_url, registry_address, chain_id=chain_id, private_key_file=private_key_file,
                          admin_key_file=admin_key_file, wait=wait)
    trail = LedgerTrail(ledger, ArtifactStore(run_folder), run_id, require_audit_record=require_audit_record,
                        run_info=run_info, admin=build_admin(ledger, enrol, admin_key_file), enrolment=Enrolment(enrol))
    return trail, trail.info


__all__ = ["OnChainAudit", "build_admin", "build_ledger", "build_trail"]
