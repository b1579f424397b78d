"""ClientApp handlers of the serverless exchanges (ring all-reduce, gossip, async gossip).

Flower is hub-and-spoke: in these modes the ServerApp never averages, it only *relays* each
peer's payload to the peer(s) the topology says it goes to. The merging happens here, on the
peer, with the pure-numpy maths of ``fedledger.strategies.peer``; each node's model and ring
buffer persist in ``context.state`` between messages. The same handlers run in simulation and
deployment.

    from fedledger import client_peer
    client_peer.register(app, train_local)   # adds train.ring, train.gossip, train.async

A payload from a peer that is malformed (wrong keys/shape, NaN/Inf) is never merged: it is
dropped with a logged reason and the reply says ``rejected`` so the relay can route around
the sender. Neighbours are named by the relay (``peer-<j>``, ``in-<i>-from``: topology peers,
i.e. partition ids); a reply never says which partition its sender holds.

Peer-side trust reads the run's typed settings (``Settings.cached(context.run_config).trust``:
``mode``, ``threshold``, ``damping``, ``norm_tol``).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedledger.config import Settings
from fedledger.strategies import peer as peer_lib
from fedledger.strategies.kernels import as_numpy_dict, flatten, invalid_reason, layout, to_arrayrecord, unflatten

log = logging.getLogger("fedledger")

MODEL_KEY = "peer.model"
START_KEY = "peer.start"  # the model this peer last started training from (trust deltas)
OPPOSED_COSINE = -0.1     # peer-side trust: a neighbour's update this opposed to our own is not merged
VEC_KEY = "peer.vec"
META_KEY = "peer.meta"


# ---------------------------------------------------------------------- state helpers
def _config(msg: Message) -> ConfigRecord:
    return msg.content["config"] if "config" in msg.content.config_records else ConfigRecord()


def _model(msg: Message, context: Context) -> dict[str, np.ndarray]:
    """This peer's current model: its state, or the arrays the relay sent (first round)."""
    if "arrays" in msg.content.array_records:
        arrays = as_numpy_dict(msg.content["arrays"])
        reason = invalid_reason(arrays, layout(context.state[MODEL_KEY]) if MODEL_KEY in context.state.array_records else None)
        if reason is None:
            return arrays
        log.warning("peer %s: ignored initial arrays: %s", context.node_id, reason)
    if MODEL_KEY in context.state.array_records:
        return as_numpy_dict(context.state[MODEL_KEY])
    raise RuntimeError("peer has no model yet: the first message of a run must carry 'arrays'")


def _meta(context: Context) -> ConfigRecord:
    if META_KEY not in context.state.config_records:
        context.state[META_KEY] = ConfigRecord({"num-examples": 1.0, "mass": 1.0, "version": 0})
    return context.state[META_KEY]


def _save_model(context: Context, arrays: dict[str, np.ndarray]) -> None:
    context.state[MODEL_KEY] = to_arrayrecord(arrays)


def _train(msg: Message, context: Context, train_local, model: dict[str, np.ndarray]) -> tuple[dict, dict]:
    shim = SimpleNamespace(content=RecordDict({"arrays": to_arrayrecord(model), "config": _config(msg)}),
                           metadata=msg.metadata)
    arrays, metrics = train_local(shim, context)
    return {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}, dict(metrics)


def _payload_reason(payload, expected, weight: float, weight_name: str) -> str | None:
    """Why a neighbour's model must not be merged (wrong keys/shapes, NaN/Inf, bad weight), or None."""
    reason = invalid_reason(payload, expected)
    if reason is None and not (np.isfinite(weight) and weight > 0):
        reason = f"non-positive {weight_name} {weight}"
    return reason


def _trust(context: Context):
    """The run's trust settings when peer-side PageRank trust is on, else None."""
    trust = Settings.cached(context.run_config).trust
    return trust if trust.mode == "pagerank" else None


def _distrusted(context: Context, own: dict[str, np.ndarray], candidates: dict[str, np.ndarray]) -> set[str]:
    """PageRank trust over the models this peer hears from (run-config ``trust="pagerank"``).

    Deltas are taken from the model this peer last started training from. Only the candidates
    are scored; this peer's own delta is the reference node that personalises PageRank (a peer
    trusts its own update), as the server's root-split update does in :class:`PageRankTrust`.
    Excluded (their mixing weight stays with this peer):

    - a candidate whose normalised score (mean 1 over the candidates) is under ``trust-threshold``;
    - one whose update points against the peer's own (cosine < ``OPPOSED_COSINE``; unrelated
      updates have a cosine near 0), which also judges a single neighbour (whose normalised
      score is 1 by construction);
    - one whose update norm is more than ``trust-norm-tol`` times larger or smaller than the
      peer's own (scaled updates, free riders).

    ``trust-damping`` and ``trust-norm-tol`` apply; the anchor is always the peer's own update and
    no history is kept. The ring cannot do this (a peer only ever sees partial sums), so trust
    applies to ``gossip`` and ``async-gossip``.
    """
    trust = _trust(context)
    if trust is None or not candidates or START_KEY not in context.state.array_records:
        return set()
    from fedledger.strategies.pagerank import trust_scores

    start = flatten(context.state[START_KEY])
    own_delta = flatten(own) - start
    keys = sorted(candidates)
    scores, details = trust_scores([candidates[k] - start for k in keys], reference=own_delta,
                                   damping=trust.damping, norm_tol=trust.norm_tol, history_weight=0.0,
                                   return_details=True)
    cos = details.get("cos-to-anchor")
    cos = np.zeros(len(keys)) if cos is None else np.asarray(cos)
    # magnitude against the peer's own update (the median over 1-4 neighbours is no yardstick)
    tol, own_norm = trust.norm_tol, float(np.linalg.norm(own_delta))
    ratio = np.asarray(details["norms"]) / own_norm if own_norm > 0 else np.ones(len(keys))
    return {k for k, sc, c, r in zip(keys, scores, cos, ratio)
            if sc < trust.threshold or c < OPPOSED_COSINE or not (1.0 / tol <= r <= tol)}


def _numeric(metrics: dict) -> dict:
    """Scalar metrics for a reply; never a ``partition-id`` (the glue knows who a node is)."""
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "partition-id"}


def _reply(msg: Message, **records) -> Message:
    return Message(RecordDict({k: v for k, v in records.items() if v is not None}), reply_to=msg)


# ---------------------------------------------------------------------- ring all-reduce
def handle_ring(msg: Message, context: Context, train_local) -> Message:
    """``phase=train``: train locally, keep ``[n x, n]`` as this peer's ring vector.
    ``phase=step``: merge the chunk received from the ring predecessor (add during
    reduce-scatter, overwrite during all-gather), reply with the chunk to pass on; on
    ``finish`` the buffer holds the FedAvg of the ring and becomes this peer's model."""
    cfg = _config(msg)
    phase = str(cfg.get("phase", "train"))
    if phase == "train":
        model = _model(msg, context)
        local, metrics = _train(msg, context, train_local, model)
        n = float(metrics.get("num-examples", 1.0))
        vec = peer_lib.weighted_vector(local, n)
        context.state[VEC_KEY] = ArrayRecord({"local": _t(vec), "buf": _t(vec.copy())})
        _save_model(context, local)
        _meta(context)["num-examples"] = n
        return _reply(msg, metrics=MetricRecord(_numeric(metrics)))

    vecs = context.state[VEC_KEY]
    buf = vecs["buf"].numpy().copy()
    if bool(cfg.get("reset", False)):
        buf = vecs["local"].numpy().copy()
    n_ring = int(cfg["ring-size"])
    bounds = peer_lib.chunk_bounds(buf.size, n_ring)
    rejected, reason = 0, None
    in_index = int(cfg.get("in-index", -1))
    if in_index >= 0:
        payload = msg.content.array_records.get("chunk")
        a, b = bounds[in_index]
        reason = invalid_reason(payload, [("chunk", (b - a,))])
        if reason is None:
            peer_lib.apply_chunk(buf, bounds[in_index], payload["chunk"].numpy(), str(cfg.get("in-op", "add")))
        else:
            rejected = 1
            log.warning("peer %s: dropped ring chunk from node %s: %s", context.node_id, cfg.get("in-from", "?"), reason)
    content = {"metrics": MetricRecord({"rejected": rejected})}
    if not rejected:
        context.state[VEC_KEY] = ArrayRecord({"local": _t(vecs["local"].numpy()), "buf": _t(buf)})
        out_index = int(cfg.get("out-index", -1))
        if out_index >= 0:
            a, b = bounds[out_index]
            content["chunk"] = ArrayRecord({"chunk": _t(buf[a:b].copy())})
        if bool(cfg.get("finish", False)):
            _save_model(context, peer_lib.vector_to_adapter(buf, as_numpy_dict(context.state[MODEL_KEY])))
    else:
        content["status"] = ConfigRecord({"reason": reason or ""})
    return _reply(msg, **content)


def _t(a: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


# ---------------------------------------------------------------------- gossip
def handle_gossip(msg: Message, context: Context, train_local) -> Message:
    """``phase=train``: train locally, reply the model (the relay forwards it to neighbours).
    ``phase=mix``: mix with the neighbours' models ``peer-<j>`` using the Metropolis weights
    ``w-<j>`` and masses ``mass-<j>`` the relay attached; malformed neighbour models are dropped
    (their weight stays with this peer)."""
    cfg = _config(msg)
    phase = str(cfg.get("phase", "train"))
    meta = _meta(context)
    if phase == "train":
        model = _model(msg, context)
        if _trust(context) is not None:
            context.state[START_KEY] = to_arrayrecord(model)
        local, metrics = _train(msg, context, train_local, model)
        n = float(metrics.get("num-examples", 1.0))
        _save_model(context, local)
        meta["num-examples"], meta["mass"] = n, n
        return _reply(msg, arrays=to_arrayrecord(local), metrics=MetricRecord(_numeric(metrics)))

    own = as_numpy_dict(context.state[MODEL_KEY])
    expected = layout(own)
    self_weight = float(cfg.get("self-weight", 1.0))
    neighbours, rejected = [], 0
    for key in list(msg.content.array_records.keys()):
        if not key.startswith("peer-"):
            continue
        j = key[len("peer-"):]
        w = float(cfg.get(f"w-{j}", 0.0))
        mass = float(cfg.get(f"mass-{j}", 0.0))
        reason = _payload_reason(msg.content[key], expected, mass, "mass")
        if reason is not None:
            rejected += 1
            self_weight += w
            log.warning("peer %s: dropped gossip model from node %s: %s", context.node_id, j, reason)
            continue
        neighbours.append((j, flatten(msg.content[key]), mass, w))
    distrusted = _distrusted(context, own, {j: x for j, x, _, _ in neighbours})
    for j, _, _, w in neighbours:
        if j in distrusted:
            self_weight += w
            log.warning("node %s: distrusted the gossip model of peer %s (PageRank trust below threshold)", context.node_id, j)
    kept = [(x, m, w) for j, x, m, w in neighbours if j not in distrusted]
    x, mass = peer_lib.gossip_mix(flatten(own), float(meta.get("mass", 1.0)), self_weight, kept)
    new = unflatten(x, own)
    _save_model(context, new)
    meta["mass"] = mass
    return _reply(msg, arrays=to_arrayrecord(new), metrics=MetricRecord({
        "mass": mass, "rejected": rejected, "num-examples": float(meta["num-examples"]),
        "distrusted": len(distrusted), "distrusted-peers": sorted(int(j) for j in distrusted)}))


# ---------------------------------------------------------------------- asynchronous gossip
def handle_async(msg: Message, context: Context, train_local) -> Message:
    """Merge the models received since the last wake-up (``in-<i>``; staleness-weighted by
    ``version`` difference, weighted by examples), then (unless ``train`` is false) train."""
    cfg = _config(msg)
    meta = _meta(context)
    model = _model(msg, context)
    expected = layout(model)
    version = int(meta.get("version", 0))
    exponent = float(cfg.get("staleness-exponent", 0.5))
    received, rejected = [], 0
    for key in list(msg.content.array_records.keys()):
        if not key.startswith("in-"):
            continue
        n = float(cfg.get(f"{key}-n", 0.0))
        reason = _payload_reason(msg.content[key], expected, n, "num-examples")
        if reason is not None:
            rejected += 1
            log.warning("peer %s: dropped async model from node %s: %s", context.node_id, cfg.get(f"{key}-from", "?"), reason)
            continue
        tau = max(0, version - int(cfg.get(f"{key}-version", version)))
        received.append((key, str(cfg.get(f"{key}-from", key)), flatten(msg.content[key]), n, tau))
    distrusted_items = _distrusted(context, model, {key: x for key, _, x, _, _ in received})  # each item scored
    distrusted = sorted({src for key, src, _, _, _ in received if key in distrusted_items})
    if distrusted:
        log.warning("node %s: distrusted the async models of peers %s (PageRank trust below threshold)",
                    context.node_id, distrusted)
    received = [(x, n, tau) for key, _, x, n, tau in received if key not in distrusted_items]
    if received:
        model = unflatten(peer_lib.async_merge(flatten(model), float(meta.get("num-examples", 1.0)), received, exponent), model)
    metrics: dict = {}
    if bool(cfg.get("train", True)):
        if _trust(context) is not None:
            context.state[START_KEY] = to_arrayrecord(model)
        model, metrics = _train(msg, context, train_local, model)
        meta["num-examples"] = float(metrics.get("num-examples", 1.0))
        meta["version"] = version + 1
    _save_model(context, model)
    metrics = {**_numeric(metrics), "rejected": rejected, "merged": len(received), "version": int(meta["version"]),
               "num-examples": float(meta["num-examples"]), "distrusted": len(distrusted),
               "distrusted-peers": sorted(int(src) for src in distrusted if src.lstrip("-").isdigit())}
    return _reply(msg, arrays=to_arrayrecord(model), metrics=MetricRecord(metrics))


# ---------------------------------------------------------------------- registration
def register(app, train_local) -> None:
    """Add ``@app.train("ring")``, ``("gossip")`` and ``("async")`` to ``app``.

    ``train_local(msg, context) -> (arrays, metrics)`` trains from ``msg.content["arrays"]``
    and must report ``num-examples``.
    """

    @app.train("ring")
    def _ring(msg: Message, context: Context) -> Message:
        return handle_ring(msg, context, train_local)

    @app.train("gossip")
    def _gossip(msg: Message, context: Context) -> Message:
        return handle_gossip(msg, context, train_local)

    @app.train("async")
    def _async(msg: Message, context: Context) -> Message:
        return handle_async(msg, context, train_local)
