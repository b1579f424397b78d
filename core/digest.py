"""One digest over a sequence of messages' arrays: Split-FedLLM's record of a round's activations.

A split client sends activations (+ attention mask + labels) at every local step. They are too
big to keep and, since activations can be inverted, should not be kept; what goes on the
record instead is a hash chain over them, in the order they were sent:

    d_0 = 32 zero bytes;   d_s = SHA-256(d_{s-1} || for each array, by name:
                                         name, 0x00, dtype.str, 0x00, shape, 0x00, C-order bytes)

The client signs ``d_S`` with its round-end adapter; the server computes the same chain over
what it received and refuses an adapter whose signed digest differs. (flwr-free; numpy + hashlib.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

GENESIS = "00" * 32


def chain_digest(previous: str, arrays: Mapping[str, np.ndarray]) -> str:
    """The next link of the chain: ``previous`` (64 hex digits) extended by ``arrays``."""
    h = hashlib.sha256(bytes.fromhex(previous))
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        h.update(name.encode() + b"\0" + a.dtype.str.encode() + b"\0" + repr(tuple(a.shape)).encode() + b"\0")
        h.update(memoryview(a).cast("B") if a.size else b"")
    return h.hexdigest()


def digest_array(hex_digest: str) -> np.ndarray:
    """A digest as the 32-byte uint8 array that travels (and is signed) with the adapter."""
    return np.frombuffer(bytes.fromhex(hex_digest), dtype=np.uint8).copy()


def digest_hex(array: np.ndarray) -> str:
    return bytes(np.asarray(array, dtype=np.uint8)).hex()


__all__ = ["GENESIS", "chain_digest", "digest_array", "digest_hex"]
