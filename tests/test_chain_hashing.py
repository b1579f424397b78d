"""Canonical adapter hash and client signatures."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest

from fedledger.chain import hashing, signing


def _adapter(seed=0):
    rng = np.random.default_rng(seed)
    return {"m.q.lora_B.weight": rng.standard_normal((16, 4)).astype(np.float32),
            "m.q.lora_A.weight": rng.standard_normal((4, 16)).astype(np.float32)}


def test_hash_is_canonical_and_documented_format():
    a = _adapter()
    h = hashing.update_hash(a)
    assert h == hashing.update_hash(dict(reversed(list(a.items()))))          # order of names irrelevant
    assert h == hashing.update_hash({k: v.astype(">f4") for k, v in a.items()})  # byte order irrelevant
    assert h == hashing.update_hash({k: np.asfortranarray(v) for k, v in a.items()})  # memory layout irrelevant
    # reimplement the documented format independently
    names = sorted(a)
    header = json.dumps([[n, "<f4", list(a[n].shape)] for n in names], separators=(",", ":")).encode()
    ref = hashlib.sha256(b"fedledger.adapter.v1\n" + struct.pack("<Q", len(header)) + header
                         + b"".join(a[n].astype("<f4").tobytes() for n in names)).hexdigest()
    assert h == "0x" + ref


def test_hash_sees_values_dtype_shape_and_names():
    a = _adapter()
    h = hashing.update_hash(a)
    b = {k: v.copy() for k, v in a.items()}
    b["m.q.lora_A.weight"].reshape(-1).view(np.uint8)[5] ^= 1
    assert hashing.update_hash(b) != h
    assert hashing.update_hash({k: v.astype(np.float64) for k, v in a.items()}) != h
    assert hashing.update_hash({k: v.reshape(-1) for k, v in a.items()}) != h
    assert hashing.update_hash({k + "x": v for k, v in a.items()}) != h
    with pytest.raises(TypeError):
        hashing.update_hash({"o": np.array([object()])})


def test_hash_accepts_flower_arrayrecord_and_torch():
    from flwr.app import Array, ArrayRecord

    a = _adapter()
    rec = ArrayRecord({k: Array(v) for k, v in a.items()})
    assert hashing.update_hash(rec) == hashing.update_hash(a)
    torch = pytest.importorskip("torch")
    assert hashing.update_hash({k: torch.from_numpy(v) for k, v in a.items()}) == hashing.update_hash(a)


def test_simulation_keys_are_deterministic_and_distinct():
    a0, a0b, a1 = signing.simulation_account(0), signing.simulation_account(0), signing.simulation_account(1)
    assert a0.address == a0b.address != a1.address
    assert signing.simulation_account(0, seed="other").address != a0.address


def test_sign_verify_and_audit_record(tmp_path):
    acct = signing.simulation_account(3)
    rec = signing.audit_record(_adapter(), 5, 2, acct)
    assert set(rec) == {"update-hash", "signature", "signer"} and rec["signer"] == acct.address
    assert rec["update-hash"] == hashing.update_hash(_adapter())
    assert signing.recover_signer(5, 2, rec["update-hash"], rec["signature"]) == acct.address
    assert signing.verify(5, 2, rec["update-hash"], rec["signature"], acct.address)
    assert not signing.verify(5, 3, rec["update-hash"], rec["signature"], acct.address)   # other round
    assert not signing.verify(6, 2, rec["update-hash"], rec["signature"], acct.address)   # other run
    assert not signing.verify(5, 2, "0x" + "00" * 32, rec["signature"], acct.address)     # other hash
    assert not signing.verify(5, 2, rec["update-hash"], "0x1234", acct.address)           # malformed
    # key files: raw hex and encrypted keystore
    (tmp_path / "k.hex").write_text(acct.key.hex())
    assert signing.account_from_keyfile(str(tmp_path / "k.hex")).address == acct.address
    from eth_account import Account

    (tmp_path / "k.json").write_text(json.dumps(Account.encrypt(acct.key, "pw", iterations=2)))
    assert signing.account_from_keyfile(str(tmp_path / "k.json"), "pw").address == acct.address


def test_golden_hash():
    """A fixed value: the format must not drift between versions or machines."""
    arrays = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.array([1, 2], dtype=np.int64)}
    assert hashing.update_hash(arrays) == "0x239d2f0dc7cce62bdb136438a9c9c9ce8ec1ce1e8305f3fb6b9553e7d5677038"


def test_header_matches_json_for_any_names():
    for names in (["a.b", "c_d-1"], ['q"uote', "back\\slash", "ünï", "tab\tname", "a" * 3]):
        arrays = {n: np.zeros((2, i + 1), np.float16) for i, n in enumerate(names)}
        items = hashing.canonical_arrays(arrays)
        ref = json.dumps([[n, "<f2", list(a.shape)] for n, a in items], separators=(",", ":"), ensure_ascii=True)
        assert hashing.header_bytes(items) == ref.encode()
