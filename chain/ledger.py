"""web3.py adapter for the ``UpdateRegistry`` contract.

- :meth:`Ledger.connect` attaches to a JSON-RPC node (anvil by default at
  ``http://127.0.0.1:8545``) and deploys a registry or attaches to one (code must exist at the
  address, ``owner()`` must answer, the chain id must match when given).
- :meth:`Ledger.in_process` runs an eth-tester chain inside this process (history dies with it).
- Writes are O(1) transactions per round: ``open_round``, one ``record_updates`` batch (split only
  above ``max_batch`` records), ``commit_aggregate`` (aggregate hash + round-document hash). Every
  write is idempotent: it reads the chain first and sends only what is missing, so a retry after a
  transient RPC error never records anything twice (and a duplicate that slipped through is
  rejected by the contract).
- The aggregator's key (:func:`aggregator_account`) on a real node: ``$FEDLEDGER_AGGREGATOR_KEY``
  (0x hex) or a key file (an encrypted JSON keystore whose password is in
  ``$FEDLEDGER_AGGREGATOR_KEY_PASSWORD``, or a file holding one 0x-hex key). With a key every
  transaction is signed here and sent raw; the node's unlocked accounts are never used. Without
  one, the node's first unlocked account writes (devnets only; logged).
- Failures end in :class:`LedgerError`, whose message is one line naming the fix.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .hashing import to_bytes32, to_hex

log = logging.getLogger("fedledger.chain")

DEFAULT_RPC = "http://127.0.0.1:8545"
KEY_ENV = "FEDLEDGER_AGGREGATOR_KEY"
KEY_PASSWORD_ENV = "FEDLEDGER_AGGREGATOR_KEY_PASSWORD"
NO_KEY_HINT = (f"set ${KEY_ENV} (a 0x-hex private key) or aggregator-key-file (an encrypted JSON keystore with its "
               f"password in ${KEY_PASSWORD_ENV}, or a file holding a 0x-hex key)")
ARTIFACT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "UpdateRegistry.json")


class LedgerError(RuntimeError):
    """A ledger problem, with a one-line message that names the fix."""


class _Reverted(LedgerError):
    """A mined transaction with status 0 (e.g. a duplicate of one that landed first)."""


@dataclass(frozen=True)
class UpdateEntry:
    client: str            # signer address (checksummed)
    update_hash: str       # 0x + 64 hex
    num_examples: int
    signature: str         # 0x + 130 hex (EIP-191), may be "0x" when the client sent none


def load_artifact(path: str = ARTIFACT) -> dict:
    try:
        with open(path) as fh:
            art = json.load(fh)
        art["abi"], art["bytecode"]  # noqa: B018
        return art
    except FileNotFoundError:
        raise LedgerError(f"contract artifact {path} is missing; restore chain/UpdateRegistry.json "
                          f"(or rebuild it: node chain/compile.js > chain/UpdateRegistry.json)") from None
    except (ValueError, KeyError):
        raise LedgerError(f"contract artifact {path} is not a valid ABI+bytecode JSON; rebuild it with "
                          f"node chain/compile.js > chain/UpdateRegistry.json") from None

# ---------------------------------------------------------------------------- the aggregator's key
def aggregator_account(private_key: str | None = None, private_key_file: str | None = None):
    """The aggregator's ``LocalAccount``: ``private_key``, else ``private_key_file``, else
    ``$FEDLEDGER_AGGREGATOR_KEY``; None when none is given. Bad keys raise a one-line LedgerError."""
    if private_key:
        return _account_from_hex(private_key, "the aggregator private key")
    if private_key_file:
        return _account_from_file(private_key_file)
    env = os.environ.get(KEY_ENV, "").strip()
    if env:
        return _account_from_hex(env, f"${KEY_ENV}")
    return None


def _account_from_hex(text: str, what: str):
    from eth_account import Account

    try:
        return Account.from_key(text.strip())
    except Exception:  # noqa: BLE001  (eth-account raises several types for a bad key)
        raise LedgerError(f"{what} is not a 0x-hex private key of 32 bytes; {NO_KEY_HINT}") from None


def _account_from_file(path: str):
    from .signing import KeyFileError, account_from_keyfile

    try:
        return account_from_keyfile(path, role="aggregator", setting="aggregator-key-file",
                                    password_env=KEY_PASSWORD_ENV)
    except KeyFileError as exc:
        raise LedgerError(str(exc)) from None


def _revert_types() -> tuple:
    from web3.exceptions import ContractCustomError, ContractLogicError, ContractPanicError

    types: list = [ContractLogicError, ContractCustomError, ContractPanicError, _Reverted]
    try:
        from eth_tester.exceptions import TransactionFailed

        types.append(TransactionFailed)
    except ImportError:
        pass
    return tuple(types)


def _transient_types() -> tuple:
    import requests
    from web3.exceptions import ProviderConnectionError, TimeExhausted

    return (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ProviderConnectionError,
            TimeExhausted, ConnectionError, TimeoutError)


def _node_chain_id(w3, rpc_url: str) -> int:
    try:
        return int(w3.eth.chain_id)
    except _transient_types():
        raise LedgerError(f"cannot reach the JSON-RPC node at {rpc_url}; start one with "
                          f"`fedledger devnet start` or pass the right --rpc-url") from None
    except Exception as exc:
        raise LedgerError(f"{rpc_url} did not answer as an Ethereum JSON-RPC node ({type(exc).__name__}); "
                          f"check --rpc-url") from None


def _writer(w3, rpc_url: str, private_key: str | None, private_key_file: str | None):
    """(LocalAccount or None, sender address): the aggregator key, else the node's first unlocked account."""
    account = aggregator_account(private_key, private_key_file)
    if account is not None:
        return account, account.address
    accounts = w3.eth.accounts
    if not accounts:
        raise LedgerError(f"no aggregator key and the node at {rpc_url} has no unlocked account; {NO_KEY_HINT}")
    log.info("no aggregator key given; writing with the node's first unlocked account %s (devnets "
             "only; on a real chain set $%s or aggregator-key-file)", accounts[0], KEY_ENV)
    return None, accounts[0]


def _require_current(w3, address: str) -> None:
    """A registry deployed from an older artifact lacks today's ``commitAggregate``: say so now,
    not with a misleading revert at the end of round 1."""
    from eth_utils import keccak

    if keccak(text=_COMMIT_SIG)[:4] not in bytes(w3.eth.get_code(address)):
        raise LedgerError(f"the registry at {address} predates the round-document commit (deployed from an older "
                          f"UpdateRegistry); leave registry-address empty to deploy a current one")


_COMMIT_SIG = "commitAggregate(uint256,uint256,bytes32,bytes32)"


class Ledger:
    """One registry on one chain, written by one aggregator account (``sender``; None: read only).

    ``account`` is the aggregator's ``LocalAccount`` when its key is known: every transaction is
    then built, signed here and sent raw. Without it, ``sender`` must be an account the node
    unlocked (eth-tester, anvil's dev accounts)."""

    def __init__(self, w3, contract, sender: str | None, kind: str, rpc_url: str | None, deploy_block: int = 0,
                 timeout: float = 30.0, retries: int = 3, account=None, max_batch: int = 300):
        self.w3, self.contract, self.sender, self.kind, self.rpc_url = w3, contract, sender, kind, rpc_url
        self.deploy_block, self.timeout, self.retries, self.max_batch = deploy_block, timeout, retries, max_batch
        self._account = account
        self.chain_id = int(w3.eth.chain_id)
        self.tx_log: list[dict] = []      # hash, gas and wall time of every transaction this object sent
        self.listeners: list[Callable[[list[dict]], None]] = []  # each called with the decoded events of a receipt
        self._revert = _revert_types()
        self._transient = _transient_types()

    # ------------------------------------------------------------------ construction
    @property
    def address(self) -> str:
        return self.contract.address

    @property
    def signs_locally(self) -> bool:
        return self._account is not None

    @classmethod
    def in_process(cls, artifact: str = ARTIFACT, **kw) -> "Ledger":
        """A fresh eth-tester chain in this process with a newly deployed registry (its first
        funded account writes; no key involved)."""
        from web3 import EthereumTesterProvider, Web3

        art = load_artifact(artifact)
        w3 = Web3(EthereumTesterProvider())
        return cls._deploy(w3, art, w3.eth.accounts[0], "eth-tester", None, None, **kw)

    @classmethod
    def connect(cls, rpc_url: str = DEFAULT_RPC, registry_address: str | None = None, chain_id: int | None = None,
                private_key: str | None = None, private_key_file: str | None = None, deploy_block: int | None = None,
                timeout: float = 30.0, retries: int = 3, artifact: str = ARTIFACT, read_only: bool = False,
                **kw) -> "Ledger":
        """Attach to ``registry_address`` on the node at ``rpc_url`` or deploy a new registry.

        The writer is the aggregator key (:func:`aggregator_account`) or, without one, the node's
        first unlocked account. ``read_only``: no writer at all (the auditor); needs an address."""
        from web3 import HTTPProvider, Web3

        art = load_artifact(artifact)
        w3 = Web3(HTTPProvider(rpc_url, request_kwargs={"timeout": timeout}))
        actual_chain = _node_chain_id(w3, rpc_url)
        if chain_id is not None and int(chain_id) != actual_chain:
            raise LedgerError(f"chain id mismatch: the node at {rpc_url} is chain {actual_chain}, expected {chain_id}; "
                              f"point --rpc-url at the chain that holds the registry")
        account, sender = (None, None) if read_only else _writer(w3, rpc_url, private_key, private_key_file)
        kind = "anvil"
        if not registry_address:
            if read_only:
                raise LedgerError("no registry address to read; pass --registry-address")
            return cls._deploy(w3, art, sender, kind, rpc_url, account, timeout=timeout, retries=retries, **kw)
        if not Web3.is_address(registry_address):
            raise LedgerError(f"registry address {registry_address!r} is not an Ethereum address; check --registry-address")
        address = Web3.to_checksum_address(registry_address)
        if len(w3.eth.get_code(address)) == 0:
            raise LedgerError(f"no contract at {address} on chain {actual_chain} ({rpc_url}); check --registry-address, "
                              f"or leave it empty to deploy a new registry")
        contract = w3.eth.contract(address=address, abi=art["abi"])
        try:
            owner = contract.functions.owner().call()
        except Exception:
            raise LedgerError(f"the contract at {address} is not an UpdateRegistry; check --registry-address") from None
        if sender is not None and owner.lower() != sender.lower():
            raise LedgerError(f"the registry at {address} is owned by {owner}, not by the aggregator {sender}; use the "
                              f"owner's key, or leave registry-address empty to deploy a new registry")
        _require_current(w3, address)
        return cls(w3, contract, sender, kind, rpc_url, deploy_block=deploy_block or 0, timeout=timeout,
                   retries=retries, account=account, **kw)

    @classmethod
    def _deploy(cls, w3, art, sender, kind, rpc_url, account, **kw) -> "Ledger":
        factory = w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
        tmp = cls(w3, factory, sender, kind, rpc_url, account=account, **kw)
        receipt = tmp._send(factory.constructor(), "deploy")
        contract = w3.eth.contract(address=receipt["contractAddress"], abi=art["abi"])
        ledger = cls(w3, contract, sender, kind, rpc_url, deploy_block=int(receipt["blockNumber"]), account=account, **kw)
        ledger.tx_log = tmp.tx_log
        return ledger

    def info(self) -> dict:
        """What an auditor needs to find this registry again (part of the run's ``run.json``)."""
        return {"kind": self.kind, "rpc-url": self.rpc_url, "chain-id": self.chain_id,
                "registry-address": self.address, "deploy-block": self.deploy_block, "aggregator": self.sender}

    # ------------------------------------------------------------------ transactions
    def _send(self, fn, label: str) -> dict:
        if self.sender is None:
            raise LedgerError(f"{label}: this ledger was opened read-only (no aggregator account); {NO_KEY_HINT}")
        start = time.perf_counter()
        if self._account is not None:  # signed here; the node only relays the raw transaction
            built = fn.build_transaction({"from": self.sender,
                                          "nonce": self.w3.eth.get_transaction_count(self.sender, "pending")})
            signed = self._account.sign_transaction(built)
            tx_hash = self.w3.eth.send_raw_transaction(signed.raw_transaction)
        else:
            tx_hash = fn.transact({"from": self.sender})
        receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=self.timeout, poll_latency=0.01)
        if int(receipt["status"]) != 1:
            raise _Reverted(f"{label} transaction {tx_hash.to_0x_hex()} reverted; run `fedledger audit` to inspect the chain")
        self.tx_log.append({"label": label, "tx": tx_hash.to_0x_hex(), "gas": int(receipt["gasUsed"]),
                            "seconds": time.perf_counter() - start, "block": int(receipt["blockNumber"])})
        if self.listeners and label != "deploy":
            events = self._decode_receipt(receipt)
            for listener in self.listeners:
                listener(events)
        return receipt

    def _idempotent(self, label: str, pending: Callable[[], Any], send: Callable[[Any], Any]) -> None:
        """Loop: read what is still missing on chain, send it; retry transient errors."""
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                todo = pending()
                if not todo:
                    return
                send(todo)
                if not pending():
                    return
                raise LedgerError(f"{label}: the chain does not show the write after it was mined; check the node")
            except self._transient as exc:
                last = exc
                time.sleep(min(0.2 * 2 ** attempt, 2.0))
            except self._revert as exc:
                # A revert after a retry may only mean the first attempt landed: re-check state.
                last = exc
                try:
                    if not pending():
                        return
                except self._transient:
                    pass
                raise LedgerError(f"{label} was rejected by the registry ({self._reason(exc)}); only the registry owner "
                                  f"may write, in round order, each client once per round") from None
        where = self.rpc_url or "the in-process chain"
        raise LedgerError(f"{label} failed after {self.retries + 1} attempts ({type(last).__name__}); "
                          f"check that the node at {where} is running (`fedledger devnet status`)")

    def _reason(self, exc: Exception) -> str:
        """Name the contract's custom error (NotOwner, RoundOutOfOrder, ...) when the revert data has one."""
        from eth_utils import keccak

        text = " ".join(str(a) for a in getattr(exc, "args", ())) + " " + str(getattr(exc, "data", "") or "")
        for item in self.contract.abi:
            if item.get("type") == "error":
                sig = f"{item['name']}({','.join(i['type'] for i in item['inputs'])})"
                sel = keccak(text=sig)[:4]
                if sel.hex() in text or repr(sel)[2:-1] in text or str(sel) in text:
                    return item["name"]
        return _reason(exc)

    def open_round(self, run_id: int, server_round: int) -> None:
        f = self.contract.functions

        def pending():
            return f.currentRound(int(run_id)).call() < int(server_round)

        self._idempotent(f"open round {server_round}", pending,
                         lambda _: self._send(f.openRound(int(run_id), int(server_round)), "openRound"))

    def record_updates(self, run_id: int, server_round: int, entries: Iterable[UpdateEntry]) -> None:
        """Record ``entries`` in one transaction (chunks of ``max_batch``); skips those already on chain."""
        entries = list(entries)
        f = self.contract.functions
        seen = set()
        for e in entries:
            if e.client.lower() in seen:
                raise LedgerError(f"client {e.client} appears twice in round {server_round}; one record per client per round")
            seen.add(e.client.lower())

        state = {"count": None}

        def pending():
            count = int(f.getRound(int(run_id), int(server_round)).call()[0])
            if state["count"] is not None and count == state["count"] + state["sent"]:
                return []  # fast check after our own batch landed
            state["count"] = count
            if count == 0:
                return entries  # nothing of this round on chain yet: no per-client reads
            todo = []
            for e in entries:
                on_chain = bytes(f.updateHashOf(int(run_id), int(server_round), e.client).call())
                if on_chain == b"\0" * 32:
                    todo.append(e)
                elif on_chain != to_bytes32(e.update_hash):
                    raise LedgerError(f"round {server_round}: client {e.client} already has a different hash on chain; "
                                      f"audit the run with `fedledger audit`")
            return todo

        def send(todo):
            state["sent"] = len(todo)
            for i in range(0, len(todo), self.max_batch):
                chunk = todo[i:i + self.max_batch]
                self._send(f.recordUpdates(int(run_id), int(server_round), [e.client for e in chunk],
                                           [to_bytes32(e.update_hash) for e in chunk], [int(e.num_examples) for e in chunk],
                                           [_sig_bytes(e.signature) for e in chunk]), "recordUpdates")

        if entries:
            self._idempotent(f"record {len(entries)} updates of round {server_round}", pending, send)

    def commit_aggregate(self, run_id: int, server_round: int, aggregate_hash: str, document_hash: str) -> None:
        """Close the round: its aggregate hash (the zero hash when it aggregated nothing) and the hash
        of its round document, in one transaction."""
        f = self.contract.functions
        want = (to_bytes32(aggregate_hash), to_bytes32(document_hash))
        commit = f.commitAggregate(int(run_id), int(server_round), *want)

        def pending():
            r = self.get_round(run_id, server_round)
            if r["committed"] and (to_bytes32(r["aggregate-hash"]), to_bytes32(r["document-hash"])) != want:
                raise LedgerError(f"round {server_round} already has a different aggregate or round document on "
                                  f"chain; audit the run with `fedledger audit`")
            return not r["committed"]

        self._idempotent(f"commit aggregate of round {server_round}", pending,
                         lambda _: self._send(commit, "commitAggregate"))

    # ------------------------------------------------------------------ reads
    def owner(self) -> str:
        return self.contract.functions.owner().call()

    def get_round(self, run_id: int, server_round: int) -> dict:
        count, is_open, committed, agg, digest, document = \
            self.contract.functions.getRound(int(run_id), int(server_round)).call()
        return {"count": int(count), "open": bool(is_open), "committed": bool(committed),
                "aggregate-hash": to_hex(agg), "records-digest": to_hex(digest), "document-hash": to_hex(document)}

    def update_hash_of(self, run_id: int, server_round: int, client: str) -> str | None:
        h = bytes(self.contract.functions.updateHashOf(int(run_id), int(server_round), client).call())
        return None if h == b"\0" * 32 else to_hex(h)

    def events(self, run_id: int | None = None, client: str | None = None, from_block: int | None = None) -> list[dict]:
        """Decoded registry events (RoundOpened, UpdateRecorded, AggregateCommitted), in chain order.

        One ``eth_getLogs`` call (topics filter by run id and client), decoded with eth-abi
        directly: about 10x faster than web3's per-event decoding for large histories."""
        from eth_utils import keccak

        fb = self.deploy_block if from_block is None else from_block
        t0 = {keccak(text=sig): name for name, sig in _EVENT_SIGS.items()}
        if client:
            topic0 = [keccak(text=_EVENT_SIGS["UpdateRecorded"])]
        else:
            topic0 = list(t0)
        topics: list = [topic0, None if run_id is None else _topic_uint(run_id)]
        if client:
            topics += [None, "0x" + "00" * 12 + client.lower().removeprefix("0x")]
        try:
            logs = self.w3.eth.get_logs({"address": self.address, "fromBlock": fb, "toBlock": "latest", "topics": topics})
        except _transient_types():
            raise LedgerError(f"lost the JSON-RPC node at {self.rpc_url} while reading events; check that it runs") from None
        out = [_decode_raw_log(log, t0) for log in logs]
        out = [e for e in out if e is not None]
        out.sort(key=lambda e: (e["block"], e["log-index"]))
        return out

    def _decode_receipt(self, receipt) -> list[dict]:
        """This registry's events in one mined receipt, decoded like :meth:`events`."""
        from eth_utils import keccak

        t0 = {keccak(text=sig): name for name, sig in _EVENT_SIGS.items()}
        mine = [log for log in receipt["logs"] if str(log["address"]).lower() == self.address.lower()]
        out = [e for e in (_decode_raw_log(log, t0) for log in mine) if e is not None]
        out.sort(key=lambda e: (e["block"], e["log-index"]))
        return out


_EVENT_SIGS = {
    "RoundOpened": "RoundOpened(uint256,uint256)",
    "UpdateRecorded": "UpdateRecorded(uint256,uint256,address,uint256,bytes32,uint64,bytes)",
    "AggregateCommitted": "AggregateCommitted(uint256,uint256,bytes32,uint256,bytes32,bytes32)",
}


def _topic_uint(value: int) -> str:
    return "0x" + int(value).to_bytes(32, "big").hex()


def _decode_raw_log(log, topic0: dict) -> dict | None:
    from eth_abi import decode
    from eth_utils import to_checksum_address

    topics = [bytes(t) for t in log["topics"]]
    name = topic0.get(topics[0]) if topics else None
    if name is None:
        return None
    data = bytes(log["data"])
    d: dict[str, Any] = {"event": name, "block": int(log["blockNumber"]), "log-index": int(log["logIndex"]),
                         "tx": log["transactionHash"].to_0x_hex(), "run-id": int.from_bytes(topics[1], "big"),
                         "round": int.from_bytes(topics[2], "big")}
    if name == "UpdateRecorded":
        index, h, n, sig = decode(["uint256", "bytes32", "uint64", "bytes"], data)
        d.update({"client": to_checksum_address(topics[3][12:]), "index": int(index), "update-hash": to_hex(h),
                  "num-examples": int(n), "signature": to_hex(sig)})
    elif name == "AggregateCommitted":
        h, n, digest, document = decode(["bytes32", "uint256", "bytes32", "bytes32"], data)
        d.update({"aggregate-hash": to_hex(h), "num-records": int(n), "records-digest": to_hex(digest),
                  "document-hash": to_hex(document)})
    return d


def _sig_bytes(sig: str | bytes) -> bytes:
    if isinstance(sig, (bytes, bytearray)):
        return bytes(sig)
    s = sig[2:] if sig.startswith("0x") else sig
    return bytes.fromhex(s)


def _reason(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:160]


def records_digest(records: list[dict]) -> str:
    """Recompute the contract's running digest over ordered (client, hash, numExamples) records."""
    from eth_abi import encode
    from eth_utils import keccak

    digest = b"\0" * 32
    for r in records:
        digest = keccak(encode(["bytes32", "address", "bytes32", "uint64"],
                               [digest, r["client"], to_bytes32(r["update-hash"]), int(r["num-examples"])]))
    return to_hex(digest)
