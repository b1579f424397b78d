"""A client's train reply, decoded once at the boundary: an ``Update``, or a ``Rejected`` with its reason.

Flower hands a strategy raw ``Message`` replies. Everything fedledger does with a reply (verify
its signature, score its trust, aggregate it, record it on the ledger) works on the decoded form
built here, in one pass, *before* any library touches the reply. A reply is accepted when:

- **records**: exactly one ArrayRecord (any key) and exactly one MetricRecord (any key);
  ConfigRecords are ignored except ``audit`` (the client's signed record), kept as sent;
- **arrays**: the same tensor names as the global adapter the server sent this round; every
  ``Array`` is numpy-serialised (stype ``numpy.ndarray``), declares and decodes (npy, never
  pickle) to exactly the dtype, byte order and shape the server sent; its bytes are complete;
  every value is finite;
- **num-examples**: one scalar whole number in ``[1, max_examples]`` (a bound the run sets);
- **metrics**: scalar int/float values are kept; lists, NaN/Inf and bools are dropped (noted,
  not fatal);
- **one reply per node**: a later valid reply of a node id that already has one is rejected.

A reply that no node sent is not a reply: the error Flower's SuperLink itself returns for a node
that stopped heart-beating mid-round (a SuperNode killed, its machine gone: ``NODE_UNAVAILABLE``)
or for a reply that expired (``REPLY_MESSAGE_UNAVAILABLE``) is a dropout (:func:`is_no_reply`),
left out before decoding, never a refusal of some client.

Decoding is zero-copy: each tensor is a read-only ``np.frombuffer`` view into the bytes that
arrived (no ``np.load`` copy; npy headers are parsed once per distinct header, not per tensor),
and finiteness is checked with one reduction per tensor (a sum is finite only if every value
is), falling back to an element-wise check only when that sum overflows. Those reductions, the
one pass over every received value, run on a few threads (``core.workers``).
"""

from __future__ import annotations

import ast
import io
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

from .workers import map_ordered

NUMPY_STYPE = "numpy.ndarray"
NUM_EXAMPLES = "num-examples"
AUDIT_KEY = "audit"
_NPY_MAGIC = b"\x93NUMPY"


class BoundaryError(ValueError):
    """Why one reply (or one array) cannot be used; the message is the rejection reason."""


# ---------------------------------------------------------------------------- data types
@dataclass(frozen=True)
class Identity:
    """Who a Flower node is in this run, resolved once by whoever builds the pipeline.

    ``partition`` and ``signer`` are None when nobody established them (a plain Flower app):
    the node id is then the only identity, and ``key`` says so.
    """

    node_id: int
    partition: int | None = None
    signer: str | None = None

    @property
    def key(self) -> str:
        """Stable key for per-client state (trust history): the partition when known."""
        return f"partition-{self.partition}" if self.partition is not None else f"node-{self.node_id}"

    def to_dict(self) -> dict:
        return {"node-id": self.node_id, "partition": self.partition, "signer": self.signer}


@dataclass(frozen=True)
class Update:
    """One accepted train reply. ``arrays`` are read-only views in the global adapter's order."""

    node_id: int
    arrays: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float]            # scalar metrics as sent, num-examples excluded
    audit: dict | None                   # the reply's ``audit`` ConfigRecord, untouched
    message: Message                     # the reply itself (its Arrays are valid: reused, not re-encoded)
    identity: Identity | None = None
    dropped_metrics: tuple[str, ...] = ()
    layout: "Layout | None" = None       # the layout ``arrays`` were decoded against (exact dtypes, shapes, C order)

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values()))

    def with_identity(self, identity: Identity) -> "Update":
        return replace(self, identity=identity)


@dataclass(frozen=True)
class Rejected:
    """A reply that did not enter the round, and why (``stage``: boundary, identity, signature)."""

    node_id: int
    reason: str
    stage: str = "boundary"
    identity: Identity | None = None

    def to_dict(self) -> dict:
        ident = self.identity.to_dict() if self.identity else {"node-id": self.node_id}
        return {**ident, "reason": self.reason, "stage": self.stage}


@dataclass(frozen=True)
class Layout:
    """Names, shapes and dtypes of the global adapter: what every reply must match."""

    specs: dict[str, tuple[tuple[int, ...], np.dtype]] = field(default_factory=dict)

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray]) -> "Layout":
        return cls({k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in arrays.items()})

    @property
    def names(self) -> list[str]:
        return list(self.specs)

    @property
    def nbytes(self) -> int:
        return int(sum(math.prod(s) * d.itemsize for s, d in self.specs.values()))


# ---------------------------------------------------------------------------- arrays
def _npy_header(data) -> tuple[np.dtype, bool, tuple[int, ...], int]:
    """(dtype, fortran order, shape, data offset) of npy bytes; BoundaryError if malformed.

    Every reply of a round carries the same few headers (one per tensor layout), so parsed
    headers are cached by their bytes: a header is parsed once per run, not once per tensor.
    """
    if len(data) < 10 or data[:6] != _NPY_MAGIC:
        raise BoundaryError("bytes are not in npy format")
    major = data[6]
    if major == 1:
        hlen, start = int.from_bytes(data[8:10], "little"), 10
    elif major in (2, 3):
        if len(data) < 12:
            raise BoundaryError("truncated npy header")
        hlen, start = int.from_bytes(data[8:12], "little"), 12
    else:
        raise BoundaryError(f"unknown npy format version {major}")
    if start + hlen > len(data):
        raise BoundaryError("truncated npy header")
    key = bytes(data[:start + hlen])
    parsed = _HEADERS.get(key)
    if parsed is None:
        parsed = _parse_header(key[start:], major, start + hlen)
        if len(_HEADERS) >= _HEADER_CACHE_SIZE:
            _HEADERS.clear()
        _HEADERS[key] = parsed
    return parsed


_HEADERS: dict[bytes, tuple[np.dtype, bool, tuple[int, ...], int]] = {}
_HEADER_CACHE_SIZE = 4096


def _parse_header(raw: bytes, major: int, offset: int) -> tuple[np.dtype, bool, tuple[int, ...], int]:
    try:
        header = ast.literal_eval(raw.decode("latin1" if major < 3 else "utf8"))
        descr, fortran, shape = header["descr"], header["fortran_order"], header["shape"]
        if isinstance(descr, list):
            raise BoundaryError("structured dtype")
        dtype = np.dtype(descr)
        shape = tuple(int(s) for s in shape)
    except BoundaryError:
        raise
    except Exception:  # noqa: BLE001  (any malformed header is just a bad reply)
        raise BoundaryError("malformed npy header") from None
    if any(s < 0 for s in shape):
        raise BoundaryError("negative dimension in npy header")
    return dtype, bool(fortran), shape, offset


def decode_array(name: str, array, shape: tuple[int, ...], dtype: np.dtype, *, check_finite: bool = True
                 ) -> np.ndarray:
    """A read-only view of ``array``'s values, or BoundaryError naming what is wrong.

    ``check_finite=False`` leaves the finiteness check to the caller (``decode_replies`` runs
    those reductions on several threads once the structure of every reply is known).
    """
    if not isinstance(array, Array):
        raise BoundaryError(f"{name}: not a Flower Array")
    if array.stype != NUMPY_STYPE:
        raise BoundaryError(f"{name}: serialisation {array.stype!r} is not {NUMPY_STYPE!r}")
    data = array.data
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BoundaryError(f"{name}: array data is not bytes")
    got_dtype, fortran, got_shape, offset = _npy_header(data)
    if got_dtype != dtype:
        raise BoundaryError(f"{name}: dtype {got_dtype.str} is not the adapter's {dtype.str}")
    if got_shape != tuple(shape):
        raise BoundaryError(f"{name}: shape {got_shape} != {tuple(shape)}")
    if fortran and len(shape) > 1:
        raise BoundaryError(f"{name}: Fortran-ordered array")
    if array.dtype != _dtype_name(dtype) or tuple(array.shape) != got_shape:
        raise BoundaryError(f"{name}: declared {array.dtype}{tuple(array.shape)} differs from its bytes")
    count = math.prod(shape)
    if len(data) != offset + count * dtype.itemsize:
        raise BoundaryError(f"{name}: {len(data) - offset} data bytes, expected {count * dtype.itemsize}")
    view = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
    if check_finite and not all_finite(view):
        raise BoundaryError(f"{name}: NaN/Inf values")
    return view


def _dtype_name(dtype: np.dtype) -> str:
    """``str(dtype)`` (what a Flower Array declares), cached: numpy's ``__str__`` is slow."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype)
    return name


_DTYPE_NAMES: dict[np.dtype, str] = {}


def all_finite(view: np.ndarray) -> bool:
    """Whether every value is finite: one sum (finite only if every value is), falling back to an
    element-wise check only when that sum is not finite (it may overflow with finite values)."""
    if view.dtype.kind not in "fc" or view.size == 0:
        return True
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.add.reduce(view, axis=None)
    if np.isfinite(total):
        return True
    return bool(np.isfinite(view).all())


def first_non_finite(arrays: Mapping[str, np.ndarray]) -> str | None:
    """The name of the first tensor with a NaN/Inf value, or None."""
    return next((name for name, v in arrays.items() if not all_finite(v)), None)


def decode_arrayrecord(record: ArrayRecord, layout: Layout, *, check_finite: bool = True) -> dict[str, np.ndarray]:
    """Every tensor of ``record``, validated against ``layout``, in the layout's order."""
    if len(record) != len(layout.specs) or any(name not in layout.specs for name in record):
        names = list(record.keys())
        missing = sorted(set(layout.specs) - set(names))
        extra = sorted(set(names) - set(layout.specs))
        raise BoundaryError(f"wrong tensor names (missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''})")
    return {name: decode_array(name, record[name], shape, dtype, check_finite=check_finite)
            for name, (shape, dtype) in layout.specs.items()}


def decode_global(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The server's own global adapter (trusted, so not checked against a layout): one decode."""
    out = {}
    for name, array in record.items():
        if array.stype != NUMPY_STYPE:
            raise BoundaryError(f"global adapter tensor {name} is not numpy-serialised")
        dtype, _, shape, offset = _npy_header(array.data)
        out[name] = np.frombuffer(array.data, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)
    return out


def encode_array(value: np.ndarray) -> Array:
    """``Array(np.ascontiguousarray(value))`` byte for byte (npy, as Flower writes it), without
    ``np.save``'s stream (the header is built once per dtype and shape)."""
    v = np.ascontiguousarray(value)
    if v.dtype.hasobject:
        raise BoundaryError("cannot encode an object array (npy without pickle)")
    key = (v.dtype.str, v.shape)
    header = _ENCODED_HEADERS.get(key)
    if header is None:
        header = _ENCODED_HEADERS[key] = _npy_header_bytes(v)
    data = b"".join((header, v))  # one copy (``header + v.tobytes()`` would copy the values twice)
    return Array(dtype=str(v.dtype), shape=tuple(int(d) for d in v.shape), stype=NUMPY_STYPE, data=data)


_ENCODED_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}


def _npy_header_bytes(v: np.ndarray) -> bytes:
    from numpy.lib import format as npy_format

    meta = npy_format.header_data_from_array_1_0(v)
    buf = io.BytesIO()
    try:
        npy_format.write_array_header_1_0(buf, meta)
    except ValueError:  # a header too long for version 1.0, as np.save does
        buf = io.BytesIO()
        npy_format.write_array_header_2_0(buf, meta)
    return buf.getvalue()


# ---------------------------------------------------------------------------- metrics
def whole_number(value, what: str, upper: int) -> int:
    """``value`` as an int in ``[1, upper]``: an int, or a float with no fractional part."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BoundaryError(f"{what} must be a single number, got {type(value).__name__}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BoundaryError(f"{what} is {value}")
        if not value.is_integer():
            raise BoundaryError(f"{what} {value} is not a whole number")
    if not 1 <= value <= upper:
        raise BoundaryError(f"{what} {value:g} is outside [1, {upper}]")
    return int(value)


def scalar_metrics(record) -> tuple[dict[str, float], tuple[str, ...]]:
    """(scalar finite metrics, names of the dropped ones) of a MetricRecord."""
    kept, dropped = {}, []
    for k, v in record.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
            dropped.append(str(k))
        else:
            kept[str(k)] = v
    return kept, tuple(dropped)


# ---------------------------------------------------------------------------- replies
def decode_reply(msg: Message, layout: Layout, max_examples: int, weight_key: str = NUM_EXAMPLES,
                 audit_key: str = AUDIT_KEY, *, check_finite: bool = True) -> Update:
    """One train reply -> ``Update``; raises BoundaryError with the rejection reason."""
    if msg.has_error():
        raise BoundaryError(f"client error: {msg.error.reason}")
    content = msg.content
    arrays = list(content.array_records.items())
    metrics = list(content.metric_records.values())
    if len(arrays) != 1:
        raise BoundaryError(f"{len(arrays)} ArrayRecords (expected exactly 1)")
    if len(metrics) != 1:
        raise BoundaryError(f"{len(metrics)} MetricRecords (expected exactly 1)")
    record = metrics[0]
    if weight_key not in record:
        raise BoundaryError(f"no '{weight_key}' metric")
    n = whole_number(record[weight_key], f"'{weight_key}'", max_examples)
    decoded = decode_arrayrecord(arrays[0][1], layout, check_finite=check_finite)
    kept, dropped = scalar_metrics(record)
    kept.pop(weight_key, None)
    audit = content.config_records.get(audit_key)
    return Update(node_id=int(msg.metadata.src_node_id), arrays=decoded, num_examples=n, metrics=kept,
                  audit=dict(audit) if audit is not None else None, message=msg, dropped_metrics=dropped,
                  layout=layout)


#: Flower error codes the SuperLink answers with in place of a node that never replied
NO_REPLY_ERRORS = (ErrorCode.NODE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE)


def is_no_reply(msg: Message) -> bool:
    """Whether ``msg`` is the SuperLink's stand-in for a reply that never came (see the module)."""
    return (msg.has_error() and int(msg.error.code) in NO_REPLY_ERRORS
            and int(msg.metadata.src_node_id) == SUPERLINK_NODE_ID)


def decode_replies(replies: Iterable[Message], layout: Layout, max_examples: int, weight_key: str = NUM_EXAMPLES,
                   audit_key: str = AUDIT_KEY, *,
                   finite_check: Callable[[Sequence[Update]], list[str | None]] | None = None
                   ) -> tuple[list[Update], list[Rejected]]:
    """Decode every reply once. Keeps the first valid reply per node id; the rest are rejected.

    The structure of every reply is checked first; then the finiteness reductions (the only
    pass over all received values) run on the tensor thread pool (``core.workers``).
    ``finite_check`` replaces those reductions: given the structurally valid replies, it returns
    per reply the first tensor with a NaN/Inf value, or None (``core.aggregate.FusedMean``
    computes the FedAvg sum in the same pass).
    """
    candidates: list[Update] = []
    rejected: list[Rejected] = []
    for msg in replies:
        try:
            candidates.append(decode_reply(msg, layout, max_examples, weight_key, audit_key, check_finite=False))
        except BoundaryError as exc:
            rejected.append(Rejected(_node_id(msg), str(exc)))
    bad_tensor = (finite_check(candidates) if finite_check is not None
                  else map_ordered(lambda u: first_non_finite(u.arrays), candidates))
    updates: list[Update] = []
    seen: set[int] = set()
    for update, bad in zip(candidates, bad_tensor, strict=True):
        if bad is not None:
            rejected.append(Rejected(update.node_id, f"{bad}: NaN/Inf values"))
        elif update.node_id in seen:
            rejected.append(Rejected(update.node_id, "a second reply from this node in the same round"))
        else:
            seen.add(update.node_id)
            updates.append(update)
    return updates, rejected


def decode_evaluate_reply(msg: Message, max_examples: int, weight_key: str = NUM_EXAMPLES) -> dict[str, float]:
    """The scalar metrics of an evaluate reply (``weight_key`` validated); BoundaryError otherwise."""
    if msg.has_error():
        raise BoundaryError(f"client error: {msg.error.reason}")
    metrics = list(msg.content.metric_records.values())
    if len(metrics) != 1:
        raise BoundaryError(f"{len(metrics)} MetricRecords (expected exactly 1)")
    kept, _ = scalar_metrics(metrics[0])
    if weight_key not in metrics[0]:
        raise BoundaryError(f"no '{weight_key}' metric")
    kept[weight_key] = whole_number(metrics[0][weight_key], f"'{weight_key}'", max_examples)
    return kept


def _node_id(msg: Message) -> int:
    try:
        return int(msg.metadata.src_node_id)
    except Exception:  # noqa: BLE001
        return -1


def payload_nbytes(msg: Message) -> int:
    """Bytes of array data a message carries, counted from the Array headers (no decode)."""
    if msg.has_error():
        return 0
    total = 0
    for rec in msg.content.array_records.values():
        for a in rec.values():
            data = getattr(a, "data", b"")
            total += len(data) if isinstance(data, (bytes, bytearray, memoryview)) else 0
    return int(total)
