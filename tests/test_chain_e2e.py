"""The real ClientApp (tiny model) signing its updates + the factory's strategy stack wrapped by
OnChainAudit (eth-tester), driven in-process; then the audit."""

from __future__ import annotations

import pytest

from .conftest import TINY


def test_clientapp_signatures_and_audit_end_to_end(tmp_path):
    from fedledger.chain.audit import audit_run
    from fedledger.chain.audit_strategy import build_audit
    from fedledger.client_app import app as client_app
    from fedledger.config import Settings
    from fedledger.inprocess import InProcessGrid
    from fedledger.strategies.kernels import to_arrayrecord
    from fedledger.strategy_factory import build_strategy
    from fedledger.task import get_task

    cfg = {**TINY, "num-rounds": 2, "local-steps": 2, "audit": "eth-tester"}
    settings = Settings.from_run_config(cfg)
    grid = InProcessGrid(client_app, 2, cfg, run_id=11)
    wrap, info = build_audit("eth-tester", settings.rpc_url, "", str(tmp_path), 11, run_config=settings.to_dict())
    strategy = build_strategy(settings, 2, audit=wrap)
    result = strategy.start(grid=grid, initial_arrays=to_arrayrecord(get_task(settings, 1).initial_adapter),
                            num_rounds=2)
    assert result.arrays is not None
    d = info()
    assert d["transactions"] == 1 + 3 * 2 and not d.get("refused-replies"), d
    report = audit_run(str(tmp_path))
    assert report.ok, report.table()
    assert sum(r.client != "aggregate" for r in report.rows) == 4
    assert all("recomputed bit-exactly" in r.detail for r in report.rows if r.client == "aggregate"), report.table()
