"""Integration on a real anvil (started here on a free 127.0.0.1 port, stopped by its PID)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest
from eth_account import Account

from fedledger.chain import devnet
from fedledger.chain.audit import audit_run
from fedledger.chain.audit_strategy import OnChainAudit, build_ledger, build_trail
from fedledger.chain.ledger import KEY_ENV, KEY_PASSWORD_ENV, Ledger, LedgerError
from fedledger.chain.store import ArtifactStore
from fedledger.cli_chain import main as cli

from .test_chain_audit import Federation

RUN = 5
ANVIL_DEV_KEY_0 = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"  # anvil's default, public
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
def anvil(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)  # the dev accounts write unless a test gives a key
    port = _free_port()
    state_dir = str(tmp_path / "devnet")
    info = devnet.start(port=port, state_dir=state_dir)
    yield {"url": f"http://127.0.0.1:{port}", "port": port, "dir": state_dir, "pid": info["pid"]}
    devnet.stop(state_dir)


def _run(url: str, folder, fed: Federation, rounds: int = 2, **connect) -> OnChainAudit:
    from flwr.serverapp.strategy import FedAvg

    ledger = build_ledger("anvil", url, **connect)
    pipeline = OnChainAudit(FedAvg(), ledger, ArtifactStore(str(folder)), fed.run_id)
    fed.drive(pipeline, rounds=rounds)
    return pipeline


@needs_anvil
def test_audited_run_survives_anvil_restart(anvil, tmp_path, capsys):
    folder = tmp_path / "run"
    pipeline = _run(anvil["url"], folder, Federation(run_id=RUN))
    info = pipeline.trail.info()
    assert info["chain-id"] == 31337 and info["transactions"] == 9   # deploy, enrol, openRun, 3 per round
    assert cli(["audit", str(folder)]) == 0
    assert "audit: OK" in capsys.readouterr().out

    # restart anvil from its state file: the history and the audit survive
    assert devnet.stop(anvil["dir"])["running"] is False
    assert not devnet.is_up(anvil["url"])
    restarted = devnet.start(port=anvil["port"], state_dir=anvil["dir"])
    assert restarted["pid"] != anvil["pid"] and restarted["block"] >= 7
    report = audit_run(str(folder))
    assert report.ok and sum(r.kind == "update" for r in report.rows) == 6, report.table()

    # no other account can write, the admin (anvil's dev account #1 here) included
    ledger = Ledger.connect(anvil["url"], info["registry-address"])
    other = ledger.w3.eth.accounts[1]
    assert ledger.admin_address() == other
    from web3.exceptions import ContractCustomError, ContractLogicError

    with pytest.raises((ContractCustomError, ContractLogicError)):
        ledger.contract.functions.openRound(RUN, 3).transact({"from": other})
    with pytest.raises((ContractCustomError, ContractLogicError)):
        ledger.contract.functions.commitAggregate(RUN, 2, b"\1" * 32, b"\2" * 32).transact({"from": other})
    assert ledger.get_round(RUN, 2)["committed"] and ledger.get_run(RUN)["current-round"] == 2


@needs_anvil
def test_bad_input_gives_one_line_and_exit_2(anvil, tmp_path, capsys):
    folder = tmp_path / "run"
    pipeline = _run(anvil["url"], folder, Federation(run_id=RUN), rounds=1)
    registry = pipeline.trail.ledger.address
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
        Ledger.connect(anvil["url"], registry, chain_id=1)
    with pytest.raises(LedgerError, match="cannot reach"):
        build_trail("anvil", str(tmp_path / "r2"), RUN, rpc_url=f"http://127.0.0.1:{_free_port()}")
    # nothing was recorded twice or lost by the failed attempts
    assert audit_run(str(folder)).ok


def _fund(w3, address: str, ether: int = 10) -> None:
    """A plain transfer from anvil's dev account 0, signed here (its key is anvil's public default)."""
    dev = Account.from_key(ANVIL_DEV_KEY_0)
    tx = {"to": address, "value": w3.to_wei(ether, "ether"), "gas": 21000, "nonce": w3.eth.get_transaction_count(dev.address),
          "chainId": w3.eth.chain_id, "maxFeePerGas": w3.to_wei(10, "gwei"), "maxPriorityFeePerGas": 0}
    h = w3.eth.send_raw_transaction(dev.sign_transaction(tx).raw_transaction)
    assert w3.eth.wait_for_transaction_receipt(h, timeout=10, poll_latency=0.01)["status"] == 1


@needs_anvil
def test_fresh_aggregator_key_writes_a_whole_audited_run(anvil, tmp_path, monkeypatch):
    from web3 import HTTPProvider, Web3

    w3 = Web3(HTTPProvider(anvil["url"]))
    key = Account.create()
    _fund(w3, key.address)
    monkeypatch.setenv(KEY_ENV, key.key.to_0x_hex())
    pipeline = _run(anvil["url"], tmp_path / "run", Federation(run_id=RUN))
    ledger = pipeline.trail.ledger
    assert ledger.signs_locally and ledger.aggregator_address() == key.address
    assert ledger.admin_address() == w3.eth.accounts[1]                # the devnet admin deployed it
    report = audit_run(str(tmp_path / "run"))
    assert report.ok, report.table()

    # the same key from an encrypted keystore attaches to that registry for the next run
    monkeypatch.delenv(KEY_ENV)
    keystore = tmp_path / "aggregator.json"
    keystore.write_text(json.dumps(Account.encrypt(key.key, "pw", iterations=2)))
    monkeypatch.setenv(KEY_PASSWORD_ENV, "pw")
    second = _run(anvil["url"], tmp_path / "run2", Federation(run_id=RUN + 1), registry_address=ledger.address,
                  private_key_file=str(keystore))
    assert audit_run(str(tmp_path / "run2")).ok
    sent = [t for t in ledger.tx_log + second.trail.ledger.tx_log if t["label"] != "deploy"]
    assert len(sent) == (1 + 3 * 2) * 2                                  # openRun + 3 per round, two runs
    assert {w3.eth.get_transaction(t["tx"])["from"] for t in sent} == {key.address}
    assert w3.eth.get_transaction_count(w3.eth.accounts[0]) == 1       # dev account 0: the funding transfer only

    # another key cannot take over that registry
    monkeypatch.setenv(KEY_ENV, Account.create().key.to_0x_hex())
    with pytest.raises(LedgerError, match=f"names {key.address} as its aggregator"):
        Ledger.connect(anvil["url"], ledger.address)


@needs_anvil
def test_node_without_unlocked_accounts_needs_an_aggregator_key(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([ANVIL, "--silent", "--prune-history", "--accounts", "0", "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 10
        while not devnet.is_up(url) and time.time() < deadline:
            time.sleep(0.05)
        with pytest.raises(LedgerError) as info:
            Ledger.connect(url)
        message = str(info.value)
        assert "\n" not in message and KEY_ENV in message and "aggregator-key-file" in message
        key, admin = Account.create(), Account.create()
        for account in (key, admin):
            devnet.rpc_call(url, "anvil_setBalance", [account.address, hex(10**19)])
        with pytest.raises(LedgerError, match=r"no admin key .* \$FEDLEDGER_ADMIN_KEY .* admin-key-file"):
            Ledger.connect(url, private_key=key.key.to_0x_hex())      # a new registry is deployed by its admin
        with pytest.raises(LedgerError, match="the admin and the aggregator are the same account"):
            Ledger.connect(url, private_key=key.key.to_0x_hex(), admin_key=key.key.to_0x_hex())
        ledger = Ledger.connect(url, private_key=key.key.to_0x_hex(), admin_key=admin.key.to_0x_hex())
        assert ledger.aggregator_address() == key.address and ledger.admin_address() == admin.address
    finally:
        proc.terminate()
        proc.wait(timeout=10)


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


@needs_anvil
def test_the_admin_deploys_and_enrols_with_the_cli_and_the_aggregator_runs_on_that_registry(anvil, tmp_path, capsys,
                                                                                          monkeypatch):
    """A deployment's division of labour: the admin (its own key) deploys the registry naming the
    aggregator and enrols the clients; the aggregator (another key) attaches with enrol="none"."""
    from fedledger.chain import signing

    admin, aggregator = Account.create(), Account.create()
    for account in (admin, aggregator):
        devnet.rpc_call(anvil["url"], "anvil_setBalance", [account.address, hex(10**19)])
    (tmp_path / "admin.key").write_text(admin.key.to_0x_hex())
    base = ["--rpc-url", anvil["url"], "--admin-key-file", str(tmp_path / "admin.key")]
    assert cli(["registry", "deploy", "--aggregator", aggregator.address, *base]) == 0
    registry = capsys.readouterr().out.split()[1]
    fed = Federation(run_id=RUN)
    clients = [fed.address(i) for i in range(3)]
    assert cli(["registry", "enrol", *clients, "--registry-address", registry, "--fund-devnet", *base]) == 0
    assert "enrolled 3 of 3 signer(s), funded 3 (devnet)" in capsys.readouterr().out
    assert cli(["registry", "show", "--registry-address", registry, "--rpc-url", anvil["url"], "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["admin"] == admin.address and shown["aggregator"] == aggregator.address
    assert shown["enrolled"] == sorted(c.lower() for c in clients)
    assert cli(["registry", "enrol", signing.simulation_account(9).address, "--registry-address", registry,
                "--rpc-url", anvil["url"]]) == 2      # the devnet's own admin account is not this registry's admin
    assert "is administered by" in capsys.readouterr().err

    from flwr.serverapp.strategy import FedAvg

    monkeypatch.setenv(KEY_ENV, aggregator.key.to_0x_hex())
    ledger = build_ledger("anvil", anvil["url"], registry)
    pipeline = OnChainAudit(FedAvg(), ledger, ArtifactStore(str(tmp_path / "run")), fed.run_id, enrol="none")
    fed.drive(pipeline)
    assert audit_run(str(tmp_path / "run"), admin=admin.address).ok
    assert cli(["audit", str(tmp_path / "run"), "--admin", aggregator.address]) == 1   # not the admin you trust
    assert "not the admin you trust" in capsys.readouterr().out
    assert cli(["registry", "revoke", clients[0], "--registry-address", registry, *base]) == 0
    assert not ledger.is_enrolled(clients[0])


@needs_anvil
def test_a_deployed_registry_keeps_its_admin_and_each_devnet_account_is_announced_once(anvil, caplog, monkeypatch):
    """``connect`` deploys with the devnet's admin account; asking for the admin again (the audit
    enrols with it) gets that same writer, and no second notice."""
    import logging

    from fedledger.chain.ledger import Ledger

    monkeypatch.delenv("FEDLEDGER_ADMIN_KEY", raising=False)
    with caplog.at_level(logging.INFO, logger="fedledger"):
        ledger = Ledger.connect(anvil["url"])
        admin = ledger.admin()
        assert ledger.admin() is admin and admin.sender.lower() == admin.admin_address().lower()
    notices = [r.getMessage() for r in caplog.records if "acts as" in r.getMessage()]
    assert sorted(n.split(" acts as ")[1].split()[0] for n in notices) == ["admin", "aggregator"]
