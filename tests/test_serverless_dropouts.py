"""Serverless dropouts: a peer that stops answering mid-round never stalls or kills the run.

The ring re-forms over the survivors at whatever step the peer went silent (its round equals a
ring the peer never joined, bit for bit, and FedAvg over the survivors); gossip routes over the
live graph and says when the dead peers cut it; min-available-nodes / min-train-nodes hold as
for the hub strategies; a peer that comes back (in deployment: a restarted SuperNode under a
new node id) trains from the current model. In process: the real relay runners and the real
ClientApp handlers over fake (numpy) peers; the deployment kill is in
tests/test_serverless_deploy_faults.py.
"""

from __future__ import annotations

import logging

import networkx as nx
import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from fedledger.inprocess import InProcessGrid, random_node_ids
from fedledger.strategies import topology as T
from fedledger.strategies.kernels import as_numpy_dict, to_arrayrecord
from fedledger.strategies.relay import Relay, RelayStopped, build_relay

from .test_serverless_helpers import adapter, expected_fedavg, fake_app, maxdiff, trained

N = 5
STEPS = 2 * (N - 1)          # relay steps of a ring of N after the train message: 0 .. 2(N-1)


def _stage(after: int) -> str:
    """Where a peer that answers ``after`` messages of the round goes silent."""
    if after == 0:
        return "train"
    step = after - 1
    if step < N - 1:
        return f"reduce-scatter step {step}"
    return f"all-gather step {step}" if step < STEPS else "finish step"


class SilentAfter(InProcessGrid):
    """The node of partition ``victim`` answers ``after`` messages of round ``in_round``, then
    never again in that round (a node that hangs: no reply, no error)."""

    def __init__(self, *a, victim: int = 2, after: int = 0, in_round: int = 1, **kw):
        super().__init__(*a, **kw)
        self.victim, self.after, self.in_round, self.seen = self.node_of[victim], after, in_round, 0

    def _handle(self, msg):
        if msg.metadata.dst_node_id == self.victim and msg.metadata.group_id == str(self.in_round):
            self.seen += 1
            if self.seen > self.after:
                return None
        return super()._handle(msg)


class Deployment(InProcessGrid):
    """What a SuperLink shows the ServerApp: a killed node stops being listed (once its
    heartbeats lapse) and never answers; a restarted one comes back under a new node id with an
    empty ``context.state`` and the same node config."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.offline: set[int] = set()
        self.kill_at: tuple[int, int, int] | None = None   # (partition, round, messages answered first)
        self._seen = 0
        self.sent: list[tuple[int, str]] = []

    def get_node_ids(self):
        return sorted(n for n in self.contexts if n not in self.offline)

    def kill(self, partition: int) -> None:
        nid = self.node_of[partition]
        self.drop.add(nid)
        self.offline.add(nid)

    def restart(self, partition: int) -> int:
        old = self.contexts[self.node_of[partition]]
        new = random_node_ids(1, seed=1000 + len(self.contexts))[0]
        self.contexts[new] = Context(run_id=old.run_id, node_id=new, node_config=dict(old.node_config),
                                     state=RecordDict(), run_config=dict(old.run_config))
        self.node_of[partition], self.partition_of[new] = new, partition
        return new

    def _handle(self, msg):
        self.sent.append((msg.metadata.dst_node_id, msg.metadata.group_id))
        if self.kill_at is not None:
            partition, rnd, after = self.kill_at
            if msg.metadata.dst_node_id == self.node_of[partition] and msg.metadata.group_id == str(rnd):
                self._seen += 1
                if self._seen > after:
                    self.kill(partition)
        return super()._handle(msg)


def _identity_app():
    from fedledger import identity

    app = fake_app()
    identity.register(app)          # unsigned run: the node says its partition id
    return app


def _ring(n=N, g=None, rounds=1, **kw):
    g = g if g is not None else InProcessGrid(fake_app(), n, {})
    runner = build_relay("ring", **kw)
    result = runner.run(g, dict(g.node_of), to_arrayrecord(adapter(0)), rounds,
                        evaluate_fn=lambda r, arrays: {"round": r})
    return result, g


# ---------------------------------------------------------------------- the ring re-forms
@pytest.mark.parametrize("after", range(STEPS + 2), ids=_stage)
def test_a_peer_silent_at_any_ring_step_leaves_the_round_of_a_ring_it_never_joined(after):
    """Silent at the train message, at each reduce-scatter and all-gather step, at the finish
    step: the round completes over the four others and its model is, bit for bit, the one of a
    ring the peer never answered in (and FedAvg over the survivors)."""
    survivors = [0, 1, 3, 4]
    res, g = _ring(g=SilentAfter(fake_app(), N, {}, victim=2, after=after), topology="geometric")
    never = InProcessGrid(fake_app(), N, {})
    never.drop = {never.node_of[2]}
    ref, _ = _ring(g=never, topology="geometric")
    h = res.history[0]
    assert h["participants"] == survivors and h["dropped"] == [2]
    assert h["restarts"] == (0 if after == 0 else 1)
    got, want = as_numpy_dict(res.arrays), as_numpy_dict(ref.arrays)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert maxdiff(got, expected_fedavg(adapter(0), survivors)) < 1e-5
    for p in survivors:   # every survivor holds the round's model, and trains from it next
        assert maxdiff(as_numpy_dict(g.contexts[g.node_of[p]].state["peer.model"]), got) == 0


def test_a_peer_silent_in_round_one_rejoins_in_round_two_from_the_current_model():
    g = SilentAfter(fake_app(), N, {}, victim=2, after=3, in_round=1)
    res, _ = _ring(g=g, rounds=2)
    round1 = expected_fedavg(adapter(0), [0, 1, 3, 4])
    assert res.history[0]["dropped"] == [2] and res.history[1]["participants"] == list(range(N))
    assert res.history[1]["dropped"] == []
    # round 2 is FedAvg of all five trained from round 1's model, the rejoined peer's included
    assert maxdiff(as_numpy_dict(res.arrays), expected_fedavg(round1, range(N))) < 1e-5


def test_a_killed_supernode_restarted_under_a_new_node_id_takes_its_partition_back():
    """Deployment as the ServerApp sees it: partition 3's node is killed in round 1's all-gather
    and restarted before round 2 with a new node id and no state; the roster gives it partition
    3 back (its old node is gone), it gets round 1's model and trains from it."""
    from fedledger.identity import Roster
    from fedledger.server_app import connected_peers

    g = Deployment(_identity_app(), N, {})
    g.kill_at = (3, 1, 1 + N)          # train + N-1 reduce-scatter steps answered, then killed
    roster = Roster(1, N, signing=False)
    roster.refresh(g)
    old = roster.nodes_by_partition()[3]
    runner = build_relay("ring", min_available_nodes=N - 1)
    restarted = {}

    def evaluate(r, arrays):
        if r == 1:
            restarted["node"] = g.restart(3)     # between rounds 1 and 2
        return {"round": r}

    res = runner.run(g, roster.nodes_by_partition(), to_arrayrecord(adapter(0)), 2, evaluate_fn=evaluate,
                     peers_fn=lambda: connected_peers(g, roster))
    assert res.history[0]["participants"] == [0, 1, 2, 4] and res.history[0]["dropped"] == [3]
    assert res.history[1]["participants"] == list(range(N))
    assert roster.nodes_by_partition()[3] == restarted["node"] != old and old not in roster.known
    round1 = expected_fedavg(adapter(0), [0, 1, 2, 4])
    assert maxdiff(as_numpy_dict(res.arrays), expected_fedavg(round1, range(N))) < 1e-5


def test_a_restarted_node_claiming_a_partition_whose_node_is_still_connected_is_asked_again_not_given_it(caplog):
    from fedledger.identity import Roster

    g = Deployment(_identity_app(), 3, {})
    roster = Roster(1, 3, signing=False)
    roster.refresh(g)
    old = roster.nodes_by_partition()[1]
    new = g.restart(1)                   # the old node has not been marked offline yet
    with caplog.at_level(logging.WARNING, logger="fedledger"):
        roster.refresh(g)
    assert roster.nodes_by_partition()[1] == old and new not in roster.known and new not in roster.refused
    assert any("still connected; asked again" in r.message for r in caplog.records)
    g.offline.add(old)                   # its heartbeats lapsed
    roster.refresh(g)
    assert roster.nodes_by_partition()[1] == new


def test_a_signed_newcomer_with_another_key_never_takes_a_dead_nodes_partition():
    from fedledger.core import Identity
    from fedledger.identity import Roster

    roster = Roster(1, 2, signing=True)
    roster.known = {11: Identity(11, 0, "0xAa00000000000000000000000000000000000001")}
    same = Identity(12, 0, "0xaa00000000000000000000000000000000000001")
    other = Identity(13, 0, "0xBb00000000000000000000000000000000000002")
    assert roster._may_rejoin(same, 11)
    assert not roster._may_rejoin(other, 11)


# ---------------------------------------------------------------------- min-available / min-train
def test_a_round_waits_for_min_available_nodes_like_the_hub_then_goes_on(caplog):
    """Default min-available-nodes (0 = every peer of the start): round 2 waits until the killed
    peer is back; with min-available-nodes=N-1 it goes on without it."""
    g = Deployment(fake_app(), N, {})
    g.kill_at = (1, 1, 2)
    polls = {"n": 0}
    listed = g.get_node_ids

    def get_node_ids():      # the SuperNode comes back after a few looks
        polls["n"] += 1
        if g.node_of[1] in g.offline and polls["n"] > 8:
            g.offline.discard(g.node_of[1])
            g.drop.discard(g.node_of[1])
        return listed()

    g.get_node_ids = get_node_ids
    runner = build_relay("ring")
    runner.poll_seconds = 0.01
    with caplog.at_level(logging.INFO, logger="fedledger"):
        res = runner.run(g, dict(g.node_of), to_arrayrecord(adapter(0)), 2)
    assert res.history[0]["dropped"] == [1] and res.history[1]["participants"] == list(range(N))
    assert any("waits for peers: 4 connected (minimum required: 5" in r.message for r in caplog.records)

    g = Deployment(fake_app(), N, {})
    g.kill_at = (1, 1, 2)
    res = build_relay("ring", min_available_nodes=N - 1).run(g, dict(g.node_of), to_arrayrecord(adapter(0)), 2)
    assert res.history[1]["participants"] == [0, 2, 3, 4] and res.history[1]["dropped"] == [1]
    assert (g.node_of[1], "2") not in g.sent       # the dead node is not sent round 2 at all
    round1 = expected_fedavg(adapter(0), [0, 2, 3, 4])
    assert maxdiff(as_numpy_dict(res.arrays), expected_fedavg(round1, [0, 2, 3, 4])) < 1e-5


def test_a_round_ending_with_fewer_live_peers_than_min_train_nodes_stops_the_run_in_one_line():
    g = SilentAfter(fake_app(), 3, {}, victim=1, after=2, in_round=1)
    with pytest.raises(RelayStopped) as err:
        build_relay("ring", min_train_nodes=3).run(g, dict(g.node_of), to_arrayrecord(adapter(0)), 3)
    msg = str(err.value)
    assert "\n" not in msg and "round 1 ended with 2 live peer(s) [0, 2]" in msg and "min-train-nodes=3" in msg
    assert [h["round"] for h in err.value.result.history] == [1]     # what the round did is kept
    assert err.value.result.history[0]["dropped"] == [1]


def test_the_serverapp_says_a_stopped_serverless_run_in_one_line(monkeypatch):
    """RelayStopped reaches the ServerApp's one-line handler: one error line, the run failed."""
    from fedledger import server_app

    def stops(grid, context):
        raise RelayStopped("ring: round 2 ended with 1 live peer(s) [0] (dropped [1, 2]), fewer than "
                           "min-train-nodes=2")

    monkeypatch.setattr(server_app, "run", stops)
    with pytest.raises(RuntimeError, match=r"^fedledger: error: ring: round 2 ended") as err:
        server_app.main(None, None)
    assert err.value.__cause__ is None and "\n" not in str(err.value)


# ---------------------------------------------------------------------- the relay hears the SuperLink
class SuperLinkGrid(InProcessGrid):
    """Answers for a dead node as a SuperLink does: an error reply from the SuperLink's own node
    id (NODE_UNAVAILABLE), naming the message it answers."""

    dead: int = -1

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

        out = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            if msg.metadata.dst_node_id == self.dead:
                out.append(create_message_error_unavailable_res_message(msg.metadata, "node_unavail"))
            else:
                out.extend(self.pull_messages(self.push_messages([msg])))
        return out


def test_the_superlinks_node_unavailable_reply_names_the_dead_peer(caplog):
    from flwr.common.constant import SUPERLINK_NODE_ID

    g = SuperLinkGrid(fake_app(), 3, {})
    g.dead = g.node_of[1]
    relay = Relay(g, g.node_of, "train.ring", timeout=5)
    from flwr.app import ConfigRecord

    with caplog.at_level(logging.WARNING, logger="fedledger"):
        out = relay.send({p: RecordDict({"arrays": to_arrayrecord(adapter(0)),
                                         "config": ConfigRecord({"phase": "train"})}) for p in range(3)}, 1)
    assert sorted(out) == [0, 2] and "Node Unavailable" in relay.last_errors[1]
    assert SUPERLINK_NODE_ID not in relay.peer_of
    res = build_relay("ring").run(g, dict(g.node_of), to_arrayrecord(adapter(0)), 1)
    assert res.history[0]["participants"] == [0, 2] and res.history[0]["dropped"] == [1]


# ---------------------------------------------------------------------- gossip routes around
def _topology(edges) -> T.Topology:
    g = nx.Graph()
    for u, v, bw in edges:
        g.add_edge(u, v, latency=0.001, bandwidth=bw)
    return T.Topology(g)


def _gossip(topology, dead=(), rounds=1, k=3):
    g = InProcessGrid(fake_app(), len(topology), {})
    g.drop = {g.node_of[p] for p in dead}
    runner = build_relay("gossip", topology=topology, gossip_k=k, gossip_steps=2)
    return runner.run(g, dict(g.node_of), to_arrayrecord(adapter(0)), rounds), g


def test_gossip_paths_go_around_a_dead_peer():
    """0-1 is a slow link and 0-2-1 the fast way round: with peer 2 alive the 0-1 exchange goes
    through it; with 2 dead it takes the live path 0-3-1 (networkx, over the live graph only)."""
    from fedledger.strategies.relay import LiveNetwork

    fast, slow = 1e9, 1e3
    topo = _topology([(0, 1, slow), (0, 2, fast), (2, 1, fast), (1, 3, fast), (3, 0, fast / 10)])
    alive, _ = _gossip(topo)
    nbytes = alive.history[0]["adapter-bytes"]
    assert topo.path(0, 1, nbytes) == [0, 2, 1] and "0->1" not in alive.history[0]["link-bytes"]
    assert LiveNetwork.of(topo, [0, 1, 3]).whole.path(0, 1, nbytes) == [0, 3, 1]
    res, _ = _gossip(topo, dead=[2])
    h = res.history[0]
    assert h["participants"] == [0, 1, 3] and h["dropped"] == [2] and h["unreachable"] == []
    assert h["link-bytes"] and not any("2" in k.split("->") for k in h["link-bytes"])
    assert all(2 not in pair for step in h["exchanges"] for pair in step)
    # per mixing step link 0->3 carries 0's model to 3 and, routed, to 1
    assert h["link-bytes"]["0->3"] == pytest.approx(2 * 2 * nbytes)


def test_gossip_says_in_one_line_and_counts_the_peers_a_dead_peer_cuts_off(caplog):
    """A line 0-1-2-3-4 with 2 dead: two parts; peers 3 and 4 cannot reach 0 and 1. The round
    goes on within each part, and says so."""
    topo = _topology([(0, 1, 1e8), (1, 2, 1e8), (2, 3, 1e8), (3, 4, 1e8)])
    with caplog.at_level(logging.WARNING, logger="fedledger"):
        res, g = _gossip(topo, dead=[2])
    h = res.history[0]
    assert h["participants"] == [0, 1, 3, 4] and h["unreachable"] == [3, 4]
    lines = [r.message for r in caplog.records if "cut the live network" in r.message]
    assert lines and "into 2 parts [[0, 1], [3, 4]]" in lines[0] and "peers [3, 4] cannot reach" in lines[0]
    assert all({a, b} <= {0, 1} or {a, b} <= {3, 4} for step in h["exchanges"] for a, b in step)
    # each part mixes to its own examples-weighted average
    part = {p: trained(adapter(0), p) for p in (0, 1)}
    from .test_serverless_helpers import examples_of

    w = np.array([examples_of(0), examples_of(1)], dtype=np.float64)
    mean01 = {k: (w[0] * part[0][k] + w[1] * part[1][k]) / w.sum() for k in part[0]}
    m0 = as_numpy_dict(g.contexts[g.node_of[0]].state["peer.model"])
    assert maxdiff(m0, mean01) < 1e-5


def test_gossip_peer_back_after_a_missed_round_gets_the_mean_and_trains_from_it():
    topo = T.build("complete", 4)
    g = SilentAfter(fake_app(), 4, {}, victim=1, after=0, in_round=1)
    res = build_relay("gossip", topology=topo, gossip_k=3, gossip_steps=1).run(
        g, dict(g.node_of), to_arrayrecord(adapter(0)), 2)
    assert res.history[0]["dropped"] == [1] and res.history[1]["participants"] == [0, 1, 2, 3]
    # the complete graph with k=3 mixes every pair once: round 1's mean over the three is exact,
    # and round 2 (peer 1 handed that mean) is FedAvg of all four trained from it
    assert res.history[0]["consensus-max"] < 1e-5
    round1 = expected_fedavg(adapter(0), [0, 2, 3])
    assert maxdiff(as_numpy_dict(res.arrays), expected_fedavg(round1, range(4))) < 1e-5


def test_the_round_line_of_a_serverless_round_names_the_missing_peers():
    from fedledger import logs

    line = logs.round_line(2, 4, {"participants": [0, 1, 3], "dropped": [2], "wall-seconds": 12.3},
                           {"eval-loss": 2.5})
    assert line == "round 2/4  loss 2.5000  peers 3 live, missing [2]  12.3 s"
    assert "missing" not in logs.round_line(1, 4, {"participants": [0, 1, 2, 3], "dropped": []}, None)


def test_async_gossip_goes_on_without_a_silent_peer_and_stops_below_min_train_nodes():
    def run(min_train):
        g = InProcessGrid(fake_app(), 4, {})
        g.drop = {g.node_of[3]}
        return build_relay("async-gossip", min_train_nodes=min_train).run(g, dict(g.node_of),
                                                                          to_arrayrecord(adapter(0)), 2)

    res = run(3)
    assert [h["participants"] for h in res.history] == [[0, 1, 2], [0, 1, 2]]
    with pytest.raises(RelayStopped, match=r"async-gossip: round 1 ended with 3 live peer\(s\) \[0, 1, 2\]"):
        run(4)


def test_the_real_serverapp_writes_the_rounds_of_a_stopped_serverless_run_then_stops(tmp_path):
    """The fedledger ServerApp and ClientApp in process (tiny model): partition 1 goes silent in
    round 1's ring with min-train-nodes=3, so the run stops after round 1, and the run folder
    already holds that round with the missing peer named."""
    import json
    import os

    from fedledger import server_app
    from fedledger.client_app import app as client_app

    from .conftest import TINY

    cfg = {**TINY, "strategy": "ring", "local-steps": 1, "eval-batches": 1, "min-train-nodes": 3,
           "run-dir": str(tmp_path / "runs")}
    grid = SilentAfter(client_app, 3, cfg, victim=1, after=2, in_round=1, run_id=7, seed=11)
    with pytest.raises(RelayStopped, match=r"round 1 ended with 2 live peer\(s\) \[0, 2\].*min-train-nodes=3"
                                           r".*the rounds so far are in ") as err:
        server_app.run(grid, Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config=cfg),
                       settle=0.0)
    folder = str(err.value).rsplit("the rounds so far are in ", 1)[1]
    with open(os.path.join(folder, "metrics.json")) as fh:
        m = json.load(fh)
    assert m["rounds"]["1"]["exchange"]["dropped"] == [1] and m["rounds"]["1"]["exchange"]["participants"] == [0, 2]
    assert "2" not in m["rounds"] and "central" in m["rounds"]["1"]
