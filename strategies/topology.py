"""Network model for serverless exchanges: peers, links and how long a message takes.

A :class:`Topology` is an undirected networkx graph whose nodes are peers ``0..N-1`` (the
partition ids) with a relative compute ``speed`` (1.0 = nominal) and a ``nic`` capacity
(bytes/s, what the node can send or receive at once, default: its fastest link), and whose
edges are links with ``latency`` (s) and ``bandwidth`` (bytes/s).

Every mode (server FedAvg, ring, gossip, async gossip) is timed by the *same* model:

* a transfer between non-adjacent peers follows the fastest path (store and forward);
* a *phase* is a set of concurrent transfers; each transfer takes the sum of the latencies on
  its path plus the worst drain time ``load / capacity`` of any resource it uses (a directed
  link, the sender's NIC out, the receiver's NIC in), where ``load`` is every byte that phase
  puts on that resource. This bottleneck approximation is what makes a hub (server) slow when
  N peers upload to it at once, and what makes ring chunks cheap.

Generators: :func:`complete` (uniform links), :func:`random_geometric` (latency grows with
distance), :func:`load` (JSON or edge-list file). Bad input raises :class:`TopologyError`
naming the offending edge or node.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence

import networkx as nx
import numpy as np

DEFAULT_LATENCY = 0.02  # s, one way
DEFAULT_BANDWIDTH = 12.5e6  # bytes/s = 100 Mbit/s


class TopologyError(ValueError):
    """A topology that cannot be used (not connected, unknown node, bad link parameters)."""


class Topology:
    """Peers + links with a shared timing model (see module docstring)."""

    def __init__(self, graph: nx.Graph):
        self.graph = graph
        self._validate()
        for n, data in graph.nodes(data=True):
            data.setdefault("speed", 1.0)
            if "nic" not in data:
                bws = [graph.edges[n, m]["bandwidth"] for m in graph.neighbors(n)]
                data["nic"] = max(bws) if bws else DEFAULT_BANDWIDTH
        self._paths: dict[tuple, object] = {}  # fastest paths, latency matrices, direct-link checks

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        g = self.graph
        if g.number_of_nodes() == 0:
            raise TopologyError("topology has no nodes")
        for u, v, d in g.edges(data=True):
            if u == v:
                raise TopologyError(f"link {u}-{v} is a self-loop")
            bw, lat = d.get("bandwidth"), d.get("latency")
            if bw is None or not np.isfinite(bw) or bw <= 0:
                raise TopologyError(f"link {u}-{v} has non-positive bandwidth {bw!r} (bytes/s must be > 0)")
            if lat is None or not np.isfinite(lat) or lat < 0:
                raise TopologyError(f"link {u}-{v} has invalid latency {lat!r} (seconds must be >= 0)")
        for n, d in g.nodes(data=True):
            speed = d.get("speed", 1.0)
            if not np.isfinite(speed) or speed <= 0:
                raise TopologyError(f"node {n} has non-positive compute speed {speed!r}")
        if g.number_of_nodes() > 1 and not nx.is_connected(g):
            parts = sorted((sorted(c) for c in nx.connected_components(g)), key=len)
            raise TopologyError(f"topology is not connected: nodes {parts[0][:10]} cannot reach node {parts[-1][0]}")

    # ------------------------------------------------------------------ basics
    @property
    def nodes(self) -> list[int]:
        return sorted(self.graph.nodes)

    def __len__(self) -> int:
        return self.graph.number_of_nodes()

    def speed(self, node: int) -> float:
        return float(self.graph.nodes[node]["speed"])

    def compute_time(self, node: int, local_steps: int, step_seconds: float) -> float:
        """Seconds ``node`` needs for ``local_steps`` steps (``step_seconds`` at speed 1)."""
        return local_steps * step_seconds / self.speed(node)

    def subgraph(self, nodes: Iterable[int]) -> "Topology":
        """Peers ``nodes`` only (links among them); used when peers drop out. May raise if cut."""
        return Topology(self.graph.subgraph(list(nodes)).copy())

    def link_time(self, u: int, v: int, nbytes: float) -> float:
        d = self.graph.edges[u, v]
        return d["latency"] + nbytes / d["bandwidth"]

    def path(self, u: int, v: int, nbytes: float = 0.0) -> list[int]:
        """Fastest path from u to v for a message of ``nbytes`` (one shortest-path tree per source
        and size class, cached: a star of N transfers costs one search, not N)."""
        if u == v:
            return [u]
        if self.direct_is_fastest(nbytes):
            return [u, v]
        return self._tree(u, nbytes).path_to(v)

    def _tree(self, source: int, nbytes: float) -> "_ShortestPaths":
        key = ("tree", source, int(nbytes))
        if key not in self._paths:
            matrix = self._paths.get(("all", int(nbytes)))
            if matrix is not None:  # the all-pairs search already holds this source's tree
                self._paths[key] = matrix.row(source)
            else:
                self._paths[key] = _ShortestPaths.search(self, int(nbytes), [source]).row(source)
        return self._paths[key]

    def path_time(self, u: int, v: int, nbytes: float) -> float:
        """Transfer time of one message alone on the network (store and forward)."""
        p = self.path(u, v, nbytes)
        return float(sum(self.link_time(a, b, nbytes) for a, b in zip(p, p[1:])))

    transfer_time = path_time

    def latency_matrix(self, nbytes: float = 0.0) -> np.ndarray:
        """Pairwise fastest-path time (symmetric), indexed by position in :attr:`nodes`."""
        key = ("matrix", int(nbytes))
        if key not in self._paths:
            nodes = self.nodes
            if self.direct_is_fastest(nbytes):  # every entry is one link: O(N^2), no Dijkstra
                index = {v: i for i, v in enumerate(nodes)}
                m = np.zeros((len(nodes), len(nodes)), dtype=float)
                for a, b, d in self.graph.edges(data=True):
                    m[index[a], index[b]] = m[index[b], index[a]] = d["latency"] + nbytes / d["bandwidth"]
                self._paths[key] = m
            else:  # one all-pairs search in C (scipy); its trees also answer path() for every source
                found = _ShortestPaths.search(self, int(nbytes), None)
                self._paths[("all", int(nbytes))] = found
                self._paths[key] = found.dist
        return self._paths[key].copy()

    def direct_is_fastest(self, nbytes: float = 0.0) -> bool:
        """Whether every pair of peers is linked and no relayed path can beat a direct link for a
        message of ``nbytes``: true when the slowest link takes less than twice the fastest (any
        path of two or more hops is then strictly slower than any single link). The fastest
        path is then the link itself, found without a shortest-path search (complete graphs:
        O(N^2) for all pairs instead of a Dijkstra per pair)."""
        key = ("direct", float(nbytes))
        if key not in self._paths:
            g, n = self.graph, self.graph.number_of_nodes()
            times = [d["latency"] + nbytes / d["bandwidth"] for _, _, d in g.edges(data=True)]
            self._paths[key] = bool(n > 1 and g.number_of_edges() == n * (n - 1) // 2 and max(times) < 2 * min(times))
        return self._paths[key]

    def centre(self, nbytes: float = 0.0) -> int:
        """The node whose worst fastest-path time to any other node is smallest."""
        m = self.latency_matrix(nbytes)
        return self.nodes[int(np.argmin(m.max(axis=1)))]

    # ------------------------------------------------------------------ phases
    def phase(self, transfers: Sequence[tuple[int, int, float]]) -> dict:
        """Time and bytes of concurrent transfers ``(src, dst, nbytes)`` (see module docstring).

        Returns ``{"seconds", "link-bytes" {(u, v): bytes}, "peer-sent" {n: bytes},
        "peer-received" {n: bytes}}``; a transfer to oneself costs nothing.
        """
        link_load: dict[tuple[int, int], float] = defaultdict(float)
        nic_out: dict[int, float] = defaultdict(float)
        nic_in: dict[int, float] = defaultdict(float)
        paths = []
        for src, dst, nbytes in transfers:
            if src == dst or nbytes <= 0:
                paths.append(None)
                continue
            p = self.path(src, dst, nbytes)
            paths.append(p)
            for a, b in zip(p, p[1:]):
                link_load[(a, b)] += nbytes
                nic_out[a] += nbytes
                nic_in[b] += nbytes
        seconds = 0.0
        for (src, dst, nbytes), p in zip(transfers, paths):
            if p is None:
                continue
            lat, drain = 0.0, 0.0
            for a, b in zip(p, p[1:]):
                d = self.graph.edges[a, b]
                lat += d["latency"]
                drain = max(drain, link_load[(a, b)] / d["bandwidth"],
                            nic_out[a] / self.graph.nodes[a]["nic"], nic_in[b] / self.graph.nodes[b]["nic"])
            seconds = max(seconds, lat + drain)
        sent: dict[int, float] = defaultdict(float)
        recv: dict[int, float] = defaultdict(float)
        for src, dst, nbytes in transfers:
            if src != dst:
                sent[src] += nbytes
                recv[dst] += nbytes
        return {"seconds": seconds, "link-bytes": dict(link_load), "peer-sent": dict(sent), "peer-received": dict(recv)}

    def to_dict(self) -> dict:
        return {
            "nodes": [{"id": n, "speed": d["speed"], "nic": d["nic"]} for n, d in sorted(self.graph.nodes(data=True))],
            "edges": [{"u": u, "v": v, "latency": d["latency"], "bandwidth": d["bandwidth"]}
                      for u, v, d in self.graph.edges(data=True)],
        }


class _ShortestPaths:
    """Fastest-path distances and predecessor trees from some sources (scipy's Dijkstra, in C).

    Edge weight = ``latency + nbytes / bandwidth`` (the store-and-forward time of one hop), as
    everywhere in this module; a zero-weight link is still a link (scipy keeps explicit zeros).
    """

    def __init__(self, nodes: list[int], dist: np.ndarray, pred: np.ndarray, sources: list[int]):
        self.nodes, self.dist, self.pred = nodes, dist, pred
        self.row_of = {s: i for i, s in enumerate(sources)}

    @classmethod
    def search(cls, topo: "Topology", nbytes: int, sources: list[int] | None) -> "_ShortestPaths":
        from scipy.sparse import csr_matrix
        from scipy.sparse.csgraph import dijkstra

        nodes = topo.nodes
        index = {v: i for i, v in enumerate(nodes)}
        rows, cols, weights = [], [], []
        for a, b, d in topo.graph.edges(data=True):
            w = d["latency"] + nbytes / d["bandwidth"]
            rows += [index[a], index[b]]
            cols += [index[b], index[a]]
            weights += [w, w]
        n = len(nodes)
        graph = csr_matrix((np.asarray(weights, dtype=float), (rows, cols)), shape=(n, n))
        picked = nodes if sources is None else list(sources)
        dist, pred = dijkstra(graph, directed=True, indices=[index[s] for s in picked], return_predecessors=True)
        return cls(nodes, np.atleast_2d(dist), np.atleast_2d(pred), picked)

    def row(self, source: int) -> "_Tree":
        i = self.row_of[source]
        return _Tree(self.nodes, source, self.pred[i])


class _Tree:
    """One source's shortest-path tree: ``path_to(v)`` walks the predecessors back from v."""

    def __init__(self, nodes: list[int], source: int, pred: np.ndarray):
        self.nodes, self.source, self.pred = nodes, source, pred
        self.index = {v: i for i, v in enumerate(nodes)}

    def path_to(self, target: int) -> list[int]:
        out, i = [target], self.index[target]
        while self.nodes[i] != self.source:
            i = int(self.pred[i])
            if i < 0:
                raise TopologyError(f"no path from {self.source} to {target}")
            out.append(self.nodes[i])
        return out[::-1]


# ---------------------------------------------------------------------- generators
def _speeds(n: int, heterogeneity: float, seed: int) -> list[float]:
    """Relative compute speeds: 1.0 each, or log-normal (sd ``heterogeneity``) with mean 1."""
    if heterogeneity <= 0:
        return [1.0] * n
    s = np.random.default_rng(seed + 7).lognormal(0.0, heterogeneity, size=n)
    return list(s / s.mean())


def complete(n: int, latency: float = DEFAULT_LATENCY, bandwidth: float = DEFAULT_BANDWIDTH,
             heterogeneity: float = 0.0, seed: int = 0) -> Topology:
    """Every peer linked to every other with the same latency and bandwidth."""
    g = nx.complete_graph(n)
    nx.set_edge_attributes(g, float(latency), "latency")
    nx.set_edge_attributes(g, float(bandwidth), "bandwidth")
    for node, s in zip(range(n), _speeds(n, heterogeneity, seed)):
        g.nodes[node]["speed"] = float(s)
    return Topology(g)


def random_geometric(n: int, radius: float | None = None, seed: int = 0, base_latency: float = 0.005,
                     latency_per_unit: float = 0.1, bandwidth_range: tuple[float, float] = (5e6, 25e6),
                     heterogeneity: float = 0.0) -> Topology:
    """Peers at random points of the unit square, linked when closer than ``radius``.

    Link latency = ``base_latency + latency_per_unit * distance``; bandwidth uniform in
    ``bandwidth_range``. The radius grows until the graph is connected (default start:
    ``sqrt(2 log n / n)``, the usual connectivity threshold).
    """
    rng = np.random.default_rng(seed)
    pos = {i: tuple(rng.random(2)) for i in range(n)}
    r = radius if radius is not None else math.sqrt(2 * math.log(max(n, 2)) / max(n, 2))
    while True:
        g = nx.random_geometric_graph(n, r, pos=pos)
        if n == 1 or nx.is_connected(g):
            break
        r *= 1.1
    for u, v in g.edges:
        dist = math.dist(pos[u], pos[v])
        g.edges[u, v]["latency"] = base_latency + latency_per_unit * dist
        g.edges[u, v]["bandwidth"] = float(rng.uniform(*bandwidth_range))
    for node, s in zip(range(n), _speeds(n, heterogeneity, seed)):
        g.nodes[node]["speed"] = float(s)
        g.nodes[node]["pos"] = pos[node]
    return Topology(g)


def load(path: str, num_nodes: int | None = None) -> Topology:
    """Read a topology file.

    JSON: ``{"nodes": [{"id": 0, "speed": 1.0}, ...], "edges": [{"u": 0, "v": 1, "latency": 0.02,
    "bandwidth": 1.25e7}, ...]}`` (``nodes`` optional when every edge names known ids).
    Edge list (any other extension): one ``u v latency bandwidth`` per line, ``#`` comments.
    ``num_nodes`` (if given) is the set of peers expected: ``0..num_nodes-1``; an edge naming
    any other node is an error.
    """
    if not os.path.isfile(path):
        raise TopologyError(f"topology file {path!r} not found")
    g = nx.Graph()
    declared: set | None = None
    edges: list[tuple] = []
    if path.endswith(".json"):
        try:
            with open(path) as fh:
                doc = json.load(fh)
        except json.JSONDecodeError as exc:
            raise TopologyError(f"topology file {path!r} is not valid JSON: {exc}") from None
        if "nodes" in doc:
            declared = set()
            for nd in doc["nodes"]:
                nid = int(nd["id"]) if isinstance(nd, dict) else int(nd)
                declared.add(nid)
                attrs = {k: float(v) for k, v in nd.items() if k in ("speed", "nic")} if isinstance(nd, dict) else {}
                g.add_node(nid, **attrs)
        for e in doc.get("edges", []):
            try:
                edges.append((int(e["u"]), int(e["v"]), float(e.get("latency", DEFAULT_LATENCY)),
                              float(e.get("bandwidth", DEFAULT_BANDWIDTH))))
            except (KeyError, TypeError, ValueError) as exc:
                raise TopologyError(f"topology file {path!r}: bad edge {e!r} ({exc})") from None
    else:
        with open(path) as fh:
            for lineno, line in enumerate(fh, start=1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                parts = line.replace(",", " ").split()
                try:
                    u, v = int(parts[0]), int(parts[1])
                    lat = float(parts[2]) if len(parts) > 2 else DEFAULT_LATENCY
                    bw = float(parts[3]) if len(parts) > 3 else DEFAULT_BANDWIDTH
                except (IndexError, ValueError):
                    raise TopologyError(f"topology file {path!r} line {lineno}: expected 'u v latency bandwidth', got {line!r}") from None
                edges.append((u, v, lat, bw))
    known = declared if declared is not None else (set(range(num_nodes)) if num_nodes is not None else None)
    for u, v, lat, bw in edges:
        for node in (u, v):
            if known is not None and node not in known:
                raise TopologyError(f"link {u}-{v} names unknown node {node} (known nodes: {sorted(known)[:10]}{'...' if len(known) > 10 else ''})")
        if not bw > 0:
            raise TopologyError(f"link {u}-{v} has non-positive bandwidth {bw!r} (bytes/s must be > 0)")
        if not lat >= 0:
            raise TopologyError(f"link {u}-{v} has negative latency {lat!r}")
        g.add_edge(u, v, latency=lat, bandwidth=bw)
    if num_nodes is not None:
        g.add_nodes_from(range(num_nodes))
        if len(g) != num_nodes:
            raise TopologyError(f"topology file {path!r} has {len(g)} nodes, the run has {num_nodes} peers")
    return Topology(g)


def build(spec: str, num_nodes: int, seed: int = 0, latency: float = DEFAULT_LATENCY,
          bandwidth: float = DEFAULT_BANDWIDTH, heterogeneity: float = 0.0) -> Topology:
    """``"complete"`` | ``"geometric"`` | a file path (run-config key ``topology``)."""
    if spec == "complete":
        return complete(num_nodes, latency, bandwidth, heterogeneity, seed)
    if spec == "geometric":
        return random_geometric(num_nodes, seed=seed, heterogeneity=heterogeneity)
    if os.path.sep in spec or os.path.isfile(spec) or spec.endswith((".json", ".txt", ".edges", ".csv")):
        return load(spec, num_nodes)
    raise TopologyError(f"topology {spec!r} is not 'complete', 'geometric' or an existing file")


# ---------------------------------------------------------------------- ring order
def ring_order(topo: Topology, method: str = "tsp", seed: int = 0, nbytes: float = 0.0,
               nodes: Sequence[int] | None = None) -> list[int]:
    """A Hamiltonian cycle over the peers (as a list, the cycle closes back to the first).

    ``tsp``: minimum-latency cycle on the fastest-path metric (networkx Christofides, then
    2-opt/simulated-annealing refinement via ``threshold_accepting_tsp``; exact for N <= 8);
    ``naive``: node id order; ``random``: a seeded random permutation. ``nodes``: only these
    peers (e.g. the ones still alive); messages between them may route through any node.
    """
    all_nodes = topo.nodes
    nodes = sorted(nodes) if nodes is not None else all_nodes
    n = len(nodes)
    if n <= 3 or method == "naive":
        return list(nodes)
    if method == "random":
        return [nodes[i] for i in np.random.default_rng(seed).permutation(n)]
    if method != "tsp":
        raise TopologyError(f"ring-order {method!r} is not 'tsp', 'naive' or 'random'")
    full = topo.latency_matrix(nbytes)
    idx = [all_nodes.index(v) for v in nodes]
    m = full[np.ix_(idx, idx)]
    if n <= 8:
        import itertools

        best, best_cost = None, math.inf
        for perm in itertools.permutations(range(1, n)):
            order = (0, *perm)
            c = cycle_cost(m, order)
            if c < best_cost - 1e-15:
                best, best_cost = order, c
        return [nodes[i] for i in best]
    from networkx.algorithms import approximation as approx

    kn = nx.Graph()
    for i in range(n):
        for j in range(i + 1, n):
            kn.add_edge(i, j, weight=float(m[i, j]))
    cycle = approx.christofides(kn, weight="weight")
    try:
        cycle = approx.threshold_accepting_tsp(kn, cycle, weight="weight", seed=seed, max_iterations=20, N_inner=200)
    except Exception:  # refinement is optional
        pass
    order = _two_opt(m, list(cycle[:-1]))
    # never worse than the naive order
    if cycle_cost(m, order) > cycle_cost(m, list(range(n))):
        order = list(range(n))
    return [nodes[i] for i in order]


def cycle_cost(m: np.ndarray, order: Sequence[int]) -> float:
    return float(sum(m[order[i], order[(i + 1) % len(order)]] for i in range(len(order))))


def _two_opt(m: np.ndarray, order: list[int]) -> list[int]:
    improved = True
    n = len(order)
    while improved:
        improved = False
        for i in range(1, n - 1):
            for j in range(i + 1, n):
                a, b, c, d = order[i - 1], order[i], order[j], order[(j + 1) % n]
                if m[a, c] + m[b, d] < m[a, b] + m[c, d] - 1e-12:
                    order[i : j + 1] = reversed(order[i : j + 1])
                    improved = True
    return order


def ring_cycle_latency(topo: Topology, order: Sequence[int], nbytes: float = 0.0) -> float:
    """Sum of fastest-path times around the ring (one lap of a message of ``nbytes``)."""
    return float(sum(topo.path_time(order[i], order[(i + 1) % len(order)], nbytes) for i in range(len(order))))


# ---------------------------------------------------------------------- analytic round times
def fedavg_round(topo: Topology, nbytes: float, server: int | str = "centre", local_steps: int = 0,
                 step_seconds: float = 0.0, participants: Iterable[int] | None = None,
                 server_nic: float | None = None) -> dict:
    """Simulated round of server FedAvg on ``topo``: the server (co-located at a peer node,
    default the graph's centre) sends the global adapter to every participant (one phase),
    they train (the slowest sets the pace), and upload their adapters (one phase).
    ``server_nic`` (bytes/s) overrides the server node's NIC capacity (links stay as they are).
    """
    peers = list(participants) if participants is not None else topo.nodes
    s = topo.centre(nbytes) if server == "centre" else int(server)
    saved = topo.graph.nodes[s]["nic"]
    if server_nic is not None:  # e.g. a data-centre server with a faster NIC than the peers
        topo.graph.nodes[s]["nic"] = float(server_nic)
    try:
        down = topo.phase([(s, p, nbytes) for p in peers])
        up = topo.phase([(p, s, nbytes) for p in peers])
    finally:
        topo.graph.nodes[s]["nic"] = saved
    compute = max((topo.compute_time(p, local_steps, step_seconds) for p in peers), default=0.0)
    return _merge_phases([down, up], compute, server=s)


def ring_round(topo: Topology, order: Sequence[int], nbytes: float, local_steps: int = 0,
               step_seconds: float = 0.0) -> dict:
    """Simulated ring all-reduce round: compute, then 2(N-1) steps of N concurrent chunk sends."""
    n = len(order)
    phases = []
    if n > 1:
        chunk = nbytes / n
        step = topo.phase([(order[i], order[(i + 1) % n], chunk) for i in range(n)])
        phases = [step] * (2 * (n - 1))
    compute = max((topo.compute_time(p, local_steps, step_seconds) for p in order), default=0.0)
    return _merge_phases(phases, compute)


def gossip_pairs(topo: Topology, k: int, rng: np.random.Generator, nodes: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """Each peer picks ``k`` distinct graph neighbours (all, if it has fewer); returns the
    undirected exchange edges (push-pull: both ends send)."""
    nodes = list(nodes) if nodes is not None else topo.nodes
    alive = set(nodes)
    edges = set()
    for i in nodes:
        nb = sorted(set(topo.graph.neighbors(i)) & alive)
        if not nb:
            continue
        pick = rng.choice(nb, size=min(k, len(nb)), replace=False)
        for j in pick:
            edges.add((min(i, int(j)), max(i, int(j))))
    return sorted(edges)


def gossip_round(topo: Topology, pairs: Sequence[tuple[int, int]], nbytes: float, local_steps: int = 0,
                 step_seconds: float = 0.0, nodes: Sequence[int] | None = None) -> dict:
    """One synchronous gossip mixing step: every exchange edge carries the model both ways."""
    transfers = [(i, j, nbytes) for i, j in pairs] + [(j, i, nbytes) for i, j in pairs]
    nodes = list(nodes) if nodes is not None else topo.nodes
    compute = max((topo.compute_time(p, local_steps, step_seconds) for p in nodes), default=0.0)
    return _merge_phases([topo.phase(transfers)], compute)


def _merge_phases(phases: list[dict], compute: float, **extra) -> dict:
    link: dict = defaultdict(float)
    sent: dict = defaultdict(float)
    recv: dict = defaultdict(float)
    net = 0.0
    for ph in phases:
        net += ph["seconds"]
        for k, v in ph["link-bytes"].items():
            link[k] += v
        for k, v in ph["peer-sent"].items():
            sent[k] += v
        for k, v in ph["peer-received"].items():
            recv[k] += v
    return {"network-seconds": net, "compute-seconds": compute, "round-seconds": net + compute,
            "link-bytes": dict(link), "peer-sent": dict(sent), "peer-received": dict(recv),
            "total-bytes": float(sum(sent.values())), **extra}


def jsonable_accounting(acc: dict) -> dict:
    """Keys as strings (``"u->v"`` for links) so the dict can go into a metrics JSON."""
    out = {}
    for k, v in acc.items():
        if k == "link-bytes":
            out[k] = {f"{a}->{b}": float(x) for (a, b), x in v.items()}
        elif isinstance(v, dict):
            out[k] = {str(a): float(x) for a, x in v.items()}
        else:
            out[k] = v
    return out
