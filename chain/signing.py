"""Client keys and update signatures.

Keys (eth-account ``LocalAccount``):

- simulation: deterministic per node, ``private key = keccak256(seed || b"/" || partition-id)``
  (:func:`simulation_account`, seed ``"fedledger-sim"``). Anyone who knows the seed can derive
  every key: good for reproducible simulations, never for deployments (a deployed node refuses
  them unless told otherwise: :func:`fedledger.chain.mods.node_key`).
- deployments: a key file per node (:func:`account_from_keyfile`), given by node-config
  ``key-file`` (an encrypted JSON keystore, password from ``$FEDLEDGER_KEY_PASSWORD``, or a file
  holding one ``0x``-hex private key). Every way a key file can fail is one
  :class:`KeyFileError` line.

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


PASSWORD_ENV = "FEDLEDGER_KEY_PASSWORD"


class KeyFileError(ValueError):
    """A key file that gives no account; the message is one line naming the fix."""


def account_from_keyfile(path: str, password: str | None = None, *, role: str = "node",
                         setting: str = "key-file in the node-config", password_env: str = PASSWORD_ENV):
    """Account from a key file: an encrypted JSON keystore (the Ethereum standard; password
    ``password``, else ``$password_env``) or a file holding one ``0x``-hex private key.

    ``role`` and ``setting`` name the key and the option that gave the file in the one-line
    :class:`KeyFileError` raised for a missing or unreadable file, a wrong password, or content
    that is no key."""
    what = f"{role} key file {path}"
    try:
        with open(os.path.expanduser(path)) as fh:
            text = fh.read().strip()
    except FileNotFoundError:
        raise KeyFileError(f"{what} not found; check {setting}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read {what} ({type(exc).__name__}); check its permissions or {setting}") from None
    if not text.startswith("{"):
        try:
            return Account.from_key(text)
        except Exception:  # noqa: BLE001  (eth-account raises several types for a bad key)
            raise KeyFileError(f"{what} is not a 0x-hex private key of 32 bytes; check {setting}") from None
    try:
        keystore = json.loads(text)
    except ValueError:
        raise KeyFileError(f"{what} is neither a JSON keystore nor a 0x-hex key; check {setting}") from None
    pw = password if password is not None else os.environ.get(password_env)
    if pw is None:
        raise KeyFileError(f"{what} is an encrypted keystore; put its password in ${password_env}")
    try:
        return Account.from_key(Account.decrypt(keystore, pw))
    except ValueError as exc:
        if "MAC mismatch" in str(exc):
            raise KeyFileError(f"wrong password for the {role} keystore {path}; check ${password_env}") from None
        raise KeyFileError(f"{what} is not a valid JSON keystore ({exc}); check {setting}") from None
    except Exception as exc:  # noqa: BLE001  (a keystore missing fields)
        raise KeyFileError(f"{what} is not a valid JSON keystore ({type(exc).__name__}); check {setting}") from None


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
