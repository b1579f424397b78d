"""The real ClientApp (tiny model) signing its updates, Flower's FedAvg behind OnChainAudit
(eth-tester), driven by Flower's own ``Strategy.start`` in-process; then the audit."""

from __future__ import annotations

from .conftest import TINY


def test_clientapp_signatures_and_audit_end_to_end(tmp_path):
    from flwr.serverapp.strategy import FedAvg

    from fedledger.chain.audit import audit_run
    from fedledger.chain.audit_strategy import OnChainAudit
    from fedledger.chain.ledger import Ledger
    from fedledger.chain.store import ArtifactStore
    from fedledger.client_app import app as client_app
    from fedledger.config import Settings
    from fedledger.inprocess import InProcessGrid
    from fedledger.strategies.kernels import to_arrayrecord
    from fedledger.task import get_task

    cfg = {**TINY, "num-rounds": 2, "local-steps": 2, "audit": "eth-tester"}
    grid = InProcessGrid(client_app, 2, cfg, run_id=11)
    strategy = OnChainAudit(FedAvg(), Ledger.in_process(), ArtifactStore(str(tmp_path)), 11)
    initial = get_task(Settings.from_run_config(cfg), 1).initial_adapter
    result = strategy.start(grid=grid, initial_arrays=to_arrayrecord(initial), num_rounds=2)
    assert result.arrays is not None
    info = strategy.trail.info()
    # the admin deploys and enrols; the aggregator opens the run, then 3 transactions per round
    assert info["transactions"] == 2 + 1 + 3 * 2 and info["rejected-replies"] == {}, info
    assert [t["label"] for t in strategy.trail.ledger.tx_log] == ["deploy", "openRun"] + [
        "openRound", "recordUpdates", "commitAggregate"] * 2
    report = audit_run(str(tmp_path), ledger=strategy.trail.ledger)     # the live in-process chain
    assert report.ok, report.table()
    offline = audit_run(str(tmp_path))              # the run folder's events.jsonl: the aggregator's own copy
    assert offline.exit_code == 3 and not offline.problems and offline.rows[0].status == "NO-CHAIN", offline.table()
    assert sum(r.kind == "update" for r in report.rows) == 4
    assert [r.detail for r in report.rows if r.kind == "aggregate"] == ["FedAvg recomputed bit-exactly"] * 2
