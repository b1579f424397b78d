"""The client mod: ``audit_mod`` signs the train reply of any ClientApp, ``audited`` applies it to an
app that already exists, and every way a node can lack a key is one line and no training.

The apps here are plain Flower ClientApps (no fedledger code in their handlers), driven
in-process by ``InProcessGrid`` behind Flower's FedAvg in ``OnChainAudit`` on eth-tester."""

from __future__ import annotations

import inspect
import itertools
import json
import logging
import re
from dataclasses import replace

import numpy as np
import pytest
from eth_account import Account
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from fedledger.chain import ArtifactStore, OnChainAudit, audit_mod, audit_run, audited
from fedledger.chain import mods, signing
from fedledger.chain.hashing import update_hash
from fedledger.chain.ledger import Ledger
from fedledger.inprocess import InProcessGrid

from .replies import record

RUN = 4242              # the run id of messages built here
RUN_IDS = itertools.count(5000)   # one per audited run on the module's chain
#: one tensor of each kind an ArrayRecord carries, under names a LoRA adapter would never use
MIXED = {"w/1": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "half": np.ones(5, np.float16),
         "steps": np.array([3, 1], np.int64), "mask": np.array([True, False, True]), "scale": np.float64(2.5)}


@pytest.fixture()
def chain():
    """A fresh in-process chain per test (see tests/test_chain_audit.py)."""
    return Ledger.in_process()


def plain_app(arrays_key: str = "weights", calls: list | None = None) -> ClientApp:
    """A third-party ClientApp: adds its node's partition id to every tensor, under its own key."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if calls is not None:
            calls.append(context.node_id)
        (received,) = msg.content.array_records.values()
        pid = context.node_config["partition-id"]
        arrays = {k: (np.asarray(v.numpy()) + pid).astype(v.numpy().dtype) if v.numpy().dtype != bool else v.numpy()
                  for k, v in received.items()}
        return Message(RecordDict({arrays_key: record(arrays), "metrics": MetricRecord({"num-examples": 10 + pid})}),
                       reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"loss": 1.0, "num-examples": 5})}), reply_to=msg)

    return app


def run_audited(app, chain, tmp_path, rounds: int = 2, nodes: int = 2, run_config=None, node_config_extra=None,
                strategy=None, **kw) -> OnChainAudit:
    run_id = next(RUN_IDS)
    grid = InProcessGrid(app, nodes, run_config or {}, run_id=run_id, node_config_extra=node_config_extra)
    pipeline = OnChainAudit(strategy or FedAvg(fraction_evaluate=0.0), chain, ArtifactStore(str(tmp_path)), run_id,
                            **kw)
    pipeline.start(grid=grid, initial_arrays=record(MIXED), num_rounds=rounds)
    return pipeline


CHAIN_ID, REGISTRY = 31337, "0x" + "5f" * 20     # what an audited server's instruction names


def train_message(arrays=None, server_round: int | None = 3, group_id: str = "3", message_type: str = "train",
                  audited_server: bool = True):
    """A train instruction as OnChainAudit sends it: the global model, Flower's config and the
    server's ``audit`` record (chain id, registry, ledger kind, round, weight key)."""
    content = RecordDict({"arrays": record(arrays if arrays is not None else MIXED)})
    if server_round is not None:
        content["config"] = ConfigRecord({"server-round": server_round})
        if audited_server:
            content["audit"] = ConfigRecord({"chain-id": CHAIN_ID, "registry": REGISTRY, "ledger": "eth-tester",
                                             "server-round": server_round, "weight-key": "num-examples"})
    return Message(content, dst_node_id=7, message_type=message_type, group_id=group_id)


def signed_commitment(audit: dict, server_round: int = 3, arrays=None) -> signing.Commitment:
    """The commitment an ``audit`` reply record claims, for ``train_message``'s instruction."""
    return signing.Commitment(CHAIN_ID, REGISTRY, RUN, server_round, update_hash(arrays if arrays is not None else MIXED),
                              audit["update-hash"], audit["num-examples"])


def context(partition: int = 0, run_config=None, **node_config) -> Context:
    return Context(run_id=RUN, node_id=7, node_config={"partition-id": partition, "num-partitions": 2, **node_config},
                   state=RecordDict(), run_config=dict(run_config or {}))


# ---------------------------------------------------------------------------- what the mod signs
def test_the_mod_signs_any_arrayrecord_key_tensor_names_and_dtypes_and_the_audit_passes(chain, tmp_path):
    pipeline = run_audited(audited(plain_app("weights")), chain, tmp_path)
    assert pipeline.trail.info()["rejected-replies"] == {}
    report = audit_run(str(tmp_path), ledger=chain)
    assert report.ok, report.table()
    signers = {r.client.lower() for r in report.rows if r.kind == "update"}
    assert signers == {signing.simulation_account(p).address.lower() for p in (0, 1)}
    assert [r.detail for r in report.rows if r.kind == "aggregate"] == ["FedAvg recomputed bit-exactly"] * 2


def test_on_an_in_process_chain_a_node_trains_without_the_inclusion_check_and_says_so_once(chain, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="flwr"):
        run_audited(audited(plain_app()), chain, tmp_path, rounds=2)
    lines = [r.getMessage() for r in caplog.records if "without the inclusion check" in r.getMessage()]
    assert len(lines) == 2 and all("eth-tester chain inside the ServerApp's process" in line for line in lines)


def test_a_run_recorded_under_another_ledger_run_id_signs_that_id_and_the_audit_passes(chain, tmp_path):
    """A resumed run keeps its first run's id on the ledger while Flower gives it a new one: the
    instruction names the ledger's run id, and the mod signs that one."""
    run_id = next(RUN_IDS)
    grid = InProcessGrid(audited(plain_app("weights")), 2, {}, run_id=run_id)
    pipeline = OnChainAudit(FedAvg(fraction_evaluate=0.0), chain, ArtifactStore(str(tmp_path)), run_id + 500)
    pipeline.start(grid=grid, initial_arrays=record(MIXED), num_rounds=2)
    assert pipeline.trail.info()["rejected-replies"] == {}
    report = audit_run(str(tmp_path), ledger=chain)
    assert report.ok and report.run_id == run_id + 500, report.table()
    assert sum(r.status == "OK" and r.kind == "update" for r in report.rows) == 4


def test_the_signed_reply_is_the_handler_reply_plus_one_audit_record():
    app = plain_app("weights")
    bare = app(train_message(), context(1))
    signed = audited(app)(train_message(), context(1))
    assert set(signed.content) == set(bare.content) | {"audit"}
    for name, arr in bare.content["weights"].items():
        assert signed.content["weights"][name].data == arr.data and signed.content["weights"][name].dtype == arr.dtype
    assert dict(signed.content["metrics"]) == dict(bare.content["metrics"])
    audit = dict(signed.content["audit"])
    assert audit["signer"] == signing.simulation_account(1).address
    assert audit["update-hash"] == signing.update_hash(signed.content["weights"]) and audit["num-examples"] == 11
    assert audit["global-hash"] == update_hash(MIXED)    # the client hashed the global it received itself
    assert signing.recover(signed_commitment(audit), audit["signature"]) == audit["signer"]


def test_the_commitment_names_the_instructions_chain_registry_round_global_and_count():
    app = audited(plain_app())
    audit = dict(app(train_message(server_round=5, group_id="9"), context()).content["audit"])
    commitment = signed_commitment(audit, server_round=5)
    assert signing.verify(commitment, audit["signature"], audit["signer"])
    for other in (replace(commitment, chain_id=1), replace(commitment, registry="0x" + "12" * 20),
                  replace(commitment, round=9), replace(commitment, run_id=RUN + 1),
                  replace(commitment, global_hash="0x" + "00" * 32), replace(commitment, num_examples=10**9)):
        assert not signing.verify(other, audit["signature"], audit["signer"]), other


def test_without_the_servers_audit_record_the_replies_go_unsigned_with_one_line_per_node_and_run(caplog):
    app = audited(plain_app())
    ctx = context()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        replies = [app(train_message(server_round=r, audited_server=False), ctx) for r in (1, 2, 3)]
    assert all("audit" not in reply.content and not reply.has_error() for reply in replies)
    (line,) = [r.getMessage() for r in caplog.records if "goes out unsigned" in r.getMessage()]
    assert "the instruction carries no 'audit' record" in line and "refuses" not in line


def test_evaluate_and_query_replies_and_unaudited_runs_are_left_alone():
    app = plain_app()

    @app.query("status")
    def status(msg, ctx):
        return Message(RecordDict({"status": ConfigRecord({"ok": True})}), reply_to=msg)

    wrapped = audited(app)
    ev = wrapped(train_message(message_type="evaluate"), context())
    assert set(ev.content) == {"metrics"}
    assert set(wrapped(train_message(message_type="query.status"), context()).content) == {"status"}
    off = wrapped(train_message(), context(run_config={"audit": "none"}))
    assert "audit" not in off.content


def test_a_train_reply_without_one_arrayrecord_goes_unsigned_in_one_line_and_the_server_refuses_it(chain, tmp_path,
                                                                                                   caplog):
    app = ClientApp()

    @app.train()
    def train(msg, ctx):  # a reply with two ArrayRecords
        (rec,) = msg.content.array_records.values()
        return Message(RecordDict({"a": rec, "b": rec, "metrics": MetricRecord({"num-examples": 3})}), reply_to=msg)

    with caplog.at_level(logging.WARNING, logger="flwr"):
        pipeline = run_audited(audited(app), chain, tmp_path, rounds=1)
    lines = [r.getMessage() for r in caplog.records if "goes out unsigned" in r.getMessage()]
    assert len(lines) == 2 and all("\n" not in line and "2 ArrayRecords, not one" in line for line in lines)
    refused = pipeline.trail.info()["rejected-replies"]["1"]
    assert len(refused) == 2 and all("2 ArrayRecords (expected exactly 1)" in r["reason"] for r in refused), refused
    with open(ArtifactStore(str(tmp_path)).round_path(1)) as fh:
        assert len(json.load(fh)["rejected"]) == 2   # recorded once each


def test_the_mod_runs_outside_the_apps_own_mods_and_signs_what_leaves_the_node():
    def halve(msg, ctx, call_next):  # a user's mod that changes the reply (as Flower's LocalDpMod does)
        reply = call_next(msg, ctx)
        (key,) = reply.content.array_records.keys()
        arrays = {k: v.numpy() * 2 if v.numpy().dtype.kind == "f" else v.numpy() for k, v in reply.content[key].items()}
        reply.content[key] = record(arrays)
        return reply

    app = ClientApp(mods=[halve])
    app.train()(plain_app()._registered_funcs["train.default"])
    reply = audited(app)(train_message(), context())
    sent = reply.content["weights"]
    assert dict(reply.content["audit"])["update-hash"] == signing.update_hash(sent)


def test_audited_forwards_every_handler_custom_actions_and_the_lifespan():
    seen = []
    app = ClientApp()

    @app.lifespan()
    def lifespan(ctx):
        seen.append("enter")
        yield
        seen.append("exit")

    for category in ("train", "evaluate", "query"):
        for action in ("default", "custom"):
            def handler(msg, ctx, name=f"{category}.{action}"):
                seen.append(name)
                return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)
            getattr(app, category)(action)(handler)
    wrapped = audited(app)
    assert sorted(wrapped._registered_funcs) == sorted(app._registered_funcs)
    for name in sorted(app._registered_funcs):
        category, action = name.split(".")
        seen.clear()
        wrapped(train_message(message_type=category if action == "default" else name), context())
        assert seen == ["enter", name, "exit"], seen


def test_audited_refuses_what_it_cannot_forward_in_one_line():
    with pytest.raises(TypeError, match="takes a flwr ClientApp"):
        audited(object())
    with pytest.raises(ValueError, match="no handler yet; call it after"):
        audited(ClientApp())
    with pytest.raises(ValueError, match=r"ClientApp\(client_fn=..., mods=\[audit_mod\]\)"):
        audited(ClientApp(client_fn=lambda context: None))


def test_a_new_app_takes_the_mod_as_flower_mods_are_taken(chain, tmp_path):
    app = ClientApp(mods=[audit_mod])
    app.train()(plain_app()._registered_funcs["train.default"])
    run_audited(app, chain, tmp_path, rounds=1)
    assert audit_run(str(tmp_path), ledger=chain).ok


# ---------------------------------------------------------------------------- keys
def test_key_files_hex_and_keystore_sign_for_their_node(tmp_path, monkeypatch):
    hex_acct, store_acct = Account.create(), Account.create()
    (tmp_path / "hex.key").write_text(hex_acct.key.to_0x_hex())
    (tmp_path / "store.json").write_text(json.dumps(Account.encrypt(store_acct.key, "s3cret", iterations=2)))
    monkeypatch.setenv(signing.PASSWORD_ENV, "s3cret")
    app = audited(plain_app())
    for path, acct in ((tmp_path / "hex.key", hex_acct), (tmp_path / "store.json", store_acct)):
        audit = dict(app(train_message(), context(**{"key-file": str(path)})).content["audit"])
        assert audit["signer"] == acct.address
        assert signing.verify(signed_commitment(audit), audit["signature"], acct.address)


@pytest.mark.parametrize("case, expected", [
    ("missing", "node key file .* not found; check key-file in the node-config"),
    ("folder", "cannot read node key file"),
    ("garbage", "is not a 0x-hex private key"),
    ("no-password", r"is an encrypted keystore; put its password in \$FEDLEDGER_KEY_PASSWORD"),
    ("wrong-password", r"wrong password for the node keystore .*; check \$FEDLEDGER_KEY_PASSWORD"),
])
def test_a_node_without_a_usable_key_does_not_train_and_says_why_in_one_line(case, expected, tmp_path, monkeypatch,
                                                                            caplog):
    monkeypatch.delenv(signing.PASSWORD_ENV, raising=False)
    path = {"missing": tmp_path / "nope.key", "folder": tmp_path}.get(case, tmp_path / "key")
    if case == "garbage":
        path.write_text("not a key")
    elif case in ("no-password", "wrong-password"):
        path.write_text(json.dumps(Account.encrypt(Account.create().key, "right", iterations=2)))
        if case == "wrong-password":
            monkeypatch.setenv(signing.PASSWORD_ENV, "wrong")
    calls: list = []
    with caplog.at_level(logging.ERROR, logger="flwr"):
        reply = audited(plain_app(calls=calls))(train_message(), context(**{"key-file": str(path)}))
    assert reply.has_error() and calls == []            # refused before training
    assert "\n" not in reply.error.reason
    assert re.search(expected, reply.error.reason), reply.error.reason
    assert [r.getMessage() for r in caplog.records if "does not train" in r.getMessage()] == \
        [f"fedledger: node 7 does not train: {reply.error.reason.removeprefix('fedledger: ')}"]


def test_the_server_records_a_keyless_nodes_refusal_once(chain, tmp_path):
    extra = {"key-file": str(tmp_path / "missing.key")}
    pipeline = run_audited(audited(plain_app()), chain, tmp_path / "run", rounds=1, node_config_extra=extra)
    refused = pipeline.trail.info()["rejected-replies"]["1"]
    assert len(refused) == 2 and all("not found; check key-file" in r["reason"] for r in refused)
    report = audit_run(str(tmp_path / "run"), ledger=chain)
    assert [r.status for r in report.rows] == ["REJECTED", "REJECTED", "NO-AGGREGATE"]


def _call_as(module: str, app, msg, ctx):
    """Call ``app`` from a frame whose module is ``module`` (where Flower's runtime calls ClientApps)."""
    namespace = {"__name__": module, "app": app, "msg": msg, "ctx": ctx}
    exec("def call():\n    return app(msg, ctx)\n", namespace)  # noqa: S102
    return namespace["call"]()


def test_a_deployed_node_refuses_simulation_keys_unless_its_node_config_allows_them(caplog):
    app = audited(plain_app())
    deployed = _call_as("flwr.supernode.runtime.run_clientapp", app, train_message(), context(1))
    assert deployed.has_error() and "a deployment does not sign with a simulation key" in deployed.error.reason
    assert "--node-config \"key-file='/path/key.json'\"" in deployed.error.reason
    with caplog.at_level(logging.WARNING, logger="flwr"):
        allowed = _call_as("flwr.supernode.runtime.run_clientapp", app, train_message(),
                           context(1, **{"allow-simulation-keys": True}))
    assert dict(allowed.content["audit"])["signer"] == signing.simulation_account(1).address
    assert any("test benches only" in r.getMessage() for r in caplog.records)
    simulated = _call_as("flwr.simulation.ray_transport.ray_actor", app, train_message(), context(1))
    assert dict(simulated.content["audit"])["signer"] == signing.simulation_account(1).address


def test_the_runtime_is_told_by_the_flower_modules_that_call_client_apps():
    """If Flower moves the code that calls a ClientApp, the deployment check must fail here, not go quiet."""
    from flwr.simulation.ray_transport import ray_actor
    from flwr.supernode.runtime import run_clientapp

    assert "client_app(message=message, context=context)" in inspect.getsource(run_clientapp.run_clientapp)
    assert "app(message=message, context=context)" in inspect.getsource(ray_actor.VirtualClientEngineActor.run)
    assert mods.flower_runtime() == mods.LOCAL
    for module, runtime in (("flwr.supernode.runtime.run_clientapp", mods.DEPLOYMENT),
                            ("flwr.simulation.ray_transport.ray_actor", mods.SIMULATION)):
        namespace = {"__name__": module, "runtime": mods.flower_runtime}
        exec("def call():\n    return runtime()\n", namespace)  # noqa: S102
        assert namespace["call"]() == runtime


# ---------------------------------------------------------------------------- the fedledger ClientApp
def test_the_fedledger_clientapp_answers_its_identity_with_the_mods_key_or_the_reason_it_has_none(tmp_path):
    from fedledger.client_app import app as fedledger_app
    from fedledger.identity import MESSAGE_TYPE, Roster

    query = Message(RecordDict({"config": ConfigRecord({"run-id": RUN})}), dst_node_id=7, message_type=MESSAGE_TYPE)
    roster = Roster(RUN, 2, signing=True, expected_signers={1: signing.simulation_account(1).address})
    good = fedledger_app(query, context(1, run_config={"audit": "eth-tester"}))
    assert roster._check(7, good)[0].signer == signing.simulation_account(1).address
    keyless = fedledger_app(query, context(1, run_config={"audit": "eth-tester"}, **{"key-file": str(tmp_path / "k")}))
    ident, reason = roster._check(7, keyless)
    assert ident is None and reason.startswith("the node says: node key file") and "check key-file" in reason
