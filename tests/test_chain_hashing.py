"""Canonical adapter hash and client signatures."""

from __future__ import annotations

import hashlib
import json
import os
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


def test_simulation_keys_derive_from_a_random_federation_secret_created_once(tmp_path):
    from eth_utils import keccak

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    a0, a0b, a1 = (signing.simulation_account(p, a) for p in (0, 0, 1))
    assert a0.address == a0b.address != a1.address
    assert signing.simulation_account(0, b).address != a0.address          # another federation, other keys
    secret = tmp_path / "a" / signing.SECRET_FILE
    assert oct(secret.stat().st_mode & 0o777) == "0o600" and len(bytes.fromhex(secret.read_text())) == 32
    assert a0.key != keccak(b"fedledger-sim/0")                              # not the old public seed
    secret.write_text("not a secret\n")
    with pytest.raises(signing.KeyFileError, match="is not a federation secret .* delete it") as info:
        signing.simulation_account(0, a)
    assert "\n" not in str(info.value)


def test_processes_that_race_to_create_the_secret_all_get_the_first_one(tmp_path):
    import multiprocessing

    folder = str(tmp_path / "race")
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        addresses = pool.starmap(_address_of_partition_0, [(folder,)] * 8)
    assert len(set(addresses)) == 1 and addresses[0] == signing.simulation_account(0, folder).address
    assert os.listdir(folder) == [signing.SECRET_FILE]                       # no temporary file left behind


def _address_of_partition_0(folder: str) -> str:
    return signing.simulation_account(0, folder).address


def test_the_typed_commitment_is_eip712_and_covers_every_field(tmp_path):
    from dataclasses import replace

    from eth_account.messages import _hash_eip191_message, encode_typed_data

    acct = signing.simulation_account(3)
    c = signing.Commitment(31337, "0x" + "5f" * 20, 5, 2, "0x" + "aa" * 32, hashing.update_hash(_adapter()), 17)
    assert encode_typed_data(full_message=c.typed_data()) == c.signable()
    assert _hash_eip191_message(c.signable()) == c.digest()
    rec = signing.audit_record(_adapter(), replace(c, update_hash="0x" + "00" * 32), acct)
    assert set(rec) == {"update-hash", "global-hash", "num-examples", "signature", "signer"}
    assert rec["update-hash"] == c.update_hash and rec["num-examples"] == 17 and rec["signer"] == acct.address
    assert signing.recover(c, rec["signature"]) == acct.address and signing.verify(c, rec["signature"], acct.address)
    for field, value in (("chain_id", 1), ("registry", "0x" + "12" * 20), ("run_id", 6), ("round", 3),
                         ("global_hash", "0x" + "ab" * 32), ("update_hash", "0x" + "00" * 32), ("num_examples", 10**9)):
        assert not signing.verify(replace(c, **{field: value}), rec["signature"], acct.address), field
    assert not signing.verify(c, "0x1234", acct.address)                      # malformed
    with pytest.raises(ValueError, match="malformed signature"):
        signing.recover(c, "0x1234")
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


def test_layout_hasher_of_decoded_replies_gives_the_canonical_hash():
    """The server hashes replies straight from the received bytes (views decoded against the
    round's layout, header hashed once per layout): the same hash as update_hash."""
    from flwr.app import Array

    from fedledger.core import Layout
    from fedledger.core.update import decode_arrayrecord, decode_global

    from .replies import record

    a = {**_adapter(), "empty": np.zeros((0, 3), np.float32), "half": np.arange(6, dtype=np.float16).reshape(2, 3)}
    rec = record(a)
    rec["scalar"] = Array(np.asarray(np.float32(2.5)))  # a 0-d tensor
    views = decode_arrayrecord(rec, Layout.of(decode_global(rec)))
    assert views["scalar"].shape == ()
    hasher = hashing.LayoutHasher(Layout.of(views).specs)
    assert hasher.hexdigest(views) == hashing.update_hash(views) == hashing.update_hash(
        {**a, "scalar": np.asarray(np.float32(2.5))})
    with pytest.raises(ValueError, match="little-endian"):
        hashing.LayoutHasher({"x": ((2,), ">f4")})
