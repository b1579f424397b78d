"""Canonical SHA-256 of a LoRA adapter (a mapping of tensor name -> array).

Format ``fedledger.adapter.v1`` (what is fed to SHA-256, in this order):

1. the 21 ASCII bytes ``b"fedledger.adapter.v1\\n"``;
2. the header length as an unsigned 64-bit little-endian integer;
3. the header: UTF-8 JSON, no whitespace (``separators=(",", ":")``, ``ensure_ascii=True``), a
   list with one ``[name, dtype, shape]`` entry per tensor, tensors sorted by name (Python string
   order = Unicode code points). ``dtype`` is numpy's little-endian ``dtype.str``
   (``"<f4"``, ``"<f2"``, ``"|u1"``...), ``shape`` a list of ints;
4. every tensor's raw bytes, in the header's order: C order, little-endian, no padding.

So equal tensors (same names, dtypes, shapes, values) give the same hash on any machine; a
different dtype or shape with the same bytes gives a different hash. ``-0.0`` and ``0.0`` or two
NaN payloads differ (bytes are hashed, not values). Object arrays are refused.

The data are streamed: one ``hashlib`` update per tensor over a zero-copy view, no concatenation.
The magic line, length and header depend only on the names, dtypes and shapes, so they are hashed
once per layout: :class:`LayoutHasher` keeps the SHA-256 state after them and copies it per
adapter. A server hashing replies decoded against the round's layout (``core.update``: views of
the received bytes with exactly the layout's dtypes, shapes and C order) pays one dict lookup and
one ``hashlib`` update per tensor (``bench/bench_hashing.py`` measures it against plain
``hashlib.sha256`` on the same bytes pre-concatenated).
Accepted input: anything with ``.items()`` giving numpy-convertible values (numpy arrays, a Flower
``ArrayRecord``/``Array`` via ``.numpy()``, CPU torch tensors).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from typing import Any, Mapping

import numpy as np

MAGIC = b"fedledger.adapter.v1\n"
HASH_FORMAT = "fedledger.adapter.v1"
_LITTLE = np.little_endian
_CANONICAL_ORDERS = "<|=" if _LITTLE else "<|"


def _as_array(value: Any) -> np.ndarray:
    if type(value) is np.ndarray and value.flags.c_contiguous and value.dtype.byteorder in _CANONICAL_ORDERS \
            and not value.dtype.hasobject:
        return value  # fast path: already canonical
    if isinstance(value, np.ndarray):
        arr = value
    elif hasattr(value, "numpy") and callable(value.numpy):  # flwr Array, torch tensor
        t = value
        if hasattr(t, "detach"):
            t = t.detach().cpu()
        arr = np.asarray(t.numpy())
    else:
        arr = np.asarray(value)
    if arr.dtype.hasobject:
        raise TypeError("cannot hash an object array")
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and not _LITTLE):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return np.ascontiguousarray(arr)




def canonical_arrays(arrays: Mapping[str, Any]) -> list[tuple[str, np.ndarray]]:
    """Sorted ``(name, contiguous little-endian array)`` pairs, as hashed."""
    converted = {}
    for k, v in arrays.items():
        name = str(k)
        if name in converted:
            raise ValueError(f"duplicate tensor name {name!r}")
        converted[name] = _as_array(v)
    return [(name, converted[name]) for name in sorted(converted)]


def header_bytes(items: list[tuple[str, np.ndarray]]) -> bytes:
    """The JSON header of canonical ``(name, array)`` pairs (as :func:`canonical_arrays` gives them)."""
    return _header_of([(name, arr.dtype, arr.shape) for name, arr in items])


_PLAIN = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]*")  # printable ASCII except '"' and '\\': no JSON escaping
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)


class LayoutHasher:
    """The canonical hash of adapters that share one layout (names, dtypes, shapes).

    The prefix (magic line, header length, header) is hashed once; :meth:`digest` copies that
    SHA-256 state and feeds it each tensor's buffer in name order. ``digest`` trusts the arrays
    to have exactly the layout's dtypes and shapes, C-contiguous: that is what
    ``fedledger.core.update`` decodes a reply to (``Update.layout``). Anything else goes through
    :func:`update_hash`, which converts and checks every value.
    """

    def __init__(self, specs: Mapping[str, tuple[tuple[int, ...], Any]]):
        items = []
        for name in sorted(str(k) for k in specs):
            shape, dtype = specs[name]
            dtype = np.dtype(dtype)
            if dtype.hasobject:
                raise TypeError("cannot hash an object array")
            if dtype.byteorder not in _CANONICAL_ORDERS:
                raise ValueError(f"{name}: dtype {dtype.str} is not little-endian; hash it with update_hash")
            items.append((name, dtype, tuple(int(d) for d in shape)))
        self.names = [n for n, _, _ in items]
        self.sized = [n for n, _, shape in items if _size(shape)]  # empty tensors add no bytes
        header = _header_of([(n, d, shape) for n, d, shape in items])
        self._prefix = hashlib.sha256()
        self._prefix.update(MAGIC)
        self._prefix.update(struct.pack("<Q", len(header)))
        self._prefix.update(header)

    def digest(self, arrays: Mapping[str, np.ndarray]) -> bytes:
        """32-byte digest of ``arrays`` (views of this layout; see the class docstring)."""
        h = self._prefix.copy()
        update = h.update
        for name in self.sized:
            update(arrays[name])  # zero-copy: hashlib reads the C-contiguous buffer
        return h.digest()

    def hexdigest(self, arrays: Mapping[str, np.ndarray]) -> str:
        """``"0x"`` + 64 hex digits, as :func:`update_hash` gives for the same arrays."""
        return "0x" + self.digest(arrays).hex()


def _size(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _header_of(items: list[tuple[str, np.dtype, tuple[int, ...]]]) -> bytes:
    """The JSON header ``[[name, dtype.str, shape], ...]`` (items sorted by name)."""
    if _PLAIN.fullmatch("".join(name for name, _, _ in items)):
        # fast path, same bytes as the JSON encoder: names need no escaping
        parts = [f'["{name}","{dtype.str}",[{",".join(str(int(d)) for d in shape)}]]' for name, dtype, shape in items]
        return ("[" + ",".join(parts) + "]").encode("ascii")
    return _ENCODER.encode([[name, dtype.str, [int(d) for d in shape]] for name, dtype, shape in items]).encode("ascii")


_HASHERS: dict[tuple, LayoutHasher] = {}
_HASHER_CACHE_SIZE = 256


def layout_hasher(items: list[tuple[str, np.ndarray]]) -> LayoutHasher:
    """The cached :class:`LayoutHasher` of canonical ``(name, array)`` pairs' layout."""
    key = tuple((name, arr.dtype, arr.shape) for name, arr in items)
    hasher = _HASHERS.get(key)
    if hasher is None:
        if len(_HASHERS) >= _HASHER_CACHE_SIZE:
            _HASHERS.clear()
        hasher = _HASHERS[key] = LayoutHasher({name: (arr.shape, arr.dtype) for name, arr in items})
    return hasher


def update_hash_bytes(arrays: Mapping[str, Any]) -> bytes:
    """32-byte SHA-256 digest of ``arrays`` in the ``fedledger.adapter.v1`` format."""
    items = canonical_arrays(arrays)
    return layout_hasher(items).digest({name: arr if arr.ndim else arr.reshape(1) for name, arr in items})


def update_hash(arrays: Mapping[str, Any]) -> str:
    """``"0x"`` + 64 hex digits: the canonical SHA-256 of ``arrays``."""
    return "0x" + update_hash_bytes(arrays).hex()


def canonical_json(obj: Any) -> bytes:
    """``obj`` as canonical JSON bytes: keys sorted, no whitespace, ASCII (NaN written as ``NaN``;
    numpy scalars and arrays as the Python numbers and lists they hold). The run and round
    documents are stored in exactly this form and hashed as bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True,
                      default=_plain).encode("ascii")


def _plain(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def json_hash(obj: Any) -> str:
    """``"0x"`` + SHA-256 of ``obj`` as canonical JSON (:func:`canonical_json`)."""
    return bytes_hash(canonical_json(obj))


def bytes_hash(data: bytes) -> str:
    """``"0x"`` + SHA-256 of ``data``."""
    return "0x" + hashlib.sha256(data).hexdigest()


def to_bytes32(value: str | bytes) -> bytes:
    """A hash given as ``0x``-hex or 32 raw bytes -> 32 raw bytes."""
    if isinstance(value, (bytes, bytearray)):
        b = bytes(value)
    else:
        s = value[2:] if value.startswith(("0x", "0X")) else value
        b = bytes.fromhex(s)
    if len(b) != 32:
        raise ValueError(f"expected a 32-byte hash, got {len(b)} bytes")
    return b


def to_hex(value: bytes) -> str:
    return "0x" + bytes(value).hex()
