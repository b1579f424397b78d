"""Topology model: generators, bad files, ring orders, phase timing, FedAvg star latency."""

import json

import pytest

from fedledger.strategies import topology as T


def test_complete_and_geometric_are_connected_with_positive_links():
    for topo in (T.complete(6), T.random_geometric(12, seed=3)):
        assert len(topo) in (6, 12)
        for u, v, d in topo.graph.edges(data=True):
            assert d["bandwidth"] > 0 and d["latency"] >= 0


def test_path_time_uses_fastest_path(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("0 1 0.01 1e6\n1 2 0.01 1e6\n0 2 1.0 1e6\n")
    topo = T.load(str(f))
    assert topo.path(0, 2) == [0, 1, 2]  # small message: latency wins
    assert topo.path_time(0, 2, 0) == pytest.approx(0.02)
    assert topo.path(0, 2, 1e6) == [0, 2]  # big message: one hop beats two store-and-forward hops
    assert topo.path_time(0, 2, 1e6) == pytest.approx(2.0)


@pytest.mark.parametrize("text,needle", [
    ("0 1 0.01 1e6\n2 3 0.01 1e6\n", "not connected"),
    ("0 1 0.01 1e6\n1 2 0.01 0\n", "link 1-2"),
    ("0 1 0.01 1e6\n1 2 0.01 -5\n", "non-positive bandwidth"),
])
def test_bad_edge_list_names_the_problem(tmp_path, text, needle):
    f = tmp_path / "bad.txt"
    f.write_text(text)
    with pytest.raises(T.TopologyError, match=needle):
        T.load(str(f))


def test_bad_json_unknown_node_names_the_edge(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps({"nodes": [{"id": 0}, {"id": 1}, {"id": 2}],
                             "edges": [{"u": 0, "v": 1}, {"u": 1, "v": 2}, {"u": 2, "v": 7, "latency": 0.1, "bandwidth": 1e6}]}))
    with pytest.raises(T.TopologyError, match="link 2-7 names unknown node 7"):
        T.load(str(f))
    f2 = tmp_path / "edges.txt"
    f2.write_text("0 1\n1 5\n")
    with pytest.raises(T.TopologyError, match="link 1-5"):
        T.load(str(f2), num_nodes=3)
    assert issubclass(T.TopologyError, ValueError)


def test_build_rejects_unknown_spec():
    with pytest.raises(T.TopologyError):
        T.build("torus", 4)


@pytest.mark.parametrize("n,seed", [(6, 0), (12, 1), (20, 2)])
def test_tsp_ring_is_no_slower_than_naive_or_random(n, seed):
    topo = T.random_geometric(n, seed=seed)
    cost = {m: T.ring_cycle_latency(topo, T.ring_order(topo, m, seed=seed)) for m in ("tsp", "naive", "random")}
    assert sorted(T.ring_order(topo, "tsp")) == topo.nodes
    assert cost["tsp"] <= cost["naive"] + 1e-12
    assert cost["tsp"] <= cost["random"] + 1e-12


def test_phase_contention_makes_the_hub_the_bottleneck():
    topo = T.complete(5, latency=0.0, bandwidth=1e6)
    one = topo.phase([(1, 0, 1e6)])["seconds"]
    four = topo.phase([(p, 0, 1e6) for p in range(1, 5)])["seconds"]
    assert one == pytest.approx(1.0) and four == pytest.approx(4.0)  # server NIC shared by 4 uploads
    ring = topo.phase([(i, (i + 1) % 5, 1e6) for i in range(5)])["seconds"]
    assert ring == pytest.approx(1.0)


def test_fedavg_star_vs_ring_round_on_same_network():
    topo = T.complete(10, latency=0.02, bandwidth=12.5e6)
    nbytes = 3.7e6
    star = T.fedavg_round(topo, nbytes, server="centre")
    ring = T.ring_round(topo, list(range(10)), nbytes)
    # star: 9 downloads + 9 uploads through the server's NIC
    assert star["network-seconds"] == pytest.approx(2 * (0.02 + 9 * nbytes / 12.5e6))
    assert ring["network-seconds"] == pytest.approx(18 * (0.02 + nbytes / 10 / 12.5e6))
    assert star["total-bytes"] == pytest.approx(18 * nbytes)
    assert ring["total-bytes"] == pytest.approx(10 * 18 * nbytes / 10)
    srv = T.fedavg_round(topo, nbytes, server=3)
    assert srv["server"] == 3


def test_direct_links_short_cut_only_when_no_relayed_path_can_be_faster():
    """On a complete graph whose slowest link takes less than twice the fastest, every fastest
    path is the link itself: paths and the latency matrix equal networkx's Dijkstra exactly."""
    import networkx as nx
    import numpy as np

    rng = np.random.default_rng(0)
    g = nx.complete_graph(9)
    for u, v in g.edges:
        g.edges[u, v].update(latency=float(rng.uniform(0.010, 0.019)), bandwidth=float(rng.uniform(1e6, 1.9e6)))
    topo = T.Topology(g)
    for nbytes in (0.0, 5e4):
        assert topo.direct_is_fastest(nbytes)
        w = lambda a, b, d: d["latency"] + nbytes / d["bandwidth"]  # noqa: E731
        dist = dict(nx.all_pairs_dijkstra_path_length(g, weight=w))
        assert np.array_equal(topo.latency_matrix(nbytes), [[dist[a][b] for b in topo.nodes] for a in topo.nodes])
        assert all(topo.path(a, b, nbytes) == nx.dijkstra_path(g, a, b, weight=w) for a in g for b in g if a != b)
    g.edges[0, 1]["latency"] = 1.0  # now 0 -> x -> 1 beats the direct link
    slow = T.Topology(g)
    assert not slow.direct_is_fastest(0.0) and len(slow.path(0, 1)) == 3
    assert not T.random_geometric(12, seed=3).direct_is_fastest(0.0)  # not every pair is linked


def test_hub_round_on_a_complete_graph_needs_no_shortest_path_search(monkeypatch):
    """The server's centre and the star phases of a complete graph with uniform links cost
    O(N^2) (no Dijkstra at all), so the first hub round stays cheap for many peers."""
    import networkx as nx

    def refuse(*a, **kw):
        raise AssertionError("shortest-path search on a complete graph with uniform links")

    monkeypatch.setattr(nx, "dijkstra_path", refuse)
    monkeypatch.setattr(nx, "all_pairs_dijkstra_path_length", refuse)
    topo = T.complete(300)
    star = T.fedavg_round(topo, 3.7e6, server="centre")
    assert star["server"] == 0 and star["total-bytes"] == pytest.approx(2 * 299 * 3.7e6)


def test_fastest_paths_on_a_geometric_graph_are_networkx_dijkstras_from_one_search_per_size(monkeypatch):
    """Sparse graphs: one all-pairs search (scipy, in C) gives the latency matrix and every path,
    equal to networkx's Dijkstra; a hub round then runs no per-transfer search at all."""
    import networkx as nx
    import numpy as np

    topo = T.random_geometric(30, seed=3)
    for nbytes in (0.0, 3.7e6):
        w = lambda a, b, d: d["latency"] + nbytes / d["bandwidth"]  # noqa: E731
        dist = dict(nx.all_pairs_dijkstra_path_length(topo.graph, weight=w))
        assert np.array_equal(topo.latency_matrix(nbytes), [[dist[a][b] for b in topo.nodes] for a in topo.nodes])
        assert all(topo.path(a, b, nbytes) == nx.dijkstra_path(topo.graph, a, b, weight=w)
                   for a in topo.graph for b in topo.graph if a != b)

    def refuse(*a, **kw):
        raise AssertionError("a networkx shortest-path search per transfer")

    monkeypatch.setattr(nx, "dijkstra_path", refuse)
    monkeypatch.setattr(nx, "all_pairs_dijkstra_path_length", refuse)
    fresh = T.random_geometric(200, seed=1)
    star = T.fedavg_round(fresh, 3.7e6, server="centre")
    assert star["total-bytes"] == pytest.approx(2 * 199 * 3.7e6)


def test_a_zero_time_link_is_still_a_link():
    import networkx as nx

    g = nx.path_graph(3)
    nx.set_edge_attributes(g, 0.0, "latency")
    nx.set_edge_attributes(g, 1e6, "bandwidth")
    topo = T.Topology(g)
    assert topo.path(0, 2, 0.0) == [0, 1, 2] and topo.latency_matrix(0.0)[0, 2] == 0.0
