"""scripts/verify_run.py, the standard-library verifier: its keccak-256, secp256k1 recovery and
canonical hash agree with the libraries fedledger uses, and on a real anvil it passes an honest
run and catches an aggregator that forges a signature, edits a round document, drops a stored
file, or keeps an unsigned update's bytes but changes them, and a registry administered by
someone other than the admin the verifier trusts. (A real `flwr run` of a third-party
app is checked in tests/test_flowerapp.py.)"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from fedledger.chain import ArtifactStore, OnChainAudit, build_ledger, signing
from fedledger.chain.hashing import update_hash

from .test_chain_anvil import anvil, needs_anvil  # noqa: F401  (fixture)
from .test_chain_audit import Federation, flip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "verify_run.py")
_spec = importlib.util.spec_from_file_location("verify_run", SCRIPT)
verify_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(verify_run)


def run_script(*args) -> tuple[int, str]:
    """The script in an interpreter that can import the standard library only (-I -S)."""
    done = subprocess.run([sys.executable, "-I", "-S", SCRIPT, *args], capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


def failed(out: str) -> list[tuple[str, str]]:
    return [(line.split()[0], line.split()[1]) for line in out.splitlines() if "  FAILED  " in line]


# ---------------------------------------------------------------------------- the primitives
@pytest.mark.parametrize("length", [0, 1, 31, 32, 135, 136, 137, 272, 1000])
def test_keccak256_is_ethereums(length):
    from eth_utils import keccak

    data = np.random.default_rng(length).bytes(length)
    assert verify_run.keccak256(data) == keccak(data)


def test_eip712_recovery_matches_eth_account():
    registry = "0x" + "5f" * 20
    for i, (run_id, rnd) in enumerate([(1, 1), (2**64 - 1, 7), (12345678901234567890, 2**32)]):
        account = signing.simulation_account(i)
        commitment = signing.Commitment(31337 + i, registry, run_id, rnd, "0x" + f"{i:064x}", "0x" + "00" * 32, 10 + i)
        record = signing.audit_record({"w": np.arange(4, dtype=np.float32) + i}, commitment, account)
        h, sig, g = (bytes.fromhex(record[k][2:]) for k in ("update-hash", "signature", "global-hash"))
        args = [31337 + i, registry, run_id, rnd, g, h, 10 + i]
        assert verify_run.signer_of_update(*args, sig) == account.address.lower()
        for at, other in ((0, 1), (1, "0x" + "12" * 20), (3, rnd + 1), (4, b"\xee" * 32), (6, 10**9)):
            changed = list(args)
            changed[at] = other
            assert verify_run.signer_of_update(*changed, sig) != account.address.lower(), at
        assert verify_run.recover_address(bytes(32), sig[:64]) is None


def test_the_dtype_table_is_safetensors_and_the_hash_is_fedledgers(tmp_path):
    import safetensors.numpy

    assert verify_run.DTYPES == {name: np.dtype(t).str for name, t in safetensors.numpy._TYPES.items()}
    rng = np.random.default_rng(0)
    arrays = {f"t.{name}-ü": (rng.standard_normal((2, 3)) * 4).astype(t)
              for name, t in safetensors.numpy._TYPES.items()}
    arrays.update({"scalar": np.float32(1.5), "empty": np.zeros((0, 2), np.float16)})
    path = ArtifactStore(str(tmp_path)).save_arrays(str(tmp_path / "x.safetensors"), arrays)
    assert "0x" + verify_run.canonical_hash(path).hex() == update_hash(arrays)


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    rc, out = run_script(str(tmp_path))
    assert rc == 2 and out.startswith("verify_run: error:") and out.count("\n") == 1


# ---------------------------------------------------------------------------- on a real chain
def audited_run(url: str, folder, fed: Federation, tamper=None, **kw) -> OnChainAudit:
    from flwr.serverapp.strategy import FedAvg

    pipeline = OnChainAudit(FedAvg(), build_ledger("anvil", url), ArtifactStore(str(folder)), fed.run_id, **kw)
    fed.drive(pipeline, tamper=tamper)
    return pipeline


@needs_anvil
def test_an_honest_run_passes_and_each_tampering_is_named(anvil, tmp_path):  # noqa: F811
    fed = Federation(run_id=71)
    unsigned = lambda rnd, i, arrays, audit: (arrays, None if i == 2 else audit)  # noqa: E731
    pipeline = audited_run(anvil["url"], tmp_path, fed, tamper=unsigned, require_audit_record=False)
    rc, out = run_script(str(tmp_path))
    assert rc == 0 and failed(out) == [], out
    assert out.count("EIP-712 signature recovers to the client") == 4 and out.count("UNSIGNED: bytes match") == 2
    assert out.count("enrolled by the admin when recorded") == 4 and "sha256 is the run hash recorded" in out
    admin = pipeline.trail.ledger.admin_address()
    assert f"admin {admin.lower()}" in out and "admin not checked: pass --admin" in out
    assert run_script(str(tmp_path), "--admin", admin)[0] == 0
    rc, out = run_script(str(tmp_path), "--admin", fed.address(0))      # an admin you do not trust
    assert rc == 1 and failed(out) == [("0", "admin")], out
    store = pipeline.trail.store

    flip(store.update_path(1, f"node-{fed.nodes[2]}"), -1)                      # an unsigned update's bytes
    flip(store.aggregate_path(2), -2)                                           # an aggregate
    os.remove(store.update_path(2, fed.address(0)))                             # a signed update, gone
    rc, out = run_script(str(tmp_path))
    assert rc == 1 and sorted(failed(out)) == sorted([("1", f"node-{fed.nodes[2]}"), ("2", fed.address(0).lower()),
                                                      ("2", "aggregate")]), out


@needs_anvil
def test_a_forged_signature_and_an_edited_round_document_are_caught(anvil, tmp_path, monkeypatch):  # noqa: F811
    fed = Federation(run_id=72)
    forger = signing.simulation_account(9)
    from fedledger.chain.ledger import Ledger

    real = Ledger.record_updates

    def forge(self, run_id, rnd, entries):   # the aggregator records client 1's update under its own signature
        entries = [replace(e, signature=signing.sign(forger, fed.commitment(rnd, e.update_hash, e.num_examples)))
                   if e.client == fed.address(1) else e for e in entries]
        return real(self, run_id, rnd, entries)

    monkeypatch.setattr(Ledger, "record_updates", forge)
    pipeline = audited_run(anvil["url"], tmp_path, fed)
    path = pipeline.trail.store.round_path(1)
    with open(path) as fh:
        body = fh.read()
    with open(path, "w") as fh:
        fh.write(body.replace('"num-examples":10', '"num-examples":11', 1))
    rc, out = run_script(str(tmp_path))
    assert rc == 1, out
    assert sorted(set(failed(out))) == sorted({("1", fed.address(1).lower()), ("2", fed.address(1).lower()),
                                               ("1", "round.json")}), out
