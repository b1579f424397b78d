"""Client keys and the typed commitments clients sign (EIP-712).

Keys (eth-account ``LocalAccount``):

- simulation: ``private key = keccak256(b"fedledger.simulation.v2/" || secret || b"/" || partition-id)``
  (:func:`simulation_account`), where ``secret`` is 32 random bytes created once per federation
  in a local key folder (:func:`federation_secret`: ``$FEDLEDGER_KEY_DIR``, else
  ``.fedledger/keys/`` in the working folder; file ``federation.secret``, mode 0600, never
  committed). Whoever can read that folder can sign as every simulated client: simulations on
  one machine only. A deployed node refuses simulation keys unless told otherwise
  (:func:`fedledger.chain.mods.node_key`).
- deployments: a key file per node (:func:`account_from_keyfile`), given by node-config
  ``key-file`` (an encrypted JSON keystore, password from ``$FEDLEDGER_KEY_PASSWORD``, or a file
  holding one ``0x``-hex private key). Every way a key file can fail is one
  :class:`KeyFileError` line.

What a client signs: an EIP-712 typed commitment (:class:`Commitment`) under the domain
``{name: "fedledger", version: "2", chainId, verifyingContract: registry}``::

    Update(uint256 runId,uint256 round,bytes32 globalHash,bytes32 updateHash,uint64 numExamples)

``globalHash`` is the canonical hash (:mod:`.hashing`) of the global model the client trained
from, computed by the client over the arrays it received; ``updateHash`` that of the update it
sends; ``numExamples`` the weight it claims. The digest is
``keccak256(0x1901 || domainSeparator || keccak256(abi.encode(typeHash, runId, round, globalHash,
updateHash, numExamples)))``, as the registry's ``updateDigest`` computes it and as
``eth_account.messages.encode_typed_data(full_message=Commitment.typed_data())`` encodes it.
A commitment made for one registry, chain, run or round does not verify for another.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Mapping

from eth_account import Account
from eth_account.messages import SignableMessage
from eth_utils import keccak, to_checksum_address

from .hashing import to_bytes32, update_hash

DOMAIN_NAME, DOMAIN_VERSION = "fedledger", "2"
DOMAIN_TYPE = "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
UPDATE_TYPE = "Update(uint256 runId,uint256 round,bytes32 globalHash,bytes32 updateHash,uint64 numExamples)"
UPDATE_TYPEHASH = keccak(text=UPDATE_TYPE)
_DOMAIN_TYPEHASH = keccak(text=DOMAIN_TYPE)

KEY_DIR_ENV = "FEDLEDGER_KEY_DIR"
DEFAULT_KEY_DIR = os.path.join(".fedledger", "keys")
SECRET_FILE = "federation.secret"
_SIMULATION_DOMAIN = b"fedledger.simulation.v2/"


# ---------------------------------------------------------------------------- simulation keys
def key_dir(path: str | None = None) -> str:
    """The local key folder: ``path``, else ``$FEDLEDGER_KEY_DIR``, else ``.fedledger/keys``."""
    return os.path.abspath(os.path.expanduser(path or os.environ.get(KEY_DIR_ENV) or DEFAULT_KEY_DIR))


def federation_secret(path: str | None = None) -> bytes:
    """The federation's 32-byte secret in the key folder, created once (random, mode 0600).

    Processes that race to create it (simulated clients start together) all end up with the
    one that was written first: the new secret is written to a private temporary file and
    hard-linked into place, which fails if another process got there first."""
    folder = key_dir(path)
    target = os.path.join(folder, SECRET_FILE)
    if not os.path.exists(target):
        os.makedirs(folder, mode=0o700, exist_ok=True)
        tmp = f"{target}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
        try:
            os.link(tmp, target)
        except FileExistsError:
            pass
        finally:
            os.remove(tmp)
    with open(target) as fh:
        text = fh.read().strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) != 32:
        raise KeyFileError(f"{target} is not a federation secret (64 hex digits); delete it to make a new one "
                           f"(the simulated clients then get new keys)")
    return secret


def simulation_account(partition_id: int | str, key_folder: str | None = None):
    """The account of a simulated node: derived from the federation secret and its partition id."""
    key = keccak(_SIMULATION_DOMAIN + federation_secret(key_folder) + b"/" + str(int(partition_id)).encode())
    return Account.from_key(key)


# ---------------------------------------------------------------------------- key files
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


# ---------------------------------------------------------------------------- typed commitments
@lru_cache(maxsize=64)
def domain_separator(chain_id: int, registry: str) -> bytes:
    """EIP-712 domain separator of one registry on one chain."""
    return keccak(_DOMAIN_TYPEHASH + keccak(text=DOMAIN_NAME) + keccak(text=DOMAIN_VERSION)
                  + int(chain_id).to_bytes(32, "big") + bytes(12) + bytes.fromhex(registry[2:].lower()))


@dataclass(frozen=True)
class Commitment:
    """What one client signs for one update (see the module docstring)."""

    chain_id: int
    registry: str          # 0x address of the UpdateRegistry (the EIP-712 verifyingContract)
    run_id: int
    round: int
    global_hash: str       # 0x + 64 hex: the global model the client trained from
    update_hash: str       # 0x + 64 hex: the update it sends
    num_examples: int

    def struct_hash(self) -> bytes:
        return keccak(UPDATE_TYPEHASH + int(self.run_id).to_bytes(32, "big") + int(self.round).to_bytes(32, "big")
                      + to_bytes32(self.global_hash) + to_bytes32(self.update_hash)
                      + int(self.num_examples).to_bytes(32, "big"))

    def signable(self) -> SignableMessage:
        """The EIP-712 message (version 0x01: header = domain separator, body = struct hash)."""
        return SignableMessage(b"\x01", domain_separator(int(self.chain_id), self.registry), self.struct_hash())

    def digest(self) -> bytes:
        """The 32 bytes signed: ``keccak256(0x1901 || domainSeparator || structHash)``."""
        m = self.signable()
        return keccak(b"\x19" + m.version + m.header + m.body)

    def typed_data(self) -> dict:
        """The same commitment as EIP-712 typed data (``encode_typed_data(full_message=...)``)."""
        return {
            "types": {"EIP712Domain": [{"name": "name", "type": "string"}, {"name": "version", "type": "string"},
                                       {"name": "chainId", "type": "uint256"},
                                       {"name": "verifyingContract", "type": "address"}],
                      "Update": [{"name": "runId", "type": "uint256"}, {"name": "round", "type": "uint256"},
                                 {"name": "globalHash", "type": "bytes32"}, {"name": "updateHash", "type": "bytes32"},
                                 {"name": "numExamples", "type": "uint64"}]},
            "primaryType": "Update",
            "domain": {"name": DOMAIN_NAME, "version": DOMAIN_VERSION, "chainId": int(self.chain_id),
                       "verifyingContract": to_checksum_address(self.registry)},
            "message": {"runId": int(self.run_id), "round": int(self.round), "globalHash": to_bytes32(self.global_hash),
                        "updateHash": to_bytes32(self.update_hash), "numExamples": int(self.num_examples)},
        }

    def with_update(self, update_hash_value: str, num_examples: int) -> "Commitment":
        return replace(self, update_hash=update_hash_value, num_examples=int(num_examples))

    def describe(self) -> str:
        return (f"round {self.round}, global {self.global_hash[:12]}..., update {self.update_hash[:12]}..., "
                f"{self.num_examples} examples")


def sign(account, commitment: Commitment) -> str:
    """The client's signature (``0x`` + 130 hex: r || s || v) of ``commitment``."""
    return "0x" + bytes(account.sign_message(commitment.signable()).signature).hex()


def recover(commitment: Commitment, signature: str | bytes) -> str:
    """Checksummed address that signed ``commitment``; raises ``ValueError`` on a malformed signature."""
    sig = bytes.fromhex(signature.removeprefix("0x")) if isinstance(signature, str) else bytes(signature)
    try:
        return to_checksum_address(Account.recover_message(commitment.signable(), signature=sig))
    except Exception as exc:  # noqa: BLE001  (eth_keys raises BadSignature / ValidationError)
        raise ValueError(f"malformed signature: {exc}") from None


def verify(commitment: Commitment, signature, signer: str) -> bool:
    try:
        return recover(commitment, signature).lower() == signer.lower()
    except ValueError:
        return False


def audit_record(arrays: Mapping[str, Any], commitment: Commitment, account) -> dict:
    """Content of a train reply's ``audit`` ConfigRecord: ``commitment`` completed with the hash of
    ``arrays``, the signature and the signer's address."""
    signed = commitment.with_update(update_hash(arrays), commitment.num_examples)
    return {"update-hash": signed.update_hash, "global-hash": signed.global_hash,
            "num-examples": int(signed.num_examples), "signature": sign(account, signed), "signer": account.address}


__all__ = ["Commitment", "KeyFileError", "account_from_keyfile", "audit_record", "domain_separator",
           "federation_secret", "key_dir", "recover", "sign", "simulation_account", "verify"]
