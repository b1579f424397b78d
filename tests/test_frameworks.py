"""KD-FedLLM and Split-FedLLM through the real ServerApp and ClientApp, in-process (random 64-bit node
ids, the tiny model): both KD variants, malformed logit replies and activation messages refused
with their reasons while the round goes on, PageRank trust on soft labels, a split client that
stops mid-round, the per-client accounting, and audited runs where the aggregator is the attacker."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict

from fedledger import server_app
from fedledger.chain.audit import audit_run
from fedledger.client_app import app as client_app
from fedledger.core import softlabels
from fedledger.inprocess import InProcessGrid

from .conftest import TINY
from .replies import npy

BASE = {**TINY, "num-rounds": 1, "local-steps": 2, "task-eval-size": 0, "heldout-fraction": 0.03,
        "kd-public-size": 32, "kd-public-batch": 8, "kd-distil-steps": 2, "split-layer": 1}


def _run(tmp_path, cfg, num_nodes=3, grid_cls=InProcessGrid, **grid_kw):
    cfg = {**BASE, "run-dir": str(tmp_path / "runs"), **cfg}
    grid = grid_cls(client_app, num_nodes, cfg, run_id=7, seed=11, **grid_kw)
    folder = server_app.run(grid, Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config=cfg),
                            settle=0.0)
    with open(os.path.join(folder, "metrics.json")) as fh:
        return grid, folder, json.load(fh)


def _clients(m, rnd):
    return {int(p): c for p, c in m["rounds"][str(rnd)]["clients"].items()}


def _adapter_bytes(m) -> int:
    return m["rounds"]["1"]["clients"]["0"]["bytes-down"]


class ReplyFilter(InProcessGrid):
    """A grid whose ``edit(msg, partition, reply)`` may replace a node's reply to ``msg``."""

    edit = None

    def _handle(self, msg):
        reply = super()._handle(msg)
        if reply is None or self.edit is None or reply.has_error():
            return reply
        return self.edit(msg, self.partition_of[msg.metadata.dst_node_id], reply)


def _with_arrays(msg: Message, reply: Message, key: str, arrays: dict) -> Message:
    """``reply`` with its ArrayRecord ``key`` replaced by ``arrays`` (still a reply to ``msg``)."""
    content = RecordDict({k: v for k, v in reply.content.items() if k != key})
    content[key] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return Message(content, reply_to=msg)


# ---------------------------------------------------------------------------- KD
@pytest.fixture(scope="module")
def kd_server_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("kd-server"), {"strategy": "kd", "num-rounds": 2, "audit": "eth-tester"})


def test_kd_server_distils_into_the_global_adapter_and_lowers_heldout_loss(kd_server_run):
    _, _, m = kd_server_run
    losses = [m["rounds"][r]["central"]["eval-loss"] for r in ("0", "1", "2")]
    assert losses[2] < losses[0], losses
    assert m["framework"] == "kd-fedllm"
    for rnd in (1, 2):
        report = m["rounds"][str(rnd)]["report"]
        assert report["aggregated"] == 3 and not report["rejected"]
        ex = m["rounds"][str(rnd)]["exchange"]
        rows, k = ex["rows"], 8
        for c in _clients(m, rnd).values():
            assert c["round-trips"] == 2  # train, logit query
            # fp16 values + int32 ids + the public ids, as npy (what the hub counts for every mode)
            assert c["bytes-up"] == len(npy(np.zeros((rows, k), np.float16))) + \
                len(npy(np.zeros((rows, k), np.int32))) + len(npy(np.zeros(8, np.int32)))
            assert c["compute-seconds"] > 0 and c["flops"] > 0 and c["peak-rss-mb"] > 0
        assert m["rounds"][str(rnd)]["server-seconds"] > 0 and ex["server-flops"] > 0


def test_kd_server_audit_replays_the_soft_labels_and_names_the_distillation_as_not_recomputed(kd_server_run):
    _, folder, _ = kd_server_run
    report = audit_run(folder)
    assert not report.problems, report.table()
    assert "KD-FedLLM" in report.framework and "server distils" in report.framework
    soft = [r for r in report.rows if r.kind == "aggregate"]
    assert [(r.client, r.detail) for r in soft] == [
        ("soft-labels", "SoftLabelAverage recomputed bit-exactly from the signed logit replies")] * 2
    # the committed aggregate is the next global adapter (the chain's current global for the next round)
    assert [(r.client, r.status) for r in report.rows if r.kind == "server"] == [("next-global", "NOT-RECOMPUTED")] * 2
    assert sum(r.status == "OK" and r.kind == "update" for r in report.rows) == 6
    assert report.exit_code == 3 and "2 server step(s) NOT RECOMPUTED" in report.verdict


def test_kd_audit_catches_an_altered_logit_reply_and_next_global(kd_server_run, tmp_path):
    _, folder, _ = kd_server_run
    copy = shutil.copytree(folder, tmp_path / "copy")
    updates = sorted((copy / "audit" / "round-0002" / "updates").iterdir())
    data = bytearray(updates[0].read_bytes())
    data[-2] ^= 0x01
    updates[0].write_bytes(bytes(data))
    nxt = copy / "audit" / "round-0001" / "aggregate.safetensors"   # the next global adapter
    data = bytearray(nxt.read_bytes())
    data[-5] ^= 0x01
    nxt.write_bytes(bytes(data))
    bad = {(r.round, r.client.lower(), r.status) for r in audit_run(str(copy)).problems}
    assert (2, updates[0].name.split(".")[0], "MISMATCH") in bad
    assert (1, "aggregate", "MISMATCH") in bad


def test_kd_aggregator_that_leaves_a_reply_out_of_the_soft_labels_is_caught(tmp_path, monkeypatch):
    """The aggregator records all three logit replies but aggregates only two: the audit's replay
    of the recorded replies gives other soft labels than the committed ones."""
    from fedledger.strategies import kd as kd_lib

    honest = softlabels.aggregate
    monkeypatch.setattr(kd_lib.softlabels, "aggregate", lambda cs, t, v: honest(cs[:-1], t, v))
    _, folder, _ = _run(tmp_path, {"strategy": "kd", "audit": "eth-tester"})
    monkeypatch.undo()
    report = audit_run(folder)
    assert [(r.round, r.client, r.status) for r in report.problems] == [(1, "soft-labels", "MISMATCH")], report.table()
    assert "SoftLabelAverage" in report.problems[0].detail


def test_kd_aggregator_that_broadcasts_another_adapter_than_it_recorded_is_caught(tmp_path, monkeypatch):
    from fedledger.strategies.kd import KDRunner

    real = KDRunner.run_round

    def swapped(self, run, server_round, tally):
        if server_round == 2:  # round 1 committed its next global; round 2 sends (and names) another one
            self._global = {k: v + 0.01 for k, v in self._global.items()}
        return real(self, run, server_round, tally)

    monkeypatch.setattr(KDRunner, "run_round", swapped)
    _, folder, _ = _run(tmp_path, {"strategy": "kd", "num-rounds": 2, "audit": "eth-tester"})
    monkeypatch.undo()
    problems = audit_run(folder).problems
    assert (2, "global", "MISMATCH") in [(r.round, r.client, r.status) for r in problems], problems
    assert any("but the chain opened it from" in r.detail for r in problems if r.client == "global")
    # the clients signed the adapter they were sent, not the chain's current global: every record shows it
    signed = [r for r in problems if r.kind == "update"]
    assert len(signed) == 3 and all("it was sent another model" in r.detail for r in signed)


def test_kd_client_variant_keeps_adapters_on_the_clients(tmp_path):
    grid, folder, m = _run(tmp_path, {"strategy": "kd", "kd-variant": "client", "num-rounds": 2})
    adapter = _adapter_bytes(m)  # round 1: the initial adapter goes out once
    for p, c in _clients(m, 2).items():
        assert c["round-trips"] == 3  # train, logit query, distil
        assert 0 < c["bytes-down"] < adapter / 3  # public ids + soft labels only
    assert m["rounds"]["2"]["central"]["source"] == "mean of the clients' own models"
    assert not os.path.exists(os.path.join(folder, "adapter"))
    own = [ctx.state["kd.adapter"] for ctx in grid.contexts.values()]
    first = {k: v.numpy() for k, v in own[0].items()}
    assert any(not np.array_equal(first[k], v.numpy()) for other in own[1:] for k, v in other.items())
    # not audited: with no global model there is nothing for a client to sign and check on chain
    # (an audit is refused at start-up, tests/test_frameworks_config.py)
    assert m["ledger"] is None


MALFORMED = {1: ("nan", "NaN/Inf"), 2: ("k", "larger than the k=8 asked"), 3: ("vocab", "outside the vocabulary"),
             4: ("shape", "shape")}


def test_malformed_logit_replies_are_rejected_with_their_reasons_and_the_round_goes_on(tmp_path):
    def corrupt(msg, partition, reply):
        if msg.metadata.message_type != "query.kd_logits" or partition not in MALFORMED:
            return reply
        kind = MALFORMED[partition][0]
        a = {k: v.numpy().copy() for k, v in reply.content["logits"].items()}
        if kind == "nan":
            a[softlabels.VALUES][0, 0] = np.nan
        elif kind == "k":
            a[softlabels.VALUES] = np.concatenate([a[softlabels.VALUES], a[softlabels.VALUES][:, :1]], axis=1)
            a[softlabels.IDS] = np.concatenate([a[softlabels.IDS], (a[softlabels.IDS][:, :1] + 1) % 100], axis=1)
        elif kind == "vocab":
            a[softlabels.IDS][2, 3] = 10**6
        else:
            a[softlabels.VALUES], a[softlabels.IDS] = a[softlabels.VALUES][1:], a[softlabels.IDS][1:]
        return _with_arrays(msg, reply, "logits", a)

    grid_cls = type("Corrupt", (ReplyFilter,), {"edit": staticmethod(corrupt)})
    _, _, m = _run(tmp_path, {"strategy": "kd"}, num_nodes=5, grid_cls=grid_cls)
    report = m["rounds"]["1"]["report"]
    rejected = {r["partition"]: r["reason"] for r in report["rejected"]}
    assert sorted(rejected) == [1, 2, 3, 4]
    for p, (_, reason) in MALFORMED.items():
        assert reason in rejected[p], (p, rejected[p])
    assert report["aggregated"] == 1 and [k["partition"] for k in report["kept"]] == [0]
    assert m["rounds"]["1"]["central"]["eval-loss"] > 0


def test_pagerank_trust_scores_soft_labels_and_leaves_out_a_client_sending_noise(tmp_path):
    def noise(msg, partition, reply):
        if msg.metadata.message_type != "query.kd_logits" or partition != 0:
            return reply
        a = {k: v.numpy().copy() for k, v in reply.content["logits"].items()}
        rng = np.random.default_rng(0)
        rows, k = a[softlabels.IDS].shape
        a[softlabels.IDS] = np.stack([rng.choice(1000, size=k, replace=False) for _ in range(rows)]).astype(np.int32)
        a[softlabels.VALUES] = (10 * rng.standard_normal((rows, k))).astype(np.float16)
        return _with_arrays(msg, reply, "logits", a)

    grid_cls = type("Noise", (ReplyFilter,), {"edit": staticmethod(noise)})
    _, _, m = _run(tmp_path, {"strategy": "kd", "trust": "pagerank"}, num_nodes=4, grid_cls=grid_cls)
    trust = m["rounds"]["1"]["trust"]
    assert trust["excluded"] == ["partition-0"], trust
    assert trust["scores"]["partition-0"] < min(v for k, v in trust["scores"].items() if k != "partition-0")
    assert m["rounds"]["1"]["report"]["aggregated"] == 3


# ---------------------------------------------------------------------------- split
@pytest.fixture(scope="module")
def split_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("split"), {"strategy": "split", "num-rounds": 2, "audit": "eth-tester"})


def test_split_trains_both_halves_and_lowers_heldout_loss(split_run):
    _, folder, m = split_run
    losses = [m["rounds"][r]["central"]["eval-loss"] for r in ("0", "1", "2")]
    assert losses[2] < losses[0], losses
    for rnd in (1, 2):
        ex = m["rounds"][str(rnd)]["exchange"]
        assert ex["server-steps"] == 3 * 2 and ex["participants"] == [0, 1, 2]
        for c in _clients(m, rnd).values():
            assert c["round-trips"] == 2 + 1  # local steps + the round-end adapter
            assert c["bytes-up"] > c["bytes-down"] > 0 and c["flops"] > 0
    assert os.path.exists(os.path.join(folder, "adapter", "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def fedavg_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("fedavg"), {"strategy": "fedavg", "task-eval-size": 4})


def test_split_clients_compute_less_than_fedavg_clients(split_run, fedavg_run):
    _, _, split = split_run
    _, _, fedavg = fedavg_run
    flops = lambda m: np.mean([c["flops"] for c in _clients(m, 1).values()])  # noqa: E731
    assert flops(split) < flops(fedavg)


def test_split_audit_recomputes_the_client_side_fedavg_and_reports_the_server_part(split_run):
    _, folder, _ = split_run
    report = audit_run(folder)
    assert not report.problems, report.table()
    assert "Split-FedLLM" in report.framework and "cut after block 1" in report.framework
    assert [r.detail for r in report.rows if r.kind == "aggregate"] == ["FedAvg recomputed bit-exactly"] * 2
    server = [r for r in report.rows if r.kind == "server"]
    assert [r.status for r in server] == ["NOT-RECOMPUTED"] * 2 and "can be inverted" in server[0].detail
    assert all("activations digest" in r.detail for r in report.rows if r.kind == "update")


def test_split_aggregator_that_averages_dishonestly_is_caught(tmp_path, monkeypatch):
    from fedledger.strategies import split as split_lib

    honest = split_lib.aggregate_contributions

    def skewed(*a, **kw):
        out, metrics, error = honest(*a, **kw)
        return {k: v * np.float32(1.01) for k, v in out.items()}, metrics, error

    monkeypatch.setattr(split_lib, "aggregate_contributions", skewed)
    _, folder, _ = _run(tmp_path, {"strategy": "split", "audit": "eth-tester"})
    monkeypatch.undo()
    problems = audit_run(folder).problems
    assert [(r.round, r.client, r.status) for r in problems] == [(1, "aggregate", "MISMATCH")]


def test_split_aggregator_that_records_other_activations_than_the_clients_signed_is_caught(tmp_path, monkeypatch):
    from fedledger.strategies import split as split_lib

    monkeypatch.setattr(split_lib.SplitRunner, "_check_digests", staticmethod(lambda run, u, r, d: (u, r)))
    monkeypatch.setattr(split_lib, "chain_digest", lambda prev, arrays: "ab" * 32)
    _, folder, _ = _run(tmp_path, {"strategy": "split", "audit": "eth-tester"})
    monkeypatch.undo()
    problems = audit_run(folder).problems
    assert len(problems) == 3 and {r.status for r in problems} == {"MISMATCH"}
    assert all("activations digest" in r.detail for r in problems)


class StopsMidRound(InProcessGrid):
    """The node of partition ``victim`` stops answering after ``after`` messages."""

    def __init__(self, *a, victim=1, after=2, **kw):
        super().__init__(*a, **kw)
        self.victim, self.after, self.seen = self.node_of[victim], after, 0

    def _handle(self, msg):
        if msg.metadata.dst_node_id == self.victim and msg.metadata.message_type == "train.split":
            self.seen += 1
            if self.seen > self.after:
                self.drop.add(self.victim)
        return super()._handle(msg)


def test_a_split_client_that_stops_mid_round_is_skipped_and_the_run_goes_on(tmp_path):
    _, _, m = _run(tmp_path, {"strategy": "split", "local-steps": 3}, grid_cls=StopsMidRound)
    ex = m["rounds"]["1"]["exchange"]
    assert ex["participants"] == [0, 2] and ex["dropped"] == [1]
    assert ex["server-steps"] == 2 * 3 + 2  # partition 1 answered steps 1 and 2 only
    assert m["rounds"]["1"]["report"]["aggregated"] == 2
    assert _clients(m, 1)[1]["round-trips"] == 3 and _clients(m, 1)[0]["round-trips"] == 4


def test_malformed_activations_and_a_wrong_digest_are_refused_with_reasons(tmp_path):
    def corrupt(msg, partition, reply):
        if msg.metadata.message_type != "train.split":
            return reply
        if partition == 1 and "activations" in reply.content.array_records:
            a = {k: v.numpy().copy() for k, v in reply.content["activations"].items()}
            a["hidden"][0, 0, 0] = np.inf
            return _with_arrays(msg, reply, "activations", a)
        if partition == 2 and "arrays" in reply.content.array_records:
            a = {k: v.numpy().copy() for k, v in reply.content["arrays"].items()}
            a["activations-digest"] = (a["activations-digest"] + 1).astype(np.uint8)
            return _with_arrays(msg, reply, "arrays", a)
        return reply

    grid_cls = type("Corrupt", (ReplyFilter,), {"edit": staticmethod(corrupt)})
    _, _, m = _run(tmp_path, {"strategy": "split"}, grid_cls=grid_cls)
    rejected = {r["partition"]: r["reason"] for r in m["rounds"]["1"]["report"]["rejected"]}
    assert sorted(rejected) == [1, 2]
    assert "step 1: hidden: NaN/Inf" in rejected[1]
    assert "activations digest" in rejected[2]
    assert m["rounds"]["1"]["report"]["aggregated"] == 1


# ---------------------------------------------------------------------------- every mode
def test_fedavg_reports_accuracy_exact_match_and_the_same_client_accounting(fedavg_run):
    _, _, m = fedavg_run
    central = m["rounds"]["1"]["central"]
    assert 0 <= central["accuracy"] <= 1 and 0 <= central["exact-match"] <= 1
    c = _clients(m, 1)
    assert sorted(c) == [0, 1, 2] and all(v["round-trips"] == 1 and v["bytes-up"] == v["bytes-down"] > 0
                                          for v in c.values())
    assert all(v["flops"] > 0 and v["compute-seconds"] > 0 for v in c.values())


def test_audited_kd_and_split_runs_under_fedledger_runs_live_line(tmp_path, monkeypatch):
    """``fedledger run`` wraps the trail for its live line (``progress.ProgressTrail``): the KD and
    split runners' own trail calls (``artifact``) go through it."""
    from fedledger import progress

    monkeypatch.setenv("FEDLEDGER_PROGRESS", "1")
    assert progress.enabled()
    for strategy in ("kd", "split"):
        _, folder, _ = _run(tmp_path / strategy, {"strategy": strategy, "audit": "eth-tester", "local-steps": 1})
        assert not audit_run(folder).problems
