"""Network accounting on the shared peer-to-peer model (``strategies/topology.py``).

Every mode reports the same per-round fields (the ``exchange`` entry of a round): bytes each
topology peer sent and received, bytes per directed link, simulated network + compute time, and
wall time. The serverless relay runners build them from their own phases
(:func:`exchange_fields`); hub strategies (server FedAvg & co) get them from
:class:`HubAccounting`, a ``fedledger.core.pipeline.Observer`` that reads the bytes the round
pipeline counted per node and times them as a star through the server's node:

    pipeline = RoundPipeline(FedAvg(), observers=[HubAccounting(topology, local_steps=4,
                                                                step_seconds=1.0, peer_of=roster.partition)])
    pipeline.reports[1].extra["exchange"]   # {"strategy": "server-fedavg", "peer-bytes-sent": ...}

Topology peers are partition ids; ``peer_of(node_id)`` says which one a Flower node is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from fedledger.core.pipeline import RoundReport

from . import topology as topo_lib

log = logging.getLogger("fedledger")


def exchange_fields(acc: Mapping) -> dict:
    """Topology accounting (``topology._merge_phases``) -> the JSON-ready per-round fields."""
    j = topo_lib.jsonable_accounting(dict(acc))
    return {"sim-network-seconds": acc["network-seconds"], "sim-compute-seconds": acc["compute-seconds"],
            "sim-round-seconds": acc["round-seconds"], "peer-bytes-sent": j["peer-sent"],
            "peer-bytes-received": j["peer-received"], "link-bytes": j["link-bytes"],
            "total-peer-bytes": acc["total-bytes"]}


class HubAccounting:
    """Observer of hub rounds: the star exchange through ``server`` on the run's network model.

    ``server``: a topology peer, or ``"centre"`` (the peer whose worst fastest-path time to any
    other peer is smallest, for a message of the round's adapter size). The download phase
    carries ``report.down_bytes``, the upload phase ``report.up_bytes``; the round's compute is
    the slowest participant's ``local_steps`` steps. It never touches the aggregate.
    Wall seconds run from the round's ``configure_train`` (``report.started``) to the end of its
    aggregation.
    """

    strategy_name = "server-fedavg"

    def __init__(self, topology: topo_lib.Topology, *, local_steps: int, step_seconds: float,
                 peer_of: Callable[[int], int | None], server: int | str = "centre") -> None:
        if not isinstance(topology, topo_lib.Topology):
            raise TypeError(f"topology must be a Topology, got {type(topology).__name__}")
        if int(local_steps) < 1 or not float(step_seconds) > 0:
            raise ValueError(f"local_steps must be >= 1 and step_seconds > 0, got {local_steps} and {step_seconds}")
        if server != "centre" and (isinstance(server, bool) or not isinstance(server, int)
                                   or server not in topology.graph):
            raise topo_lib.TopologyError(f"server {server!r} is not 'centre' or a peer of the topology "
                                         f"(peers {topology.nodes[:10]}{'...' if len(topology) > 10 else ''})")
        self.topology = topology
        self.local_steps, self.step_seconds = int(local_steps), float(step_seconds)
        self.peer_of, self.server = peer_of, server
        self._unknown: set[int] = set()

    def observe(self, report: RoundReport) -> dict:
        down, up = self._by_peer(report.down_bytes), self._by_peer(report.up_bytes)
        up = {p: b for p, b in up.items() if b > 0}  # a node that replied with an error sent no model
        server = self._server(max(up.values(), default=0))
        topo = self.topology
        phases = [topo.phase([(server, p, b) for p, b in sorted(down.items())]),
                  topo.phase([(p, server, b) for p, b in sorted(up.items())])]
        compute = max((topo.compute_time(p, self.local_steps, self.step_seconds) for p in up), default=0.0)
        acc = topo_lib._merge_phases(phases, compute)
        entry = {"round": report.round, "strategy": self.strategy_name, "server-node": server,
                 "participants": sorted(up), **exchange_fields(acc),
                 "wall-seconds": time.perf_counter() - report.started}
        return {"exchange": entry}

    def _server(self, nbytes: float) -> int:
        return self.topology.centre(nbytes) if self.server == "centre" else int(self.server)

    def _by_peer(self, by_node: Mapping[int, int]) -> dict[int, int]:
        """Node id -> bytes, as topology peer -> bytes; nodes without a peer are left out (once logged)."""
        out: dict[int, int] = {}
        for node_id, nbytes in by_node.items():
            peer = self.peer_of(int(node_id))
            if peer is None or peer not in self.topology.graph:
                if node_id not in self._unknown:
                    self._unknown.add(node_id)
                    log.warning("network accounting: node %s is no peer of the topology (peer %s); its bytes are "
                                "not counted", node_id, peer)
                continue
            out[int(peer)] = out.get(int(peer), 0) + int(nbytes)
        return out
