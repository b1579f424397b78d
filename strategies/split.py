"""Split-FedLLM over Flower: clients run the embeddings and the first k blocks, the server the rest.

One round (message type ``train.split``, handled in ``fedledger/client_split.py``), for every
client, ``local_steps + 1`` round trips:

    start     server -> client: the global client-side LoRA; the client draws batch 1, runs its
              k blocks, replies with the activations at the cut (fp32 or fp16), the attention
              mask and the labels (the simple form: labels travel; see ``clients/split.py`` for
              the U-shaped variant)
    step s    for each client in partition order, the server finishes the forward pass on its
              activations, takes the loss, back-propagates to the cut and steps its own LoRA
              (one shared server part, serialised in that fixed order: a run is reproducible);
              then server -> client: dL/dh of step s-1; the client recomputes that forward,
              back-propagates, steps its LoRA, and replies with step s's activations
    finish    the last gradient; the client steps and replies with its client-side adapter,
              the digest of every activation message it sent this round (``core.digest``) and,
              on an audited run, its signature over both

The server checks each activation message at the boundary (names, dtypes, shapes, finite
values, mask and label values) and keeps the same digest chain over what it received; an
adapter whose signed digest differs is refused. A client that stops answering (or sends a
malformed message) is skipped for the rest of that round; its server steps already taken stay.
The client-side adapters are averaged with Flower's FedAvg (weighted by examples) through the
same ``core`` code the hub pipeline and the auditor's replay run, so the audit recomputes that
aggregate bit-exactly; the server part is recorded by hash and reported as not recomputed
(its inputs, the activations, are not kept: they can be inverted).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedledger.core.digest import GENESIS, chain_digest, digest_hex
from fedledger.core.pipeline import (
    RoundReport, aggregate_contributions, describe_strategy, fill_report, identify_updates, reply_metadata, to_record,
    verify_updates,
)
from fedledger.core.trust import apply_decision
from fedledger.core.update import (
    AUDIT_KEY, BoundaryError, Layout, Rejected, decode_array, decode_global, decode_replies,
)

from .framework import FrameworkRunner, RoundOutcome, RoundTally, RunContext

log = logging.getLogger("fedledger")

MESSAGE_TYPE = "train.split"
DIGEST = "activations-digest"
WIRE = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}


class SplitServerPart(Protocol):
    """The server's half of the model (``fedledger.clients.split.SplitServer``)."""

    flops: float
    vocab_size: int
    hidden_size: int

    def step(self, hidden: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray, seed: int
             ) -> tuple[np.ndarray, float]: ...

    def arrays(self) -> dict[str, np.ndarray]: ...


def decode_activations(msg: Message, dtype: np.dtype, hidden_size: int, vocab_size: int, max_batch: int,
                       max_length: int) -> dict[str, np.ndarray]:
    """A client's activation message -> its three arrays (read-only views); BoundaryError otherwise."""
    if msg.has_error():
        raise BoundaryError(f"client error: {msg.error.reason}")
    record = msg.content.array_records.get("activations")
    if record is None or set(record.keys()) != {"hidden", "attention-mask", "labels"}:
        raise BoundaryError("an activation message holds one ArrayRecord 'activations' with hidden, attention-mask, "
                            "labels")
    shape = tuple(getattr(record["hidden"], "shape", ()))
    if len(shape) != 3 or shape[2] != hidden_size or not 1 <= shape[0] <= max_batch or not 1 <= shape[1] <= max_length:
        raise BoundaryError(f"hidden: shape {shape} is not (batch <= {max_batch}, tokens <= {max_length}, "
                            f"{hidden_size})")
    hidden = decode_array("hidden", record["hidden"], shape, dtype)
    mask = decode_array("attention-mask", record["attention-mask"], shape[:2], np.dtype("<i4"))
    labels = decode_array("labels", record["labels"], shape[:2], np.dtype("<i4"))
    if not np.isin(mask, (0, 1)).all() or not mask[:, 0].all():
        raise BoundaryError("attention-mask: values must be 0/1 with the first token attended")
    if ((labels != -100) & ((labels < 0) | (labels >= vocab_size))).any():
        raise BoundaryError(f"labels: values must be -100 or token ids in [0, {vocab_size})")
    return {"hidden": hidden, "attention-mask": mask, "labels": labels}


class SplitRunner(FrameworkRunner):
    """Split-FedLLM rounds (see the module docstring)."""

    name = "split"
    framework = "split-fedllm"

    def __init__(self, server_part: SplitServerPart, topology, *, split_layer: int, client_names: Sequence[str],
                 dtype: str = "float32", batch_size: int = 8, max_length: int = 128, **kw) -> None:
        super().__init__(topology, **kw)
        if dtype not in WIRE:
            raise ValueError(f"split-dtype {dtype!r} is not one of {', '.join(WIRE)}")
        if not client_names:
            raise ValueError("the client side holds no LoRA tensor: nothing to train or average")
        self.server_part, self.split_layer, self.dtype = server_part, int(split_layer), dtype
        self.client_names = list(client_names)
        self.batch_size, self.max_length = int(batch_size), int(max_length)
        self.rule = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_evaluate_nodes=0,
                           min_available_nodes=1)

    def describe(self) -> dict:
        return {"framework": self.framework, "split-layer": self.split_layer, "split-dtype": self.dtype,
                "rule": describe_strategy(self.rule), "trust": None, "max-examples": self.max_examples,
                "layout": [[n, list(v.shape), v.dtype.str] for n, v in self._global.items()]}

    def begin(self, run: RunContext) -> None:
        initial = decode_global(run.initial)
        missing = [n for n in self.client_names if n not in initial]
        if missing:
            raise ValueError(f"the initial adapter has no client-side tensor {missing[0]}")
        self._global = {n: initial[n] for n in self.client_names}
        self._layout = Layout.of(self._global)
        self._reply_layout = Layout({**self._layout.specs, DIGEST: ((32,), np.dtype("uint8"))})

    def initial_global(self):
        return self._global     # the client-side adapter: what round 1's first message carries

    def current_global(self):
        return self._global

    # ------------------------------------------------------------------ one round
    def run_round(self, run: RunContext, server_round: int, tally: RoundTally) -> RoundOutcome:
        report = RoundReport(server_round)
        self._instruction = self.instruction(server_round)   # audited: every train.split message carries it
        active, rejected = list(run.peers), []
        digests = {p: GENESIS for p in active}
        messages = {p: 0 for p in active}
        grads: dict[int, np.ndarray] = {}
        losses: list[float] = []
        final: dict[int, Message] = {}
        for step in range(1, self.local_steps + 2):
            replies = tally.send({p: self._content(run, server_round, step, grads.get(p)) for p in active},
                                 server_round, MESSAGE_TYPE)
            gone = [p for p in active if p not in replies]
            for p, reason in sorted(getattr(run.relay, "last_errors", {}).items()):   # e.g. a failed chain check
                rejected.append(Rejected(run.relay.node_of[p], f"step {step}: client error: {reason}"))
            if gone:
                log.warning("split: round %s step %s: no answer from partitions %s; skipped for the rest of the round",
                            server_round, step, gone)
            active = [p for p in active if p in replies]
            if step > self.local_steps:
                final = replies
                break
            for p in sorted(active):  # the server part steps once per client, in partition order
                try:
                    acts = decode_activations(replies[p], WIRE[self.dtype], self.server_part.hidden_size,
                                              self.server_part.vocab_size, self.batch_size, self.max_length)
                except BoundaryError as exc:
                    rejected.append(Rejected(run.relay.node_of[p], f"step {step}: {exc}"))
                    active.remove(p)
                    continue
                digests[p] = chain_digest(digests[p], acts)
                messages[p] += 1
                with tally.server_work():
                    grads[p], loss = self.server_part.step(acts["hidden"], acts["attention-mask"], acts["labels"],
                                                           seed=self._seed(server_round, step, p))
                losses.append(loss)

        updates, refused = decode_replies([final[p] for p in active], self._reply_layout, self.max_examples)
        updates, refused = identify_updates(self.identities, updates, refused + rejected)
        updates, refused = self._check_digests(run, updates, refused, digests)
        if self.trail is not None:
            updates, refused = verify_updates(self.trail, server_round, updates, refused)
            self.trail.record(server_round, self._global, updates, refused)
        with tally.server_work():
            entries = [(u.identity.key, {n: u.arrays[n] for n in self.client_names}, u.num_examples) for u in updates]
            contributions = apply_decision(entries, self._global, None)
            by_key = {u.identity.key: u for u in updates}
            aggregate, metrics, error = aggregate_contributions(
                self.rule, server_round, contributions,
                [reply_metadata(by_key[c.key].node_id, server_round) for c in contributions], self._layout)
        fill_report(report, updates, refused, None, len(contributions), metrics, error)
        report.sent, report.received = len(run.peers), len(final)
        if aggregate is not None:
            self._global = aggregate
        elif updates:
            log.warning("round %s: split aggregated nothing (%s); the client-side adapter is unchanged", server_round,
                        error)
        by_partition = {p: {"messages": messages[p], "digest": digests[p]} for p in run.peers if messages[p]}
        report.record = {"framework": self.framework, "split-layer": self.split_layer, "split-dtype": self.dtype,
                         "activations": {str(p): v for p, v in by_partition.items()},
                         "server-steps": len(losses)}
        if self.trail is not None:
            report.record["server-part-hash"] = self.trail.artifact(server_round, "server-part",
                                                                    self.server_part.arrays())
            self.trail.commit(server_round, aggregate, report)
        entry = {"split-layer": self.split_layer, "split-dtype": self.dtype, "server-steps": len(losses),
                 "server-loss": float(np.mean(losses)) if losses else None, "server-flops": self.server_part.flops}
        full = to_record({**self._global, **self.server_part.arrays()})
        return RoundOutcome(to_record(self._global), full, report, entry)

    def final(self, current):
        return to_record({**self._global, **self.server_part.arrays()})

    # ------------------------------------------------------------------ pieces
    def _seed(self, server_round: int, step: int, partition: int) -> int:
        return int(np.random.SeedSequence([self.seed, server_round, step, partition, 0x5B17]).generate_state(1)[0])

    def _content(self, run: RunContext, server_round: int, step: int, grad: np.ndarray | None) -> RecordDict:
        cfg = {**dict(run.train_config), "server-round": server_round, "step": step, "local-steps": self.local_steps,
               "split-layer": self.split_layer, "split-dtype": self.dtype}
        content = RecordDict({"config": ConfigRecord(cfg)})
        if getattr(self, "_instruction", None) is not None:
            content[AUDIT_KEY] = self._instruction
        if step == 1:
            content["arrays"] = to_record(self._global)
        if grad is not None:
            content["grad"] = ArrayRecord({"grad": Array(np.ascontiguousarray(grad))})
        return content

    @staticmethod
    def _check_digests(run: RunContext, updates, refused, digests: Mapping[int, str]):
        """Refuse an adapter whose signed activation digest is not what the server received."""
        out = []
        for u in updates:
            p = u.identity.partition
            got = digest_hex(u.arrays[DIGEST])
            if p is None or got != digests.get(p):
                refused.append(Rejected(u.node_id, f"activations digest {got[:12]}... is not the digest of the "
                                                   f"activation messages the server received", "boundary", u.identity))
                continue
            out.append(u)
        return out, refused


__all__ = ["DIGEST", "MESSAGE_TYPE", "SplitRunner", "SplitServerPart", "decode_activations"]
