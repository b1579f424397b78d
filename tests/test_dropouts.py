"""Dropouts: a client that does not reply in a round is shown ABSENT in that round (who was
missing from which round), never a problem; min-train-nodes / min-available-nodes reach Flower's
sampling."""

from __future__ import annotations

from flwr.app import ConfigRecord

from fedledger.chain.audit import audit_run
from fedledger.chain.ledger import Ledger

from .replies import NodeGrid, adapter, record
from .test_chain_audit import Federation, audited


def test_a_client_missing_from_a_round_is_absent_there_and_the_audit_passes(tmp_path):
    from flwr.serverapp.strategy import FedAvg

    chain = Ledger.in_process()
    fed = Federation()
    pipeline = audited(FedAvg(), chain, tmp_path, fed)
    arrays = adapter(fed.seed)
    for rnd in (1, 2, 3):
        instructions = list(pipeline.configure_train(rnd, record(arrays), ConfigRecord(), NodeGrid(fed.nodes)))
        replies = fed.replies(instructions, arrays, rnd)
        if rnd == 2:   # partition 2's SuperNode died mid-round: no reply
            replies = [r for r in replies if r.metadata.src_node_id != fed.nodes[2]]
        agg, _ = pipeline.aggregate_train(rnd, replies)
        arrays = {k: v.numpy() for k, v in agg.items()}
    report = audit_run(str(tmp_path), ledger=chain)
    assert report.ok, report.table()
    assert [(r.round, r.client) for r in report.absent] == [(2, fed.address(2))]
    assert "1 client-round(s) ABSENT" in report.verdict and report.to_dict()["absent"] == 1
    assert sum(r.status == "OK" and r.kind == "update" for r in report.rows) == 8   # 3 + 2 + 3
    assert "did not reply (a dropout)" in report.absent[0].detail


def test_min_train_and_available_nodes_reach_the_flower_strategy():
    from fedledger.config import Settings
    from fedledger.strategy_factory import build_inner

    default = build_inner(Settings.from_run_config({"strategy": "fedadam"}), 3)
    assert (default.min_train_nodes, default.min_available_nodes) == (1, 3)
    fewer = build_inner(Settings.from_run_config({"strategy": "krum", "min-train-nodes": 2,
                                                  "min-available-nodes": 2}), 3)
    assert (fewer.min_train_nodes, fewer.min_available_nodes) == (2, 2)


def test_flowers_node_unavailable_stand_in_reply_is_a_dropout_not_a_refusal(tmp_path):
    """A SuperNode killed mid-round: the SuperLink answers for it with its own NODE_UNAVAILABLE
    error (Flower's function, from the SuperLink's node id). That is no reply of any client: the
    node is ABSENT in that round, and nothing is refused (a refusal naming no signer would hide
    every ABSENT row of the round)."""
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
    from flwr.serverapp.strategy import FedAvg

    chain = Ledger.in_process()
    fed = Federation()
    pipeline = audited(FedAvg(), chain, tmp_path, fed)
    arrays = adapter(fed.seed)
    for rnd in (1, 2):
        instructions = list(pipeline.configure_train(rnd, record(arrays), ConfigRecord(), NodeGrid(fed.nodes)))
        replies = fed.replies(instructions, arrays, rnd)
        if rnd == 2:
            lost = next(m for m in instructions if m.metadata.dst_node_id == fed.nodes[2])
            replies = [r for r in replies if r.metadata.src_node_id != fed.nodes[2]]
            replies.append(create_message_error_unavailable_res_message(lost.metadata, "node_unavail"))
        agg, _ = pipeline.aggregate_train(rnd, replies)
        arrays = {k: v.numpy() for k, v in agg.items()}
    report = audit_run(str(tmp_path), ledger=chain)
    assert report.ok, report.table()
    assert not report.rejected and pipeline.reports[2].received == 2
    assert [(r.round, r.client) for r in report.absent] == [(2, fed.address(2))]
