"""ClientApp handler of Split-FedLLM (``strategy="split"``; the server side is ``strategies/split.py``).

``train.split``, one message per local step (config ``step`` = 1 .. local-steps + 1):

- it carries the global client-side adapter (step 1) or the gradient at the cut for the previous
  step (``grad``); the node recomputes that step's forward (same adapter, batch and dropout seed),
  back-propagates the gradient and takes one AdamW step on its LoRA (blocks 1..k);
- then, for steps 1..local-steps, it draws the step's batch, runs its blocks and replies with the
  ``activations`` (hidden state at the cut in ``split-dtype``, attention mask, labels), extending
  the digest of everything it sent this round (``core.digest``);
- after the last gradient it replies with its client-side adapter and that digest (one more
  uint8 tensor ``activations-digest``), signed when the run is audited: the EIP-712 commitment
  of an adapter update over those arrays, the global client-side adapter of step 1 and the
  node's example count (``chain.mods.sign_framework``); before step 1 trains, the node checks
  the chain as ``audit_mod`` does for any train message (``chain.mods.check_framework``).

Between messages the node keeps its adapter, its AdamW moments and the digest in ``context.state``:
no autograd graph has to survive from one message to the next (a ClientApp may be a new process).
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedledger.chain import mods
from fedledger.clients import model as model_lib
from fedledger.clients import split as split_lib
from fedledger.clients import train as train_lib
from fedledger.core.digest import GENESIS, chain_digest, digest_array
from fedledger.core.pipeline import to_record
from fedledger.core.update import decode_global

from .config import Settings
from .task import get_task

ADAPTER_KEY, OPTIMIZER_KEY, META_KEY = "split.adapter", "split.optimizer", "split.meta"
DIGEST = "activations-digest"


def _step_seed(settings: Settings, pid: int, server_round: int, step: int) -> int:
    return int(np.random.SeedSequence([settings.run.seed, pid, server_round, step, 0x5B]).generate_state(1)[0])


def handle_split(msg: Message, context: Context) -> Message:
    start = time.perf_counter()
    settings = Settings.cached(context.run_config)
    pid, num_partitions = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    task = get_task(settings, num_partitions)
    cfg = msg.content["config"]
    server_round, step, last = int(cfg["server-round"]), int(cfg["step"]), int(cfg["local-steps"])
    split = split_lib.SplitModel(task.model, int(cfg["split-layer"]))
    attack = settings.attack.name if pid in settings.attack.malicious else "none"
    examples = task.examples("partition", pid, poisoned=attack if attack != "none" else None)
    bs = settings.train.batch_size

    if step == 1:
        from fedledger.chain.hashing import update_hash

        global_hash = update_hash(msg.content["arrays"])
        refusal = mods.check_framework(msg, context, global_hash)   # the chain check, before training
        if refusal is not None:
            return refusal
        adapter, optimizer, digest = decode_global(msg.content["arrays"]), {}, GENESIS
    else:
        adapter = decode_global(context.state[ADAPTER_KEY])
        optimizer = {k: v.numpy() for k, v in context.state[OPTIMIZER_KEY].items()} \
            if OPTIMIZER_KEY in context.state.array_records else {}
        meta = context.state[META_KEY]
        digest = str(meta["digest"])
        global_hash = str(meta["global-hash"]) if int(meta.get("round", -1)) == server_round else None
    model_lib.set_adapter(task.model, adapter, strict=False)
    flops = 0.0
    if "grad" in msg.content.array_records:  # the previous step's gradient: recompute, back-propagate, step
        batch = split_lib.step_batch(examples, task.pad_id, bs, _step_seed(settings, pid, server_round, step - 1))
        optimizer = split_lib.backward_step(split, batch, _step_seed(settings, pid, server_round, step - 1),
                                            msg.content["grad"]["grad"].numpy(), optimizer, settings.train.learning_rate)
        tokens, width = int(batch["attention_mask"].sum()), int(batch["attention_mask"].shape[1])
        flops += split_lib.TRAIN_FACTOR * task.cost.forward(tokens, width, 0, split.k, head=False)
        full = model_lib.get_adapter(task.model)
        adapter = {n: full[n] for n in adapter}

    if step <= last:
        batch = split_lib.step_batch(examples, task.pad_id, bs, _step_seed(settings, pid, server_round, step))
        acts = split_lib.activations(split, batch, _step_seed(settings, pid, server_round, step), str(cfg["split-dtype"]))
        digest = chain_digest(digest, acts)
        flops += task.cost.forward(int(batch["attention_mask"].sum()), int(batch["attention_mask"].shape[1]), 0,
                                   split.k, head=False)
        _keep(context, adapter, optimizer, digest, server_round, global_hash)
        metrics = {"compute-seconds": time.perf_counter() - start, "flops": flops, "peak-rss-mb": train_lib.peak_rss_mb()}
        return Message(RecordDict({"activations": to_record(acts), "metrics": MetricRecord(metrics)}), reply_to=msg)

    arrays = {**adapter, DIGEST: digest_array(digest)}
    metrics = {"num-examples": len(task.splits["partitions"][pid]), "compute-seconds": time.perf_counter() - start,
               "flops": flops, "peak-rss-mb": train_lib.peak_rss_mb()}
    content = RecordDict({"arrays": to_record(arrays), "metrics": MetricRecord(metrics)})
    # the same EIP-712 commitment as an adapter update: update hash = client-side adapter + digest, global
    # hash = the global client-side adapter of step 1, num-examples = the FedAvg weight (signed)
    audit = mods.sign_framework(msg, context, arrays, global_hash, metrics["num-examples"])
    if audit is not None:
        content["audit"] = audit
    return Message(content, reply_to=msg)


def _keep(context: Context, adapter: dict, optimizer: dict, digest: str, server_round: int,
          global_hash: str | None) -> None:
    context.state[ADAPTER_KEY] = to_record(adapter)
    context.state[OPTIMIZER_KEY] = to_record(optimizer)  # empty at step 1: never last round's moments
    meta = {"digest": digest, "round": int(server_round)}
    if global_hash is not None:
        meta["global-hash"] = global_hash
    context.state[META_KEY] = ConfigRecord(meta)


def register(app) -> None:
    """Add ``@app.train("split")`` to ``app`` (``audit_mod`` leaves it alone: it checks the chain at
    step 1 and signs its round-end reply itself, ``chain.mods.SELF_AUDITED``)."""

    @app.train("split")
    def _split(msg: Message, context: Context) -> Message:
        return handle_split(msg, context)


__all__ = ["register"]
