"""The real ServerApp and ClientApp, driven in-process (no Ray): random 64-bit node ids as in a real
run, one identity per node resolved once, the round pipeline, the run folder."""

import json
import os

import pytest
from flwr.app import Context, RecordDict

from fedledger import server_app
from fedledger.client_app import app as client_app
from fedledger.inprocess import InProcessGrid

from .conftest import TINY


def _run(tmp_path, cfg, num_nodes=3, drop_partitions=(), partition_override=None):
    cfg = {**TINY, "run-dir": str(tmp_path / "runs"), **cfg}
    grid = InProcessGrid(client_app, num_nodes, cfg, run_id=7, seed=11)
    for p, claimed in (partition_override or {}).items():
        grid.contexts[grid.node_of[p]].node_config["partition-id"] = claimed
    grid.drop = {grid.node_of[p] for p in drop_partitions}
    folder = server_app.run(grid, Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config=cfg),
                            settle=0.0)
    with open(os.path.join(folder, "metrics.json")) as fh:
        return grid, json.load(fh)


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedmedian"])
def test_rounds_lower_heldout_loss_with_random_node_ids(tmp_path, name):
    grid, m = _run(tmp_path, {"strategy": name})
    losses = [m["rounds"][r]["central"]["eval-loss"] for r in ("0", "1", "2")]
    assert losses[-1] < losses[0], losses
    report = m["rounds"]["1"]["report"]
    assert report["sent"] == 3 and report["aggregated"] == 3 and not report["rejected"]
    assert all(nid > 2**20 for nid in grid.node_ids)  # not 0..N-1
    resolved = {int(n): i["partition"] for n, i in m["identities"]["nodes"].items()}
    assert resolved == grid.partition_of
    assert {k["partition"] for k in report["kept"]} == {0, 1, 2}


def test_a_node_that_does_not_reply_does_not_stop_the_round(tmp_path):
    grid, m = _run(tmp_path, {"num-rounds": 1}, drop_partitions=[2])
    report = m["rounds"]["1"]["report"]
    assert report["aggregated"] == 2 and report["received"] == 2
    assert m["rounds"]["1"]["central"]["eval-loss"] < m["rounds"]["0"]["central"]["eval-loss"]


def test_a_client_claiming_another_partition_takes_over_nothing(tmp_path):
    """Partition 2's node says it is partition 0: neither claimant of partition 0 is enrolled,
    their train replies are rejected as unknown nodes, and the run goes on with partition 1."""
    grid, m = _run(tmp_path, {"num-rounds": 1}, partition_override={2: 0})
    refused = {int(n) for n in m["identities"]["refused"]}
    assert refused == {grid.node_of[0], grid.node_of[2]}
    report = m["rounds"]["1"]["report"]
    assert [k["partition"] for k in report["kept"]] == [1]
    assert {r["node-id"] for r in report["rejected"]} == refused
    assert all(r["stage"] == "identity" for r in report["rejected"])
