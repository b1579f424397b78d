"""The run-config keys of an audited run, for any Flower app: ``LedgerConfig``.

``OnChainAudit.from_context(strategy, context)`` reads these keys of the app's run-config
(``[tool.flwr.app.config]`` in its pyproject.toml, or ``--run-config``). They are fedledger's
own names; a key the app does not define takes its default, so an app whose pyproject names
none of them works as it is:

=====================  ==========================  ==================================================
key                    default                     what it does
=====================  ==========================  ==================================================
``audit``              ``"anvil"``                 ``"anvil"``: any Ethereum JSON-RPC node at ``rpc-url``;
                                                   ``"eth-tester"``: an in-process chain that ends with
                                                   the ServerApp (its events are kept in the run folder)
``rpc-url``            ``"http://127.0.0.1:8545"`` the node (``fedledger devnet start`` runs anvil there)
``registry-address``   ``""``                      ``""``: deploy a new registry; else its 0x address
``chain-id``           ``0``                       the chain id the node must report; 0: any (recorded)
``aggregator-key-file`` ``""``                     the aggregator's key (keystore, password in
                                                   ``$FEDLEDGER_AGGREGATOR_KEY_PASSWORD``, or 0x hex);
                                                   ``""``: ``$FEDLEDGER_AGGREGATOR_KEY``, else the node's
                                                   first unlocked account (devnets only)
``admin-key-file``     ``""``                      the registry admin's key (enrols clients, deploys a
                                                   new registry); ``""``: ``$FEDLEDGER_ADMIN_KEY``, else
                                                   the node's second unlocked account (devnets only)
``enrol``              ``"simulation"``            who the admin enrols when the run begins:
                                                   ``"simulation"`` (the simulation keys of partitions
                                                   0..N-1, funded on a devnet), ``"none"`` (enrolled
                                                   beforehand), or comma-separated 0x addresses
``run-dir``            ``"runs"``                  run folders go to ``<run-dir>/<time>-run<id>/``
                                                   (relative: to the ServerApp process's working folder)
``resume``             ``""``                      a run folder to continue after its last completed
                                                   round (its ``checkpoint.pkl``): same ledger run id
                                                   and registry (``OnChainAudit.resume_point``)
``ledger-wait``        ``120.0``                   seconds a write waits for a node that does not
                                                   answer (a back-off with one log line per attempt),
                                                   then the run stops (:mod:`.journal` re-sends what a
                                                   restarted node lost)
=====================  ==========================  ==================================================

The defaults are the fedledger app's (``pyproject.toml``), except ``audit``: the fedledger app
defaults to ``"none"``; an app that calls ``from_context`` asked for an audit. A bad value is
one :class:`LedgerError` line naming the key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from urllib.parse import urlparse

from .ledger import DEFAULT_RPC, LedgerError

KINDS = ("anvil", "eth-tester")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")


@dataclass(frozen=True)
class LedgerConfig:
    """Where an audited run is recorded; built from a run-config by :meth:`from_run_config`."""

    audit: str = "anvil"
    rpc_url: str = DEFAULT_RPC
    registry_address: str = ""
    chain_id: int = 0
    aggregator_key_file: str = ""
    admin_key_file: str = ""
    enrol: str = "simulation"
    run_dir: str = "runs"
    ledger_wait: float = 120.0
    resume: str = ""

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            want = {"int": int, "float": (int, float)}.get(getattr(f.type, "__name__", f.type), str)
            if isinstance(value, bool) or not isinstance(value, want):
                _bad(f.name, value, "must be a string" if want is str else "must be a whole number" if want is int
                     else "must be a number")
        if self.ledger_wait < 0:
            _bad("ledger_wait", self.ledger_wait, "must be >= 0 seconds")
        if self.audit not in KINDS:
            _bad("audit", self.audit, 'choose "anvil" or "eth-tester" (audit="none" means: do not wrap the strategy '
                                      'in OnChainAudit)')
        url = urlparse(self.rpc_url)
        if url.scheme not in ("http", "https", "ws", "wss") or not url.netloc:
            _bad("rpc_url", self.rpc_url, "must be an http(s):// or ws(s):// URL, e.g. http://127.0.0.1:8545")
        if self.registry_address and not _ADDRESS.fullmatch(self.registry_address):
            _bad("registry_address", self.registry_address, 'must be "" (deploy a new registry) or a 0x + 40 hex '
                                                            'digit address')
        if self.chain_id < 0:
            _bad("chain_id", self.chain_id, "must be >= 0")
        if not self.run_dir.strip():
            _bad("run_dir", self.run_dir, "must not be empty")
        if self.enrol not in ("simulation", "none") and not all(
                _ADDRESS.fullmatch(a.strip()) for a in self.enrol.split(",") if a.strip()) or not self.enrol.strip():
            _bad("enrol", self.enrol, 'must be "simulation", "none" or a comma-separated list of 0x addresses')

    @classmethod
    def keys(cls) -> dict[str, str]:
        """Run-config key -> field name (``"rpc-url" -> "rpc_url"``)."""
        return {f.name.replace("_", "-"): f.name for f in fields(cls)}

    @classmethod
    def from_run_config(cls, run_config: Mapping, **overrides) -> "LedgerConfig":
        """The keys of ``run_config`` that name a field (others are the app's own), then
        ``overrides`` by field name (``rpc_url="..."``)."""
        unknown = sorted(set(overrides) - set(cls.keys().values()))
        if unknown:
            raise TypeError(f"unknown ledger setting(s) {unknown}; use {sorted(cls.keys().values())}")
        values = {name: _read(name, run_config[key]) for key, name in cls.keys().items() if key in run_config}
        return cls(**{**values, **overrides})

    @property
    def chain_id_or_none(self) -> int | None:
        return self.chain_id or None

    def to_run_config(self) -> dict:
        return {key: getattr(self, name) for key, name in self.keys().items()}


def _read(name: str, raw):
    """A run-config value as the field holds it: an unquoted ``registry-address=0x5FbD...`` is a
    TOML hex integer (read back as the address); a whole float is a whole number."""
    if name == "registry_address" and isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
        return f"0x{raw:040x}"
    if name == "chain_id" and isinstance(raw, float) and raw.is_integer():
        return int(raw)
    return raw


def _bad(name: str, value, allowed: str):
    raise LedgerError(f"run-config {name.replace('_', '-')}={value!r} is not valid: {allowed}")


__all__ = ["KINDS", "LedgerConfig"]
