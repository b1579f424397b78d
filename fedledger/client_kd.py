"""ClientApp handlers of KD-FedLLM (``strategy="kd"``; the server side is ``strategies/kd.py``).

    train.kd          fine-tune the local LoRA on this node's private data; the message carries the
                      adapter to start from (variant server: the global one; variant client: only
                      in round 1), else the node's own adapter (``context.state``) is used; the
                      reply carries metrics only: no parameter leaves the node
    query.kd_logits   top-k logits of the node's adapter at the answer positions of the public
                      examples the server named (``core.softlabels`` describes the reply); signed
                      when the run is audited
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


def handle_train(msg: Message, context: Context, train_local) -> Message:
    adapter = decode_global(msg.content["arrays"]) if "arrays" in msg.content.array_records else _own_adapter(context)
    shim = SimpleNamespace(content=RecordDict({"arrays": to_record(adapter), "config": _config(msg)}),
                           metadata=msg.metadata)
    local, metrics = train_local(shim, context)
    context.state[ADAPTER_KEY] = to_record(local)
    keep = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "partition-id"}
    return Message(RecordDict({"metrics": MetricRecord(keep)}), reply_to=msg)


def handle_logits(msg: Message, context: Context, sign) -> Message:
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
    audit = sign(context, arrays, int(cfg.get("server-round", 0)))
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


def register(app, train_local, sign) -> None:
    """Add the KD handlers to ``app``. ``train_local(msg, context) -> (adapter, metrics)`` trains from
    ``msg.content["arrays"]``; ``sign(context, arrays, round) -> ConfigRecord | None`` is the node's
    audit record (None when the run is not audited)."""

    @app.train("kd")
    def _train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, train_local)

    @app.query("kd_logits")
    def _logits(msg: Message, context: Context) -> Message:
        return handle_logits(msg, context, sign)

    @app.train("kd_distill")
    def _distil(msg: Message, context: Context) -> Message:
        return handle_distil(msg, context)

    @app.query("kd_evaluate")
    def _evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context)


__all__ = ["ADAPTER_KEY", "register"]
