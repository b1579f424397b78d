"""A SuperNode that restarts connects under a new Flower node id: the Roster lets it take its
partition back only when the node that held it is gone and it proves that node's signer key
(the real fedledger ClientApp answering ``query.identity`` in process)."""

from __future__ import annotations

from eth_account import Account
from flwr.app import Context, RecordDict

from fedledger.client_app import app as client_app
from fedledger.identity import Roster
from fedledger.inprocess import InProcessGrid

RUN = 5
AUDITED = {"audit": "eth-tester"}


def _restart(grid: InProcessGrid, partition: int, new_id: int, keep_old: bool = False, **node_config) -> int:
    """Partition ``partition``'s SuperNode connects again under ``new_id`` (its old id gone unless ``keep_old``)."""
    old = grid.node_of[partition]
    before = grid.contexts[old]
    if not keep_old:
        del grid.contexts[old]
        grid.node_ids.remove(old)
    grid.node_ids.append(new_id)
    grid.contexts[new_id] = Context(run_id=before.run_id, node_id=new_id, state=RecordDict(),
                                    node_config={**before.node_config, **node_config}, run_config=before.run_config)
    grid.node_of[partition], grid.partition_of[new_id] = new_id, partition
    return old


def _roster(grid: InProcessGrid, signing: bool = True) -> Roster:
    roster = Roster(RUN, 3, signing=signing)
    roster.refresh(grid)
    assert len(roster.known) == 3
    return roster


def test_a_restarted_node_with_the_same_key_takes_its_partition_back(caplog):
    grid = InProcessGrid(client_app, 3, AUDITED, run_id=RUN)
    roster = _roster(grid)
    signer = roster.known[grid.node_of[2]].signer
    old = _restart(grid, 2, new_id=424242)
    roster.refresh(grid)
    assert roster.nodes_by_partition()[2] == 424242 and old not in roster.known
    assert roster.known[424242].signer == signer and not roster.refused
    assert roster.to_dict()["rejoined"] == {"424242": old}
    assert "node 424242 rejoins as partition 2" in caplog.text


def test_a_restarted_node_waits_while_its_old_id_is_still_connected_then_takes_over():
    grid = InProcessGrid(client_app, 3, AUDITED, run_id=RUN)
    roster = _roster(grid)
    holder = _restart(grid, 2, new_id=424242, keep_old=True)   # the SuperLink still lists the old id
    roster.refresh(grid)
    assert roster.nodes_by_partition()[2] == holder and 424242 not in roster.known and not roster.refused
    grid.node_ids.remove(holder)                                # two missed heartbeats later
    roster.refresh(grid)
    assert roster.nodes_by_partition()[2] == 424242 and roster.rejoined == {424242: holder}


def test_a_newcomer_with_another_key_does_not_take_over_a_gone_nodes_partition(tmp_path):
    key_file = tmp_path / "other.key"
    key_file.write_text(Account.create().key.hex())
    grid = InProcessGrid(client_app, 3, AUDITED, run_id=RUN)
    roster = _roster(grid)
    holder = _restart(grid, 2, new_id=424242, **{"key-file": str(key_file)})
    roster.refresh(grid)
    assert 424242 not in roster.known and roster.known[holder].partition == 2
    assert roster.refused[424242] == f"partition 2 already belongs to node {holder}"


def test_without_signatures_a_restarted_node_takes_a_gone_nodes_partition_as_a_first_claim_would():
    # an unsigned run (serverless, audit="none") proves no claim, a first one neither: a newcomer
    # takes over the partition of a node that is gone, and is recorded as rejoined
    grid = InProcessGrid(client_app, 3, {}, run_id=RUN)
    roster = _roster(grid, signing=False)
    holder = _restart(grid, 2, new_id=424242)
    roster.refresh(grid)
    assert not roster.refused and roster.rejoined == {424242: holder}
    assert roster.known[424242].partition == 2 and holder not in roster.known
