#!/usr/bin/env python3
"""Check an audited fedledger run against its chain with the Python standard library only.

    python3 scripts/verify_run.py RUN_FOLDER [--rpc-url URL]

For someone who does not trust fedledger's code: JSON-RPC over urllib, SHA-256 from hashlib,
and keccak-256 and secp256k1 public-key recovery written out below. It re-hashes every stored
file in the canonical format (README, "Audit it without fedledger") and checks it against what
the chain recorded, and recovers the signer of every signature on chain. It does NOT recompute
aggregates (``fedledger audit`` does). Exit 0: every check passed; 1: a check failed; 2: bad input.
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


def signer_of_update(run_id: int, rnd: int, update_hash: bytes, sig: bytes):
    digest = keccak256(b"fedledger.update.v1" + struct.pack(">QQ", run_id, rnd) + update_hash)
    return recover_address(keccak256(b"\x19Ethereum Signed Message:\n32" + digest), sig)


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
    "RoundOpened(uint256,uint256)", "UpdateRecorded(uint256,uint256,address,uint256,bytes32,uint64,bytes)",
    "AggregateCommitted(uint256,uint256,bytes32,uint256,bytes32,bytes32)")}


def run_events(url: str, registry: str, run_id: int, from_block: int) -> dict:
    """round -> {"records": [(client, hash, num_examples, signature)], "commit": (agg, n, digest, doc) | None}."""
    logs = rpc(url, "eth_getLogs", [{"address": registry, "fromBlock": hex(from_block), "toBlock": "latest",
                                     "topics": [["0x" + t for t in EVENTS], "0x%064x" % run_id]}])
    rounds = {}
    for log in sorted(logs, key=lambda e: (int(e["blockNumber"], 16), int(e["logIndex"], 16))):
        kind, rnd = EVENTS.get(log["topics"][0][2:]), int(log["topics"][2], 16)
        data, r = bytes.fromhex(log["data"][2:]), rounds.setdefault(rnd, {"records": [], "commit": None})
        word = [data[i:i + 32] for i in range(0, len(data), 32)]
        if kind == "UpdateRecorded":
            off = int.from_bytes(word[3], "big")
            sig = data[off + 32:off + 32 + int.from_bytes(data[off:off + 32], "big")]
            r["records"].append(("0x" + log["topics"][3][-40:].lower(), word[1], int.from_bytes(word[2], "big"), sig))
        elif kind == "AggregateCommitted":
            r["commit"] = (word[0], int.from_bytes(word[1], "big"), word[2], word[3])
    return rounds


def records_digest(records) -> bytes:
    digest = bytes(32)
    for client, h, n, _ in records:
        digest = keccak256(digest + bytes(12) + bytes.fromhex(client[2:]) + h + n.to_bytes(32, "big"))
    return digest


# ---------------------------------------------------------------- the checks
def verify(folder: str, rpc_url=None) -> list:
    """(round, subject, ok, detail) for every check."""
    audit = folder if os.path.basename(os.path.normpath(folder)) == "audit" else os.path.join(folder, "audit")
    with open(os.path.join(audit, "run.json"), "rb") as fh:
        run_bytes = fh.read()
    run, url = json.loads(run_bytes), rpc_url or json.loads(run_bytes).get("rpc-url")
    if not url:
        raise RuntimeError("run.json names no RPC URL (an eth-tester run: its chain ended with it); pass --rpc-url")
    chain_id = int(rpc(url, "eth_chainId", []), 16)
    if chain_id != run["chain-id"]:
        raise RuntimeError(f"the node at {url} is chain {chain_id}, run.json says {run['chain-id']}")
    run_id, out = int(run["run-id"]), []
    rounds = run_events(url, run["registry-address"], run_id, int(run.get("deploy-block", 0)))
    stored = {int(d[6:]) for d in os.listdir(audit) if d.startswith("round-")}
    for rnd in sorted(set(rounds) | stored):
        rdir, chain = os.path.join(audit, f"round-{rnd:04d}"), rounds.get(rnd)
        check = lambda subject, ok, detail: out.append((rnd, subject, bool(ok), detail))  # noqa: E731
        if chain is None or chain["commit"] is None:
            check("round", False, "stored but not on chain" if chain is None else "opened on chain, never committed")
            continue
        agg, n, digest, doc_hash = chain["commit"]
        for client, h, _, sig in chain["records"]:
            same = file_hash(os.path.join(rdir, "updates", client + ".safetensors")) == h
            check(client, same, "update hash matches" if same else "stored update differs from the chain or is gone")
            signed = signer_of_update(run_id, rnd, h, sig) == client
            check(client, signed, "signature recovers to the client" if signed else "signature is not the client's")
        check("records", n == len(chain["records"]) and digest == records_digest(chain["records"]),
              "committed count and records digest match the events")
        try:
            with open(os.path.join(rdir, "round.json"), "rb") as fh:
                doc_bytes = fh.read()
        except OSError:
            check("round.json", False, "missing")
            continue
        check("round.json", hashlib.sha256(doc_bytes).digest() == doc_hash, "sha256 is the committed document hash")
        doc = json.loads(doc_bytes)
        check("run.json", "0x" + hashlib.sha256(run_bytes).hexdigest() == doc["run-hash"], "round.json's run-hash")
        listed = [(u["client"].lower(), u["update-hash"], u["num-examples"]) for u in doc["updates"] if u["client"]]
        check("round.json", listed == [(c, "0x" + h.hex(), k) for c, h, k, _ in chain["records"]],
              "lists the records on chain (clients, hashes, num-examples, order)")
        for u in (u for u in doc["updates"] if not u["client"]):
            key = f"partition-{u['partition']}" if u["partition"] is not None else f"node-{u['node-id']}"
            got = file_hash(os.path.join(rdir, "updates", key + ".safetensors"))
            check(key, got is not None and "0x" + got.hex() == u["update-hash"],
                  "UNSIGNED: bytes match round.json (nobody signed them)")
        got = file_hash(os.path.join(rdir, "global.safetensors"))
        check("global", got is not None and "0x" + got.hex() == doc["global-hash"], "matches round.json's global-hash")
        if agg != bytes(32):
            check("aggregate", file_hash(os.path.join(rdir, "aggregate.safetensors")) == agg, "hash matches the chain")
    return out


def main(argv) -> int:
    args = list(argv)
    url = args.pop(args.index("--rpc-url") + 1) if "--rpc-url" in args else None
    args = [a for a in args if a != "--rpc-url"]
    if len(args) != 1:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    try:
        checks = verify(args[0], url)
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
