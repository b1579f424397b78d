"""KD-FedLLM over Flower: clients share top-k logits on a public set; knowledge moves by distillation.

One round, three exchanges (message types routed to ``fedledger/client_kd.py``):

1. ``train.kd``: every client fine-tunes its LoRA adapter on its private data (variant
   ``server``: starting from the global adapter the message carries; variant ``client``: from
   its own adapter, kept in its node state; round 1 carries the initial adapter);
2. ``query.kd_logits``: the server names a public batch (only example ids cross the wire, as
   an int32 array, with ``k`` and the temperature in the config); each client replies with
   its top-k logits at every answer position of those examples (``core.softlabels``), signed
   when the run is audited. Replies are decoded once at the boundary (wrong shape, NaN, ids
   outside the vocabulary, k larger than asked: rejected with the reason, the round goes on),
   identified, verified and recorded like adapter updates; PageRank trust (``trust="pagerank"``)
   scores each client's soft-label vector with the same ``PageRankScorer`` that scores adapters
   (the vector: its sparse distribution laid out on the union of every reply's support, minus
   the server model's own distribution there); the kept replies are aggregated
   examples-weighted (``core.softlabels.aggregate``: the rule the audit replays);
3. variant ``server``: the server distils the aggregated soft labels into the global adapter
   (KL on the public batch) and broadcasts it with the next round's ``train.kd``; variant
   ``client``: ``train.kd_distill`` sends the soft labels to every client, which distils them
   into its own adapter (no adapter ever crosses the wire after round 1).

When each fits: ``server`` keeps one global model (what the audit can chain from round to
round; clients start every round from the same point, the downlink carries an adapter);
``client`` suits clients that must keep their own models (different private data, no common
model at all, an uplink *and* downlink of logits only) and the server never holds a trained
model; its quality is the mean of the clients' own models, which they evaluate themselves
(``query.kd_evaluate``).

Audited (variant ``server`` only; ``client`` with an audit is refused at start-up): ``train.kd``
and the logit query carry the round's ``audit`` instruction; a client checks the chain before it
trains and signs its logit reply with the EIP-712 commitment of an adapter update (update hash =
the reply's arrays, global hash = the adapter ``train.kd`` carried, num-examples = its weight).
The round commits the **next global adapter** as its aggregate (so the chain's current global is
what the next round sends) and names the soft labels by hash (``soft-labels-hash``).

The server-side ML (distillation, the server model's distribution for trust) is handed in as a
:class:`KDServer` (the glue builds it from ``clients/distill.py``), so this module stays free
of torch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedledger.core import softlabels
from fedledger.core.pipeline import RoundReport, fill_report, identify_updates, to_record, verify_updates
from fedledger.core.trust import apply_decision
from fedledger.core.update import AUDIT_KEY, Rejected, decode_global

from .framework import FrameworkRunner, RoundOutcome, RoundTally, RunContext

log = logging.getLogger("fedledger")

VARIANTS = ("server", "client")
TRAIN, LOGITS, DISTIL, EVALUATE = "train.kd", "query.kd_logits", "train.kd_distill", "query.kd_evaluate"
SOFT_KEY = "soft-labels"   # the single "tensor" a soft-label vector is to the trust scorer


class KDServer(Protocol):
    """What the KD runner needs from the server's model (see ``fedledger.frameworks.KDServerModel``)."""

    vocab_size: int
    public_size: int

    def rows(self, public_ids: Sequence[int]) -> int:
        """Answer positions of these public examples (the rows every reply must have)."""

    def base_probs(self, arrays: Mapping[str, np.ndarray], public_ids: Sequence[int], keys: np.ndarray,
                   temperature: float) -> np.ndarray:
        """The model's ``softmax(logits / T)`` with ``arrays`` at (row, token) ``keys``."""

    def distil(self, arrays: Mapping[str, np.ndarray], public_ids: Sequence[int], soft: Mapping[str, np.ndarray],
               seed: int) -> tuple[dict[str, np.ndarray], dict]:
        """``arrays`` distilled toward ``soft``: (new adapter, metrics incl. ``flops``)."""


class KDRunner(FrameworkRunner):
    """KD-FedLLM rounds (see the module docstring)."""

    name = "kd"
    framework = "kd-fedllm"

    def __init__(self, server: KDServer, topology, *, variant: str = "server", k: int = 8, temperature: float = 2.0,
                 public_batch: int = 32, trust=None, **kw) -> None:
        super().__init__(topology, **kw)
        if variant not in VARIANTS:
            raise ValueError(f"kd-variant {variant!r} is not one of {', '.join(VARIANTS)}")
        if int(k) < 1 or not float(temperature) > 0 or int(public_batch) < 1:
            raise ValueError(f"kd needs k >= 1, temperature > 0 and public_batch >= 1, got {k}, {temperature}, "
                             f"{public_batch}")
        if server.public_size < 1:
            raise ValueError("kd needs a public set; the server has none")
        if int(k) == server.vocab_size:
            log.warning("kd-top-k=%s is the whole vocabulary: every reply carries %s logits per position (large)",
                        k, server.vocab_size)
        self.server, self.variant, self.k, self.temperature = server, variant, int(k), float(temperature)
        self.public_batch = min(int(public_batch), server.public_size)
        self.trust = trust  # a PageRankScorer (clip=False, reweight=False) or None

    # ------------------------------------------------------------------ the record
    def describe(self) -> dict:
        return {"framework": self.framework, "kd-variant": self.variant,
                "rule": softlabels.describe(self.k, self.temperature, self.server.vocab_size),
                "trust": self.trust.describe() if self.trust is not None else None,
                "max-examples": self.max_examples,
                "layout": [[n, list(v.shape), v.dtype.str] for n, v in self._initial.items()],
                "public": {"size": self.server.public_size, "batch": self.public_batch}}

    def begin(self, run: RunContext) -> None:
        self._initial = decode_global(run.initial)
        self._global = dict(self._initial)
        self._synced: set[int] = set()  # variant client: peers that hold an adapter of their own

    def public_ids(self, server_round: int) -> tuple[int, ...]:
        """The public batch of a round: drawn with the run's seed (the server and an auditor agree)."""
        rng = np.random.default_rng([self.seed, server_round, 0x6B64])
        return tuple(int(i) for i in rng.choice(self.server.public_size, size=self.public_batch, replace=False))

    # ------------------------------------------------------------------ one round
    def initial_global(self):
        return self._global

    def current_global(self):
        return self._global

    def run_round(self, run: RunContext, server_round: int, tally: RoundTally) -> RoundOutcome:
        report = RoundReport(server_round)
        instruction = self.instruction(server_round)   # audited: train.kd and the logit query carry it
        trained = tally.send(self._train_contents(run, server_round, instruction), server_round, TRAIN)
        # a node that refused to train (e.g. its chain check failed) is not asked for logits; its reason is kept
        refused = [Rejected(run.relay.node_of[p], f"train: client error: {reason}")
                   for p, reason in sorted(getattr(run.relay, "last_errors", {}).items())]
        ids = self.public_ids(server_round)
        query = softlabels.LogitQuery(ids, self.server.rows(ids), self.k, self.temperature, self.server.vocab_size)
        replies = tally.send({p: self._query_content(query, server_round, instruction) for p in sorted(trained)},
                             server_round, LOGITS)
        report.sent, report.received = len(trained), len(replies)

        updates, rejected = softlabels.decode_logit_replies(replies.values(), query, self.max_examples)
        rejected = refused + list(rejected)
        updates, rejected = identify_updates(self.identities, updates, rejected)
        if self.trail is not None:
            updates, rejected = verify_updates(self.trail, server_round, updates, rejected)
            self.trail.record(server_round, self._global, updates, rejected)
        with tally.server_work():
            decision = self._decide(server_round, updates, query) if (self.trust is not None and updates) else None
            contributions = apply_decision([(u.identity.key, u.arrays, u.num_examples) for u in updates], {}, decision)
            soft = softlabels.aggregate(contributions, self.temperature, self.server.vocab_size)
        metrics = _mean_metrics(trained)
        fill_report(report, updates, rejected, decision, len(contributions), metrics, None)
        if soft is None:
            log.warning("round %s: no logit reply to aggregate; nothing is distilled", server_round)
        entry = {"kd-variant": self.variant, "public-ids": list(ids), "rows": query.rows,
                 "soft-label-width": int(soft[softlabels.PROBS].shape[1]) if soft is not None else 0}
        new_global, evaluate = None, None
        if soft is not None and self.variant == "server":
            with tally.server_work():
                new_global, dmetrics = self.server.distil(self._global, ids, soft, seed=self._seed(server_round))
            entry["server-flops"] = float(dmetrics.get("flops", 0.0))
            entry["distil-loss"] = dmetrics.get("distil-loss")
            self._global = new_global
        elif soft is not None:
            distilled = tally.send({p: self._distil_content(query, soft, server_round) for p in sorted(trained)},
                                   server_round, DISTIL)
            entry["distil-loss"] = _mean_metrics(distilled).get("distil-loss")
        report.record = {"framework": self.framework, "kd-variant": self.variant, "query": query.to_dict(),
                         "server-distilled": new_global is not None}
        if self.trail is not None and soft is not None:  # the replies' aggregate, which the audit recomputes
            report.record["soft-labels-hash"] = self.trail.artifact(server_round, "soft-labels", soft)
        if self.variant == "server":
            evaluate = to_record(self._global)
        else:
            entry["client-eval"] = self._client_evaluation(run, server_round, sorted(trained))
        if self.trail is not None:  # the committed aggregate is the next global: the chain's current global
            self.trail.commit(server_round, self._global, report)
        return RoundOutcome(to_record(self._global) if self.variant == "server" else None, evaluate, report, entry)

    def final(self, current):
        return to_record(self._global) if self.variant == "server" else None

    # ------------------------------------------------------------------ pieces
    def _seed(self, server_round: int) -> int:
        return int(np.random.SeedSequence([self.seed, server_round, 0x6B64]).generate_state(1)[0])

    def _train_contents(self, run: RunContext, server_round: int, instruction=None) -> dict[int, RecordDict]:
        cfg = ConfigRecord({**dict(run.train_config), "server-round": server_round, "kd-variant": self.variant})
        out = {}
        for p in run.peers:
            content = RecordDict({"config": cfg})
            if instruction is not None:
                content[AUDIT_KEY] = instruction
            if self.variant == "server" or p not in self._synced:
                content["arrays"] = to_record(self._global if self.variant == "server" else self._initial)
            out[p] = content
        if self.variant == "client":
            self._synced |= set(run.peers)
        return out

    @staticmethod
    def _query_content(query: softlabels.LogitQuery, server_round: int, instruction=None) -> RecordDict:
        ids = np.asarray(query.public_ids, dtype=np.int32)
        content = RecordDict({"query": ArrayRecord({softlabels.PUBLIC_IDS: Array(ids)}),
                              "config": ConfigRecord({"server-round": server_round, "k": query.k,
                                                      "temperature": query.temperature})})
        if instruction is not None:
            content[AUDIT_KEY] = instruction
        return content

    @staticmethod
    def _distil_content(query, soft: Mapping[str, np.ndarray], server_round: int) -> RecordDict:
        ids = np.asarray(query.public_ids, dtype=np.int32)
        return RecordDict({"query": ArrayRecord({softlabels.PUBLIC_IDS: Array(ids)}),
                           SOFT_KEY: ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in soft.items()}),
                           "config": ConfigRecord({"server-round": server_round, "temperature": query.temperature})})

    def _decide(self, server_round: int, updates, query):
        """PageRank trust on the soft-label vectors: the same scorer as for adapters, one "tensor"
        per client (its distribution on the union support) and the server model's as the global."""
        keys = softlabels.support([u.arrays for u in updates], query.vocab_size)
        base = self.server.base_probs(self._global, query.public_ids, keys, query.temperature)
        vectors = [replace(u, arrays={SOFT_KEY: softlabels.dense_on(keys, u.arrays, query.temperature,
                                                                     query.vocab_size)}) for u in updates]
        return self.trust.decide(server_round, vectors, {SOFT_KEY: base})

    def _client_evaluation(self, run: RunContext, server_round: int, peers) -> dict:
        """Variant client: each client evaluates its own adapter on the held-out split; the mean."""
        replies = run.relay.send({p: RecordDict({"config": ConfigRecord({"server-round": server_round})})
                                  for p in peers}, server_round, EVALUATE)
        per = {}
        for p, reply in sorted(replies.items()):
            m = reply.content.metric_records.get("metrics")
            if m is not None:
                per[str(p)] = {k: float(v) for k, v in m.items() if isinstance(v, (int, float))}
        keys = set.intersection(*(set(v) for v in per.values())) if per else set()
        mean = {k: float(np.mean([v[k] for v in per.values()])) for k in sorted(keys)}
        return {"mean": mean, "clients": per}


def _mean_metrics(replies) -> dict:
    vals: dict[str, list] = {}
    for reply in replies.values():
        m = reply.content.metric_records.get("metrics")
        for k, v in (m or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                vals.setdefault(k, []).append(float(v))
    return {k: float(np.mean(v)) for k, v in vals.items()}


__all__ = ["DISTIL", "EVALUATE", "KDRunner", "KDServer", "LOGITS", "TRAIN", "VARIANTS"]
