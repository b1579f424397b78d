#!/usr/bin/env python3
"""Check an audited fedledger run against its chain with the Python standard library only.

    python3 scripts/verify_run.py RUN_FOLDER [--rpc-url URL] [--registry-address ADDRESS] [--admin ADDRESS]

For someone who does not trust fedledger's code: JSON-RPC over urllib, SHA-256 from hashlib,
and keccak-256 and secp256k1 public-key recovery written out below. The run folder is only a
hint: the chain id is read from the node, the events from the registry's own deploy block
(``deployBlock()``), and ``run.json`` must hash to the run record the registry holds. It
re-hashes every stored file in the canonical format (README, "Audit it without fedledger") and
checks it against what the chain recorded, checks that every recorded signer was enrolled by
the registry's admin when it was recorded, recovers the signer of every EIP-712 signature on
chain, and lists every contest (a client's proof that a round left it out) as a failure.
Enrolment proves membership only as far as the registry's admin is honest: ``--admin`` names the
admin you trust (a registry administered by another fails); without it the admin is printed,
not checked. It
does NOT recompute aggregates (``fedledger audit`` does), nor compare the registry's code with
UpdateRegistry.sol (compile it and compare ``eth_getCode``, immutables masked).
Exit 0: every check passed; 1: a check failed; 2: bad input.
"""

import hashlib
import json
import os
import struct
import sys
import urllib.request

# ---------------------------------------------------------------- keccak-256 (Ethereum's, not SHA3-256)
def _rol(a, n):
    return ((a << n) | (a >> (64 - n))) & 0xFFFFFFFFFFFFFFFF if n else a


def _keccak_f(lanes):
    r = 1
    for _ in range(24):
        c = [lanes[x][0] ^ lanes[x][1] ^ lanes[x][2] ^ lanes[x][3] ^ lanes[x][4] for x in range(5)]
        d = [c[(x + 4) % 5] ^ _rol(c[(x + 1) % 5], 1) for x in range(5)]
        lanes = [[lanes[x][y] ^ d[x] for y in range(5)] for x in range(5)]
        x, y, cur = 1, 0, lanes[1][0]
        for t in range(24):
            x, y = y, (2 * x + 3 * y) % 5
            cur, lanes[x][y] = lanes[x][y], _rol(cur, ((t + 1) * (t + 2) // 2) % 64)
        for y in range(5):
            row = [lanes[x][y] for x in range(5)]
            for x in range(5):
                lanes[x][y] = row[x] ^ (~row[(x + 1) % 5] & row[(x + 2) % 5])
        for j in range(7):
            r = ((r << 1) ^ ((r >> 7) * 0x71)) % 256
            if r & 2:
                lanes[0][0] ^= 1 << ((1 << j) - 1)
    return lanes


def keccak256(data: bytes) -> bytes:
    rate = 136
    padded = bytearray(data) + b"\x01" + bytes(rate - 1 - len(data) % rate)
    padded[-1] |= 0x80
    lanes = [[0] * 5 for _ in range(5)]
    for off in range(0, len(padded), rate):
        block = padded[off:off + rate]
        for i in range(rate // 8):
            lanes[i % 5][i // 5] ^= int.from_bytes(block[8 * i:8 * i + 8], "little")
        lanes = _keccak_f(lanes)
    return b"".join(lanes[i][0].to_bytes(8, "little") for i in range(4))


# ---------------------------------------------------------------- secp256k1 public-key recovery
P = 2**256 - 2**32 - 977
N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
G = (0x79BE667EF9DCBBAC55A06295CE870B07029BFCDB2DCE28D959F2815B16F81798,
     0x483ADA7726A3C4655DA4FBFC0E1108A8FD17B448A68554199C47D08FFB10D4B8)


def _add(a, b):
    if a is None or b is None:
        return a or b
    if a[0] == b[0] and (a[1] + b[1]) % P == 0:
        return None
    lam = 3 * a[0] * a[0] * pow(2 * a[1], -1, P) if a == b else (b[1] - a[1]) * pow(b[0] - a[0], -1, P)
    x = (lam * lam - a[0] - b[0]) % P
    return x, (lam * (a[0] - x) - a[1]) % P


def _mul(k, point):
    out = None
    while k:
        if k & 1:
            out = _add(out, point)
        point, k = _add(point, point), k >> 1
    return out


def recover_address(digest: bytes, sig: bytes):
    """Lower-case address whose key made the 65-byte signature r || s || v of ``digest``; None if invalid."""
    if len(sig) != 65:
        return None
    r, s, v = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:64], "big"), sig[64] - 27 * (sig[64] >= 27)
    if not (0 < r < N and 0 < s < N and v in (0, 1)):
        return None
    y = pow((r ** 3 + 7) % P, (P + 1) // 4, P)
    if (y * y - r ** 3 - 7) % P:
        return None
    y = y if y % 2 == v else P - y
    z, rinv = int.from_bytes(digest, "big"), pow(r, -1, N)
    q = _add(_mul(s * rinv % N, (r, y)), _mul(-z * rinv % N, G))
    return None if q is None else "0x" + keccak256(q[0].to_bytes(32, "big") + q[1].to_bytes(32, "big"))[12:].hex()


def _word(value: int) -> bytes:
    return int(value).to_bytes(32, "big")


DOMAIN_TYPEHASH = keccak256(b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")
UPDATE_TYPEHASH = keccak256(b"Update(uint256 runId,uint256 round,bytes32 globalHash,bytes32 updateHash,uint64 numExamples)")


def signer_of_update(chain_id: int, registry: str, run_id: int, rnd: int, global_hash: bytes, update_hash: bytes,
                     num_examples: int, sig: bytes):
    """The client that signed this EIP-712 commitment (lower-case address), or None."""
    domain = keccak256(DOMAIN_TYPEHASH + keccak256(b"fedledger") + keccak256(b"2") + _word(chain_id)
                       + bytes(12) + bytes.fromhex(registry[2:]))
    struct_hash = keccak256(UPDATE_TYPEHASH + _word(run_id) + _word(rnd) + global_hash + update_hash
                            + _word(num_examples))
    return recover_address(keccak256(b"\x19\x01" + domain + struct_hash), sig)


# ---------------------------------------------------------------- the canonical hash of a safetensors file
DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "U64": "<u8", "I32": "<i4", "U32": "<u4",
          "I16": "<i2", "U16": "<u2", "I8": "|i1", "U8": "|u1", "BOOL": "|b1", "C64": "<c8"}


def canonical_hash(path: str) -> bytes:
    """SHA-256 in the fedledger.adapter.v1 format of the tensors a safetensors file holds."""
    with open(path, "rb") as fh:
        blob = fh.read()
    (n,) = struct.unpack("<Q", blob[:8])
    tensors = {k: v for k, v in json.loads(blob[8:8 + n]).items() if k != "__metadata__"}
    names = sorted(tensors)
    header = json.dumps([[k, DTYPES[tensors[k]["dtype"]], tensors[k]["shape"]] for k in names],
                        separators=(",", ":"), ensure_ascii=True).encode("ascii")
    h = hashlib.sha256(b"fedledger.adapter.v1\n" + struct.pack("<Q", len(header)) + header)
    for k in names:
        start, end = tensors[k]["data_offsets"]
        h.update(blob[8 + n + start:8 + n + end])
    return h.digest()


def file_hash(path: str):
    """``canonical_hash`` of the file, or None when it is missing or no longer parses."""
    try:
        return canonical_hash(path)
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


# ---------------------------------------------------------------- the chain
def rpc(url: str, method: str, params: list):
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        answer = json.loads(resp.read())
    if "error" in answer:
        raise RuntimeError(f"{method}: {answer['error']}")
    return answer["result"]


EVENTS = {keccak256(s.encode()).hex(): s.split("(")[0] for s in (
    "Enrolled(address)", "Revoked(address)", "RunOpened(uint256,bytes32,bytes32)",
    "RoundOpened(uint256,uint256,bytes32)",
    "UpdateRecorded(uint256,uint256,address,uint256,bytes32,uint64,bytes)",
    "AggregateCommitted(uint256,uint256,bytes32,uint256,bytes32,bytes32)",
    "Contested(uint256,uint256,address,bytes32,bytes32,uint64,bytes,address)")}


def view(url: str, registry: str, signature: str) -> bytes:
    """The 32-byte answer of a no-argument view function of the registry."""
    answer = rpc(url, "eth_call", [{"to": registry, "data": "0x" + keccak256(signature.encode())[:4].hex()}, "latest"])
    return bytes.fromhex(answer[2:])[:32]


def _bytes_at(data: bytes, word_index: int) -> bytes:
    """A dynamic ``bytes`` argument whose offset is the ``word_index``-th data word."""
    off = int.from_bytes(data[32 * word_index:32 * word_index + 32], "big")
    return data[off + 32:off + 32 + int.from_bytes(data[off:off + 32], "big")]


def registry_events(url: str, registry: str, run_id: int, from_block: int) -> dict:
    """{"run": (run hash, initial global) | None, "enrolment": [(block, log index, signer, enrolled)],
    "rounds": round -> {"global", "records": [(client, hash, n, sig, block, log index)], "commit", "contests"}}."""
    logs = rpc(url, "eth_getLogs", [{"address": registry, "fromBlock": hex(from_block), "toBlock": "latest",
                                     "topics": [["0x" + t for t in EVENTS]]}])
    out = {"run": None, "enrolment": [], "rounds": {}}
    for log in sorted(logs, key=lambda e: (int(e["blockNumber"], 16), int(e["logIndex"], 16))):
        kind, topics = EVENTS.get(log["topics"][0][2:]), log["topics"]
        data, at = bytes.fromhex(log["data"][2:]), (int(log["blockNumber"], 16), int(log["logIndex"], 16))
        word = [data[i:i + 32] for i in range(0, len(data), 32)]
        if kind in ("Enrolled", "Revoked"):
            out["enrolment"].append((*at, "0x" + topics[1][-40:].lower(), kind == "Enrolled"))
            continue
        if int(topics[1], 16) != run_id:
            continue
        if kind == "RunOpened":
            out["run"] = (word[0], word[1], at)
            continue
        r = out["rounds"].setdefault(int(topics[2], 16), {"global": None, "records": [], "commit": None,
                                                           "contests": []})
        if kind == "RoundOpened":
            r["global"] = word[0]
        elif kind == "UpdateRecorded":
            r["records"].append(("0x" + topics[3][-40:].lower(), word[1], int.from_bytes(word[2], "big"),
                                 _bytes_at(data, 3), *at))
        elif kind == "AggregateCommitted":
            r["commit"] = (word[0], int.from_bytes(word[1], "big"), word[2], word[3])
        elif kind == "Contested":
            r["contests"].append(("0x" + topics[3][-40:].lower(), word[0], word[1], int.from_bytes(word[2], "big"),
                                  _bytes_at(data, 3)))
    return out


def enrolled_at(enrolment: list, block: int, log_index: int) -> set:
    """The signers enrolled just before the event at (block, log index)."""
    now = set()
    for b, i, signer, enrolled in enrolment:
        if (b, i) >= (block, log_index):
            break
        (now.add if enrolled else now.discard)(signer)
    return now


def records_digest(records) -> bytes:
    digest = bytes(32)
    for client, h, n, *_ in records:
        digest = keccak256(digest + bytes(12) + bytes.fromhex(client[2:]) + h + n.to_bytes(32, "big"))
    return digest


# ---------------------------------------------------------------- the checks
def verify(folder: str, rpc_url=None, registry_address=None, trusted_admin=None) -> list:
    """(round, subject, ok, detail) for every check."""
    audit = folder if os.path.basename(os.path.normpath(folder)) == "audit" else os.path.join(folder, "audit")
    with open(os.path.join(audit, "run.json"), "rb") as fh:
        run_bytes = fh.read()
    run = json.loads(run_bytes)
    url, registry = rpc_url or run.get("rpc-url"), (registry_address or run["registry-address"]).lower()
    if not url:
        raise RuntimeError("run.json names no RPC URL (an eth-tester run: its chain ended with it); pass --rpc-url")
    chain_id, run_id, out = int(rpc(url, "eth_chainId", []), 16), int(run["run-id"]), []
    if rpc(url, "eth_getCode", [registry, "latest"]) in ("0x", "0x0"):
        raise RuntimeError(f"no contract at {registry} on chain {chain_id}; pass --registry-address")
    admin, aggregator = ("0x" + view(url, registry, f"{name}()")[12:].hex() for name in ("admin", "aggregator"))
    chain = registry_events(url, registry, run_id, int.from_bytes(view(url, registry, "deployBlock()"), "big"))
    check = lambda rnd, subject, ok, detail: out.append((rnd, subject, bool(ok), detail))  # noqa: E731
    print(f"registry {registry} on chain {chain_id}: admin {admin}, aggregator {aggregator}"
          + ("" if trusted_admin else " (admin not checked: pass --admin ADDRESS to require the one you trust)"))
    if trusted_admin:
        check(0, "admin", admin == trusted_admin.lower(), f"the registry's admin is the one you trust ({trusted_admin})")
    if chain["run"] is None:
        check(0, "run.json", False, "the registry has no run record (RunOpened) of this run")
        return out
    run_hash, _, opened_at = chain["run"]
    check(0, "run.json", hashlib.sha256(run_bytes).digest() == run_hash, "sha256 is the run hash recorded at openRun")
    at_open = enrolled_at(chain["enrolment"], *opened_at)
    for key, actual in (("chain-id", chain_id), ("registry-address", registry), ("admin", admin),
                        ("aggregator", aggregator), ("enrolled", sorted(at_open))):
        claimed = run.get(key)
        claimed = sorted(a.lower() for a in claimed) if key == "enrolled" else (
            claimed.lower() if isinstance(claimed, str) else claimed)
        check(0, "run.json", claimed == actual, f"its {key} is the chain's")
    stored = {int(d[6:]) for d in os.listdir(audit) if d.startswith("round-")}
    for rnd in sorted(set(chain["rounds"]) | stored):
        rdir, r = os.path.join(audit, f"round-{rnd:04d}"), chain["rounds"].get(rnd)
        if r is None or r["commit"] is None:
            check(rnd, "round", False, "stored but not on chain" if r is None else "opened on chain, never committed")
            continue
        agg, n, digest, doc_hash = r["commit"]
        for client, h, k, sig, block, index in r["records"]:
            same = file_hash(os.path.join(rdir, "updates", client + ".safetensors")) == h
            check(rnd, client, same, "update hash matches" if same else "stored update differs from the chain or is gone")
            check(rnd, client, client in enrolled_at(chain["enrolment"], block, index),
                  "enrolled by the admin when recorded")
            signed = signer_of_update(chain_id, registry, run_id, rnd, r["global"], h, k, sig) == client
            check(rnd, client, signed, "EIP-712 signature recovers to the client" if signed else
                  "signature is not the client's over (chain, registry, run, round, global, hash, count)")
        for client, g, h, k, sig in r["contests"]:
            proven = signer_of_update(chain_id, registry, run_id, rnd, g, h, k, sig) == client
            check(rnd, client, False, f"DROPPED: contested on chain ({'signature verified' if proven else 'BAD signature'})"
                                      f", update 0x{h.hex()[:12]}... is not in the committed round")
        check(rnd, "records", n == len(r["records"]) and digest == records_digest(r["records"]),
              "committed count and records digest match the events")
        try:
            with open(os.path.join(rdir, "round.json"), "rb") as fh:
                doc_bytes = fh.read()
        except OSError:
            check(rnd, "round.json", False, "missing")
            continue
        if hashlib.sha256(doc_bytes).digest() != doc_hash:
            check(rnd, "round.json", False, "sha256 is not the committed document hash")
            continue
        check(rnd, "round.json", True, "sha256 is the committed document hash")
        doc = json.loads(doc_bytes)
        check(rnd, "run.json", "0x" + hashlib.sha256(run_bytes).hexdigest() == doc["run-hash"], "round.json's run-hash")
        listed = [(u["client"].lower(), u["update-hash"], u["num-examples"]) for u in doc["updates"] if u["client"]]
        check(rnd, "round.json", listed == [("0x" + c[2:], "0x" + h.hex(), k) for c, h, k, *_ in r["records"]],
              "lists the records on chain (clients, hashes, num-examples, order)")
        for u in (u for u in doc["updates"] if not u["client"]):
            key = f"partition-{u['partition']}" if u["partition"] is not None else f"node-{u['node-id']}"
            got = file_hash(os.path.join(rdir, "updates", key + ".safetensors"))
            check(rnd, key, got is not None and "0x" + got.hex() == u["update-hash"],
                  "UNSIGNED: bytes match round.json (nobody signed them)")
        got = file_hash(os.path.join(rdir, "global.safetensors"))
        check(rnd, "global", got is not None and "0x" + got.hex() == doc["global-hash"] and got == r["global"],
              "matches round.json's global-hash and the global the chain opened the round with")
        if agg != bytes(32):
            check(rnd, "aggregate", file_hash(os.path.join(rdir, "aggregate.safetensors")) == agg,
                  "hash matches the chain")
    return out


def main(argv) -> int:
    args, hints = list(argv), {}
    for flag in ("--rpc-url", "--registry-address", "--admin"):
        if flag in args:
            i = args.index(flag)
            if i + 1 >= len(args):
                print(f"verify_run: error: {flag} needs a value", file=sys.stderr)
                return 2
            hints[flag] = args.pop(i + 1)
            args.pop(i)
    if len(args) != 1:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    try:
        checks = verify(args[0], hints.get("--rpc-url"), hints.get("--registry-address"), hints.get("--admin"))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        print(f"verify_run: error: {exc}", file=sys.stderr)
        return 2
    for rnd, subject, ok, detail in checks:
        print(f"{rnd:>5}  {subject:<42}  {'OK' if ok else 'FAILED':<6}  {detail}")
    failed = sum(not check[2] for check in checks)
    print(f"verify_run: {len(checks) - failed} checks passed, {failed} failed; aggregates not recomputed "
          f"(fedledger audit does that)")
    return 1 if failed or not checks else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
