"""fedledger ClientApp: local LoRA fine-tuning that exchanges only adapter tensors.

- ``train``: load the global adapter, run ``local-steps`` AdamW steps on this node's partition,
  reply with the new adapter (fp32 ``ArrayRecord`` "arrays") and a ``MetricRecord`` "metrics".
  With ``audit`` on, the client mod ``fedledger.chain.mods.audit_mod`` (the one signing path
  of every ClientApp, ours or yours) adds the "audit" ``ConfigRecord``: the SHA-256 of the
  adapter and this node's Ethereum signature over (run id, round, hash).
- ``evaluate``: loss and perplexity of the received adapter on held-out text of this node's
  categories (the node never trained on it).
- ``query.identity``: this node's partition id and, when auditing, its signer address and a
  signature proving it holds that key (``fedledger.identity``); asked once per node, so the
  server never reads a partition id from a train reply.
- Serverless exchanges (ring / gossip) register their own message handlers from
  ``fedledger.client_peer``; KD-FedLLM and Split-FedLLM theirs from ``fedledger.client_kd``
  (``train.kd``, ``query.kd_logits``, ``train.kd_distill``, ``query.kd_evaluate``) and
  ``fedledger.client_split`` (``train.split``).

Model and data are loaded once per process (``fedledger.task``), never per round.
"""

from __future__ import annotations

import logging
import time

from . import logs

logs.quiet_libraries()  # before peft / bitsandbytes are imported: they log at import time

import numpy as np  # noqa: E402
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from fedledger.chain.mods import NodeKey, SigningKeyError, audit_mod, node_key  # noqa: E402
from fedledger.clients import model as model_lib  # noqa: E402
from fedledger.clients import train as train_lib  # noqa: E402
from fedledger.core.pipeline import to_record  # noqa: E402
from fedledger.core.update import decode_global  # noqa: E402

from . import identity  # noqa: E402
from .config import Settings  # noqa: E402
from .task import get_task  # noqa: E402

log = logging.getLogger("fedledger")
app = ClientApp(mods=[audit_mod])  # before the handlers: Flower binds app-level mods when each is decorated


def node_identity(context: Context) -> tuple[int, int]:
    """(partition id, number of partitions) from the node config (simulation or deployment)."""
    cfg = context.node_config
    try:
        return int(cfg["partition-id"]), int(cfg["num-partitions"])
    except KeyError:
        raise ValueError(
            "node config needs partition-id and num-partitions; start the SuperNode with "
            "--node-config \"partition-id=0 num-partitions=2\""
        ) from None


def train_local(msg: Message, context: Context) -> tuple[dict[str, np.ndarray], dict]:
    """Train from the adapter in ``msg["arrays"]``; return (new adapter, metrics)."""
    start = time.perf_counter()
    settings = Settings.cached(context.run_config)
    pid, num_partitions = node_identity(context)
    task = get_task(settings, num_partitions)
    global_adapter = decode_global(msg.content["arrays"])
    server_round = int(msg.content["config"].get("server-round", 0)) if "config" in msg.content else 0
    attack = settings.attack.name if pid in settings.attack.malicious else "none"
    data_attack = attack != "none" and _attacks().is_data_attack(attack)
    proximal_mu = float(msg.content["config"].get("proximal-mu", 0.0)) if "config" in msg.content else 0.0

    train_lib.reset_peak_rss()  # peak-rss-mb is this round's peak, not the process's
    model_lib.set_adapter(task.model, global_adapter)
    examples = task.examples("partition", pid, poisoned=attack if data_attack else None)
    seed = int(np.random.SeedSequence([settings.run.seed, pid, server_round]).generate_state(1)[0])
    t = settings.train
    stats = train_lib.train_steps(task.model, examples, task.pad_id, t.local_steps, t.batch_size,
                                  t.learning_rate, seed, proximal_mu=proximal_mu,
                                  anchor=global_adapter if proximal_mu > 0 else None)
    local = model_lib.get_adapter(task.model)
    if attack != "none" and not data_attack:
        local = _attacks().apply_update_attack(attack, local, global_adapter, np.random.default_rng(seed))
    seq_len = stats["train-tokens"] / max(1, t.local_steps * min(t.batch_size, len(examples)))
    metrics = {
        "num-examples": len(task.splits["partitions"][pid]),
        "train-loss": stats["train-loss"],
        "train-seconds": stats["train-seconds"],
        "tokens-per-second": stats["tokens-per-second"],
        "compute-seconds": time.perf_counter() - start,
        "flops": task.cost.train(stats["train-tokens"], int(round(seq_len))),
        "peak-rss-mb": train_lib.peak_rss_mb(),
    }
    train_lib.release_memory()  # what training freed goes back to the system before the next round
    return local, metrics


def _attacks():
    from fedledger.clients import attacks

    return attacks


def signing_key(context: Context) -> NodeKey | None:
    """This node's signing key (the mod's), or None when the run is not audited. Raises
    ``SigningKeyError`` (one line) when the node has no key it may sign with."""
    if Settings.cached(context.run_config).audit.ledger == "none":
        return None
    return node_key(context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    arrays, metrics = train_local(msg, context)
    content = RecordDict({"arrays": to_record(arrays), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)  # audit_mod signs it on the way out


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    settings = Settings.cached(context.run_config)
    pid, num_partitions = node_identity(context)
    task = get_task(settings, num_partitions)
    model_lib.set_adapter(task.model, decode_global(msg.content["arrays"]))
    mine = task.examples("heldout", categories=task.categories(pid))
    result = train_lib.evaluate(task.model, mine, task.pad_id, max_batches=settings.train.eval_batches)
    return Message(RecordDict({"metrics": MetricRecord(result)}), reply_to=msg)


def _register_peer_handlers() -> None:
    try:
        from fedledger import client_peer
    except ImportError:  # serverless handlers not installed
        return
    client_peer.register(app, train_local)


def _register_framework_handlers() -> None:
    from fedledger import client_kd, client_split

    client_kd.register(app, train_local)
    client_split.register(app)


identity.register(app, signing_key, key_errors=(SigningKeyError,))
_register_peer_handlers()
_register_framework_handlers()
