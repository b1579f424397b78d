"""Integration on a real anvil (started here on a free 127.0.0.1 port, stopped by its PID)."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest

from fedledger.chain import devnet, signing
from fedledger.chain.audit import audit_run
from fedledger.chain.audit_strategy import build_audit
from fedledger.chain.ledger import Ledger, LedgerError
from fedledger.cli_chain import main as cli

RUN = 5
ANVIL = devnet.find_anvil()
needs_anvil = pytest.mark.skipif(ANVIL is None, reason="anvil binary missing: run bash scripts/install_chain_tools.sh")


def test_anvil_present_on_ci():
    if os.environ.get("CI") == "true":
        assert ANVIL is not None, "CI must have anvil: scripts/install_chain_tools.sh did not install it"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def anvil(tmp_path):
    port = _free_port()
    state_dir = str(tmp_path / "devnet")
    info = devnet.start(port=port, state_dir=state_dir)
    yield {"url": f"http://127.0.0.1:{port}", "port": port, "dir": state_dir, "pid": info["pid"]}
    devnet.stop(state_dir)


def _rounds(strategy, rounds=2, clients=3):
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    rng = np.random.default_rng(3)
    for rnd in range(1, rounds + 1):
        replies = []
        for pid in range(clients):
            arrays = {"x.lora_A": rng.standard_normal((4, 6)).astype(np.float32)}
            audit = signing.audit_record(arrays, RUN, rnd, signing.simulation_account(pid))
            content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                                  "metrics": MetricRecord({"num-examples": 3 + pid}), "audit": ConfigRecord(audit)})
            replies.append(Message(content, reply_to=Message(RecordDict(), dst_node_id=10 + pid, message_type="train")))
        strategy.aggregate_train(rnd, replies)


@needs_anvil
def test_audited_run_survives_anvil_restart(anvil, tmp_path, capsys):
    from flwr.serverapp.strategy import FedAvg

    folder = tmp_path / "run"
    wrap, info = build_audit("anvil", anvil["url"], "", str(folder), RUN)
    strategy = wrap(FedAvg())
    _rounds(strategy)
    assert info()["chain-id"] == 31337 and info()["transactions"] == 7
    assert cli(["audit", str(folder)]) == 0
    assert "audit: OK" in capsys.readouterr().out

    # restart anvil from its state file: the history and the audit survive
    assert devnet.stop(anvil["dir"])["running"] is False
    assert not devnet.is_up(anvil["url"])
    restarted = devnet.start(port=anvil["port"], state_dir=anvil["dir"])
    assert restarted["pid"] != anvil["pid"] and restarted["block"] >= 7
    report = audit_run(str(folder))
    assert report.ok and sum(r.client != "aggregate" for r in report.rows) == 6, report.table()

    # a non-authorised account cannot write
    ledger = Ledger.connect(anvil["url"], info()["registry-address"])
    other = ledger.w3.eth.accounts[1]
    from web3.exceptions import ContractCustomError, ContractLogicError

    with pytest.raises((ContractCustomError, ContractLogicError)):
        ledger.contract.functions.openRound(RUN, 3).transact({"from": other})
    with pytest.raises((ContractCustomError, ContractLogicError)):
        ledger.contract.functions.commitAggregate(RUN, 2, b"\1" * 32).transact({"from": other})
    assert ledger.get_round(RUN, 2)["committed"] and ledger.contract.functions.currentRound(RUN).call() == 2


@needs_anvil
def test_bad_input_gives_one_line_and_exit_2(anvil, tmp_path, capsys):
    from flwr.serverapp.strategy import FedAvg

    folder = tmp_path / "run"
    wrap, info = build_audit("anvil", anvil["url"], "", str(folder), RUN)
    _rounds(wrap(FedAvg()), rounds=1)
    capsys.readouterr()
    cases = {
        "unreachable": ["--rpc-url", f"http://127.0.0.1:{_free_port()}"],
        "unknown contract": ["--registry-address", "0x" + "12" * 20],
        "not an address": ["--registry-address", "0x1234"],
    }
    for name, extra in cases.items():
        assert cli(["audit", str(folder), *extra]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fedledger: error:"), (name, err)
    with pytest.raises(LedgerError, match="chain id mismatch"):
        Ledger.connect(anvil["url"], info()["registry-address"], chain_id=1)
    with pytest.raises(LedgerError, match="cannot reach"):
        build_audit("anvil", f"http://127.0.0.1:{_free_port()}", "", str(tmp_path / "r2"), RUN)
    # nothing was recorded twice or lost by the failed attempts
    assert audit_run(str(folder)).ok


@needs_anvil
def test_devnet_cli_start_status_stop(tmp_path, capsys):
    port, d = _free_port(), str(tmp_path / "dn")
    try:
        assert cli(["devnet", "start", "--port", str(port), "--dir", d]) == 0
        assert cli(["devnet", "status", "--dir", d]) == 0
        assert "running" in capsys.readouterr().out
        assert os.path.exists(os.path.join(d, "anvil.pid"))
    finally:
        assert cli(["devnet", "stop", "--dir", d]) == 0
    assert cli(["devnet", "status", "--dir", d]) == 3
    assert os.path.exists(os.path.join(d, "state.json"))


@needs_anvil
def test_ensure_running_starts_a_local_devnet_once(tmp_path):
    port, d = _free_port(), str(tmp_path / "dn")
    url = f"http://127.0.0.1:{port}"
    try:
        note = devnet.ensure_running(rpc_url=url, state_dir=d)
        assert note and "started a devnet" in note and devnet.is_up(url)
        assert devnet.ensure_running(rpc_url=url, state_dir=d) is None
    finally:
        devnet.stop(d)
    with pytest.raises(LedgerError, match="cannot reach"):
        devnet.ensure_running(rpc_url="http://10.255.255.1:8545", state_dir=d)
