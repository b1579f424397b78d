"""``HubAccounting``: hub rounds on the same network model, bytes mapped to partitions."""

import pytest
from flwr.serverapp.strategy import FedAvg

from fedledger.core.pipeline import RoundPipeline, RoundReport
from fedledger.strategies import topology as T
from fedledger.strategies.accounting import HubAccounting
from fedledger.strategies.kernels import to_arrayrecord

from .test_serverless_helpers import adapter, grid, hub_app

NODES = {0: 9_223_372_036_854_775_907, 1: 17, 2: 18_000_000_000_000_000_001, 3: 4_242}  # partition -> node id


def _accounting(**kw):
    partition_of = {nid: p for p, nid in NODES.items()}
    return HubAccounting(T.complete(4, latency=0.01, bandwidth=1e5), local_steps=2, step_seconds=1.0,
                         peer_of=partition_of.get, **kw)


def test_entry_maps_each_nodes_bytes_to_its_partition():
    up = {p: 1000 * (p + 1) for p in NODES}  # a different size per partition: any mix-up shows
    report = RoundReport(1, down_bytes={NODES[p]: 500 for p in NODES}, up_bytes={NODES[p]: up[p] for p in NODES})
    report.up_bytes[123456] = 99  # a node that is no peer of the run: not counted
    e = _accounting(server=0).observe(report)["exchange"]
    assert (e["round"], e["strategy"], e["server-node"], e["participants"]) == (1, "server-fedavg", 0, [0, 1, 2, 3])
    assert e["link-bytes"] == {**{f"0->{p}": 500.0 for p in (1, 2, 3)}, **{f"{p}->0": float(up[p]) for p in (1, 2, 3)}}
    assert e["peer-bytes-sent"] == {"0": 1500.0, "1": 2000.0, "2": 3000.0, "3": 4000.0}
    assert e["peer-bytes-received"] == {"1": 500.0, "2": 500.0, "3": 500.0, "0": 9000.0}
    assert e["total-peer-bytes"] == 10_500
    # the server's NIC is the bottleneck: 1,500 bytes down, 9,000 up, 10 ms latency each
    assert e["sim-network-seconds"] == pytest.approx(0.01 + 1500 / 1e5 + 0.01 + 9000 / 1e5)
    assert e["sim-compute-seconds"] == pytest.approx(2.0) and e["wall-seconds"] >= 0


def test_a_node_that_replied_with_an_error_is_no_participant_and_centre_picks_a_peer():
    report = RoundReport(2, down_bytes={nid: 500 for nid in NODES.values()},
                         up_bytes={NODES[0]: 800, NODES[1]: 800, NODES[2]: 0, NODES[3]: 800})
    e = _accounting().observe(report)["exchange"]
    assert e["participants"] == [0, 1, 3] and e["server-node"] in NODES
    assert "2" not in e["peer-bytes-sent"]


def test_bad_server_is_a_topology_error():
    with pytest.raises(T.TopologyError, match="server 7"):
        _accounting(server=7)


def test_through_the_round_pipeline_a_dropped_partition_uploads_nothing():
    n = 4
    g = grid(n, hub_app())
    g.drop = {g.node_of[2]}
    accounting = HubAccounting(T.complete(n, latency=0.01, bandwidth=1e5), local_steps=2, step_seconds=1.0,
                               peer_of=g.partition_of.get, server=0)
    pipeline = RoundPipeline(FedAvg(fraction_evaluate=0.0, min_available_nodes=n), observers=[accounting])
    pipeline.start(grid=g, initial_arrays=to_arrayrecord(adapter(0)), num_rounds=1)
    report = pipeline.reports[1]
    e = report.extra["exchange"]
    nb = report.down_bytes[g.node_of[1]]  # every message carries one adapter
    assert e["participants"] == [0, 1, 3]
    assert e["link-bytes"] == {"0->1": nb, "0->2": nb, "0->3": nb, "1->0": nb, "3->0": nb}
    assert e["total-peer-bytes"] == pytest.approx(5 * nb)
    assert e["sim-network-seconds"] == pytest.approx((0.01 + 3 * nb / 1e5) + (0.01 + 2 * nb / 1e5))
