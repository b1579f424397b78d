"""Client keys and update signatures.

Keys (eth-account ``LocalAccount``):

- simulation: deterministic per node, ``private key = keccak256(seed || b"/" || partition-id)``
  (:func:`simulation_account`, seed ``"fedledger-sim"``). Anyone who knows the seed can derive
  every key: good for reproducible simulations, never for deployments.
- deployments: a key file per node (:func:`account_from_keyfile`), given by node-config
  ``key-file`` (an encrypted JSON keystore, password from ``$FEDLEDGER_KEY_PASSWORD``, or a file
  holding one ``0x``-hex private key).

Signature scheme: **EIP-191 version 0x45** (``personal_sign``, ``eth_account.messages.
encode_defunct``) over the 32-byte digest

    keccak256( b"fedledger.update.v1" || uint64-BE(run_id) || uint64-BE(round) || update_hash )

where ``update_hash`` is the 32-byte :mod:`fedledger.chain.hashing` SHA-256 of the adapter. The
signer's address is recovered with :func:`recover_signer`; on chain, ``ecrecover`` over
``keccak256("\\x19Ethereum Signed Message:\\n32" || digest)`` gives the same address.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Mapping

from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils import keccak, to_checksum_address

from .hashing import to_bytes32, update_hash

DOMAIN = b"fedledger.update.v1"
DEFAULT_SEED = "fedledger-sim"


def simulation_account(partition_id: int | str, seed: str | bytes = DEFAULT_SEED):
    """Deterministic account for a simulated node (public knowledge: simulations only)."""
    seed_b = seed.encode() if isinstance(seed, str) else bytes(seed)
    key = keccak(seed_b + b"/" + str(int(partition_id)).encode())
    return Account.from_key(key)


def account_from_keyfile(path: str, password: str | None = None):
    """Account from a JSON keystore (password or ``$FEDLEDGER_KEY_PASSWORD``) or a hex key file."""
    with open(os.path.expanduser(path)) as fh:
        text = fh.read().strip()
    if text.startswith("{"):
        pw = password if password is not None else os.environ.get("FEDLEDGER_KEY_PASSWORD", "")
        return Account.from_key(Account.decrypt(json.loads(text), pw))
    return Account.from_key(text)


def node_account(node_config: Mapping[str, Any], run_config: Mapping[str, Any] | None = None):
    """The signing account of a ClientApp node: ``key-file`` from node-config when set, else the
    simulation key of ``partition-id``."""
    key_file = node_config.get("key-file") if node_config else None
    if key_file:
        return account_from_keyfile(str(key_file))
    return simulation_account(int(node_config.get("partition-id", 0)))


def signing_digest(run_id: int, server_round: int, update_hash_value: str | bytes) -> bytes:
    return keccak(DOMAIN + struct.pack(">QQ", int(run_id), int(server_round)) + to_bytes32(update_hash_value))


def sign_update(account, run_id: int, server_round: int, update_hash_value: str | bytes) -> str:
    """EIP-191 signature (``0x`` + 130 hex) of (run id, round, update hash)."""
    msg = encode_defunct(primitive=signing_digest(run_id, server_round, update_hash_value))
    return "0x" + bytes(account.sign_message(msg).signature).hex()


def recover_signer(run_id: int, server_round: int, update_hash_value: str | bytes, signature: str | bytes) -> str:
    """Checksummed address that produced ``signature``; raises ``ValueError`` on a malformed one."""
    msg = encode_defunct(primitive=signing_digest(run_id, server_round, update_hash_value))
    sig = bytes.fromhex(signature[2:] if isinstance(signature, str) and signature.startswith("0x") else signature) \
        if isinstance(signature, str) else bytes(signature)
    try:
        return to_checksum_address(Account.recover_message(msg, signature=sig))
    except Exception as exc:  # eth_keys raises BadSignature / ValidationError
        raise ValueError(f"malformed signature: {exc}") from None


def verify(run_id: int, server_round: int, update_hash_value: str | bytes, signature, signer: str) -> bool:
    try:
        return recover_signer(run_id, server_round, update_hash_value, signature).lower() == signer.lower()
    except ValueError:
        return False


def audit_record(arrays: Mapping[str, Any], run_id: int, server_round: int, account) -> dict:
    """Content of a train reply's ``audit`` ConfigRecord: hash, signature and signer address."""
    h = update_hash(arrays)
    return {"update-hash": h, "signature": sign_update(account, run_id, server_round, h), "signer": account.address}
