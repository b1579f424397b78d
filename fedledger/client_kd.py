"""ClientApp handlers of KD-FedLLM (``strategy="kd"``; the server side is ``strategies/kd.py``).

    train.kd          fine-tune the local LoRA on this node's private data; the message carries the
                      adapter to start from (variant server: the global one; variant client: only
                      in round 1), else the node's own adapter (``context.state``) is used; the
                      reply carries metrics only: no parameter leaves the node
    query.kd_logits   top-k logits of the node's adapter at the answer positions of the public
                      examples the server named (``core.softlabels`` describes the reply); signed
                      when the run is audited: the EIP-712 commitment of an adapter update, over
                      this reply's arrays, the global adapter this round's train.kd carried and
                      the node's example count (``chain.mods.sign_framework``)
    train.kd_distill  (variant client) distil the aggregated soft labels into the node's adapter;
                      soft labels that fail the boundary check are not used (reply ``rejected``)
    query.kd_evaluate (variant client) held-out loss / perplexity / accuracy / exact match of the
                      node's own adapter

Every reply reports ``compute-seconds``, ``flops`` (``clients/cost.py``) and ``peak-rss-mb``.
"""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedledger.chain import mods
from fedledger.clients import distill
from fedledger.clients import model as model_lib
from fedledger.clients import train as train_lib
from fedledger.core import softlabels
from fedledger.core.pipeline import to_record
from fedledger.core.update import BoundaryError, decode_global

from .config import Settings
from .task import get_task

log = logging.getLogger("fedledger")

ADAPTER_KEY = "kd.adapter"
GLOBAL_KEY = "kd.global"      # round and hash of the global adapter the last train.kd carried


def _task(context: Context):
    settings = Settings.cached(context.run_config)
    cfg = context.node_config
    return settings, get_task(settings, int(cfg["num-partitions"])), int(cfg["partition-id"])


def _config(msg: Message) -> ConfigRecord:
    return msg.content["config"] if "config" in msg.content.config_records else ConfigRecord()


def _own_adapter(context: Context) -> dict[str, np.ndarray]:
    if ADAPTER_KEY not in context.state.array_records:
        raise RuntimeError("this node has no adapter yet: its first train.kd message must carry 'arrays'")
    return decode_global(context.state[ADAPTER_KEY])


def _costs(start: float, flops: float) -> dict:
    return {"compute-seconds": time.perf_counter() - start, "flops": float(flops), "peak-rss-mb": train_lib.peak_rss_mb()}


def _received_global(context: Context, server_round: int) -> str | None:
    """The hash of the global adapter this node received with round ``server_round``'s train.kd."""
    rec = context.state.config_records.get(GLOBAL_KEY)
    if rec is None or int(rec["round"]) != int(server_round):
        return None
    return str(rec["global-hash"])


def handle_train(msg: Message, context: Context, train_local) -> Message:
    if "arrays" in msg.content.array_records:   # audit_mod checked the chain for this global before we train
        from fedledger.chain.hashing import update_hash

        context.state[GLOBAL_KEY] = ConfigRecord({"round": int(_config(msg).get("server-round", 0)),
                                                  "global-hash": update_hash(msg.content["arrays"])})
    adapter = decode_global(msg.content["arrays"]) if "arrays" in msg.content.array_records else _own_adapter(context)
    shim = SimpleNamespace(content=RecordDict({"arrays": to_record(adapter), "config": _config(msg)}),
                           metadata=msg.metadata)
    local, metrics = train_local(shim, context)
    context.state[ADAPTER_KEY] = to_record(local)
    keep = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "partition-id"}
    return Message(RecordDict({"metrics": MetricRecord(keep)}), reply_to=msg)


def handle_logits(msg: Message, context: Context) -> Message:
    start = time.perf_counter()
    settings, task, pid = _task(context)
    cfg = _config(msg)
    ids = np.asarray(msg.content["query"][softlabels.PUBLIC_IDS].numpy(), dtype=np.int32)
    model_lib.set_adapter(task.model, _own_adapter(context))
    examples = task.public_examples(ids.tolist())
    values, top_ids, tokens = distill.topk_logits(task.model, examples, task.pad_id, int(cfg["k"]))
    arrays = {softlabels.VALUES: values, softlabels.IDS: top_ids, softlabels.PUBLIC_IDS: ids}
    seq = tokens / max(1, len(examples))
    metrics = {"num-examples": len(task.splits["partitions"][pid]),
               **_costs(start, task.cost.forward(tokens, int(round(seq))))}
    content = RecordDict({"logits": to_record(arrays), "metrics": MetricRecord(metrics)})
    # the same EIP-712 commitment as an adapter update: update hash = this reply's arrays, global hash =
    # the adapter this round's train.kd carried, num-examples = the soft labels' weight (signed)
    audit = mods.sign_framework(msg, context, arrays, _received_global(context, int(cfg.get("server-round", 0))),
                                metrics["num-examples"])
    if audit is not None:
        content["audit"] = audit
    return Message(content, reply_to=msg)


def handle_distil(msg: Message, context: Context) -> Message:
    start = time.perf_counter()
    settings, task, pid = _task(context)
    cfg = _config(msg)
    ids = [int(i) for i in msg.content["query"][softlabels.PUBLIC_IDS].numpy()]
    examples = task.public_examples(ids)
    try:
        soft = softlabels.decode_soft_labels(msg.content["soft-labels"], distill.answer_rows(examples),
                                             task.vocab_size)
    except (BoundaryError, KeyError) as exc:
        log.warning("node %s: soft labels not used: %s", context.node_id, exc)
        return Message(RecordDict({"metrics": MetricRecord({"rejected": 1, **_costs(start, 0.0)})}), reply_to=msg)
    model_lib.set_adapter(task.model, _own_adapter(context))
    seed = int(np.random.SeedSequence([settings.run.seed, pid, int(cfg.get("server-round", 0)), 0xD1]).generate_state(1)[0])
    t = settings.train
    stats = distill.distil_steps(task.model, examples, soft[softlabels.PROBS], soft[softlabels.AGG_IDS], task.pad_id,
                                 settings.kd.distil_steps, t.batch_size, t.learning_rate,
                                 float(cfg.get("temperature", settings.kd.temperature)), seed)
    context.state[ADAPTER_KEY] = to_record(model_lib.get_adapter(task.model))
    seq = stats["distil-tokens"] / max(1, settings.kd.distil_steps * min(t.batch_size, len(examples)))
    metrics = {"rejected": 0, "distil-loss": stats["distil-loss"],
               **_costs(start, task.cost.train(stats["distil-tokens"], int(round(seq))))}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def handle_evaluate(msg: Message, context: Context) -> Message:
    settings, task, _ = _task(context)
    result = task.evaluate(_own_adapter(context), "heldout", max_batches=None)  # as the central evaluation
    return Message(RecordDict({"metrics": MetricRecord({k: float(v) for k, v in result.items()})}), reply_to=msg)


def register(app, train_local) -> None:
    """Add the KD handlers to ``app``. ``train_local(msg, context) -> (adapter, metrics)`` trains from
    ``msg.content["arrays"]``. The app's ``audit_mod`` checks the chain before ``train.kd``; the
    logit reply is signed here (``chain.mods.sign_framework``)."""

    @app.train("kd")
    def _train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, train_local)

    @app.query("kd_logits")
    def _logits(msg: Message, context: Context) -> Message:
        return handle_logits(msg, context)

    @app.train("kd_distill")
    def _distil(msg: Message, context: Context) -> Message:
        return handle_distil(msg, context)

    @app.query("kd_evaluate")
    def _evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context)


__all__ = ["ADAPTER_KEY", "register"]
