"""Resume (``-m faults``): the real ServerApp and ClientApp in-process; the ServerApp dies in
round 3 (its grid raises), a new run with ``resume=<run folder>`` (new Flower run id, new node
ids) continues after round 2 and ends bit-exactly where an uninterrupted run ends (two nodes: with
three or more, Flower samples the replies in a random order and FedAdam amplifies the float
rounding of a sum in another order, ~1e-5 here). FedAdam's moments from the checkpoint
are checked bit-exactly by the audit of an audited resumed run on anvil (tests/test_faults.py)."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from fedledger import server_app
from fedledger.client_app import app as client_app
from fedledger.config import ConfigError
from fedledger.core.checkpoint import CHECKPOINT_FILE
from fedledger.inprocess import InProcessGrid

from .conftest import TINY

pytestmark = pytest.mark.faults


class Crash(RuntimeError):
    """The ServerApp process dies (in-process: the grid raises in the middle of a round)."""


class DyingGrid(InProcessGrid):
    def __init__(self, *args, die_in_round: int | None = None, **kw):
        super().__init__(*args, **kw)
        self.die_in_round, self.train_sends = die_in_round, 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type.startswith("train"):
            self.train_sends += 1
            if self.train_sends == self.die_in_round:
                raise Crash(f"killed in round {self.die_in_round}")
        return super().send_and_receive(messages, timeout=timeout)


def _run(cfg: dict, run_id: int, seed: int, die_in_round: int | None = None) -> str:
    grid = DyingGrid(client_app, 2, cfg, run_id=run_id, seed=seed, die_in_round=die_in_round)
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=cfg)
    return server_app.run(grid, context, settle=0.0)


def _adapter(folder: str) -> dict:
    from safetensors.numpy import load_file

    return load_file(os.path.join(folder, "adapter", "adapter_model.safetensors"))


def _only_folder(run_dir) -> str:
    (name,) = [n for n in os.listdir(run_dir) if n != "LATEST"]
    return os.path.join(run_dir, name)


@pytest.fixture(scope="module")
def fedadam(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    cfg = {**TINY, "strategy": "fedadam", "num-rounds": 3, "server-lr": 0.05, "local-steps": 2}
    whole = _run({**cfg, "run-dir": str(base / "whole")}, run_id=7, seed=11)
    crashed_dir = base / "crashed"
    with pytest.raises(Crash):
        _run({**cfg, "run-dir": str(crashed_dir)}, run_id=8, seed=11, die_in_round=3)
    crashed = _only_folder(crashed_dir)
    return cfg, whole, crashed


def _checkpoint(folder: str) -> dict:
    with open(os.path.join(folder, CHECKPOINT_FILE), "rb") as fh:
        return pickle.load(fh)


def test_a_crash_mid_round_leaves_the_checkpoint_of_the_last_completed_round(fedadam):
    _, _, crashed = fedadam
    state = _checkpoint(crashed)
    assert state["round"] == 2 and sorted(state["reports"]) == [1, 2]
    assert set(state["strategy"]) == {"current_arrays", "m_t", "v_t"} and state["strategy"]["m_t"]
    assert not os.path.exists(os.path.join(crashed, CHECKPOINT_FILE + ".tmp"))
    assert not os.path.exists(os.path.join(crashed, "metrics.json"))   # the run never finished


def test_a_resumed_fedadam_run_ends_on_the_adapter_of_an_uninterrupted_run(fedadam):
    cfg, whole, crashed = fedadam
    start = _checkpoint(crashed)["global"]
    resumed = _run({**cfg, "run-dir": os.path.dirname(crashed), "resume": crashed}, run_id=99, seed=5)
    assert resumed == crashed
    a, b = _adapter(whole), _adapter(resumed)
    assert a.keys() == b.keys() and max(float(np.abs(a[k] - start[k]).max()) for k in a) > 0   # round 3 trained
    # bit-exact: with two replies the weighted sum does not depend on the order Flower samples them in
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert _checkpoint(crashed)["round"] == 3
    with open(os.path.join(resumed, "metrics.json")) as fh:
        m = json.load(fh)
    assert m["run-id"] == 8                                   # the first run's id, not the resuming run's 99
    assert sorted(m["rounds"], key=int) == ["0", "1", "2", "3"]
    assert all("report" in m["rounds"][r] for r in ("1", "2", "3"))


def test_a_resume_with_other_settings_or_nothing_left_is_refused_in_one_line(fedadam, tmp_path):
    cfg, whole, crashed = fedadam
    with pytest.raises(ConfigError, match=r"strategy='fedavg' \(the run had 'fedadam'\)") as err:
        _run({**cfg, "strategy": "fedavg", "resume": crashed}, run_id=100, seed=5)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="already completed 3 of num-rounds=3"):
        _run({**cfg, "resume": whole}, run_id=101, seed=5)
    with pytest.raises(ConfigError, match="no checkpoint at"):
        _run({**cfg, "resume": str(tmp_path)}, run_id=102, seed=5)
