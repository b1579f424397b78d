"""The real ClientApp + strategy stack, driven in-process (no Ray): fast behaviour checks."""

import numpy as np
import pytest

from fedledger.client_app import app as client_app
from fedledger.config import Settings
from fedledger.inprocess import InProcessGrid
from fedledger.server_app import make_evaluate_fn
from fedledger.strategies.kernels import to_arrayrecord
from fedledger.strategy_factory import build_strategy
from fedledger.task import get_task

from .conftest import TINY


def _run(cfg, num_nodes=3, drop=()):
    settings = Settings.from_run_config(cfg)
    grid = InProcessGrid(client_app, num_nodes, cfg)
    grid.drop = set(drop)
    task = get_task(settings, 1)
    history = {}
    strategy = build_strategy(settings, num_nodes)
    result = strategy.start(grid=grid, initial_arrays=to_arrayrecord(task.initial_adapter),
                            num_rounds=settings.num_rounds, evaluate_fn=make_evaluate_fn(task, settings, history))
    return strategy, result, history


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedmedian"])
def test_rounds_lower_heldout_loss(name):
    strategy, result, history = _run({**TINY, "strategy": name})
    losses = [history[r]["central"]["eval-loss"] for r in sorted(history)]
    assert losses[-1] < losses[0], losses
    assert strategy.traffic[1]["messages-sent"] == 3


def test_a_node_that_does_not_reply_does_not_stop_the_round():
    strategy, result, history = _run({**TINY, "num-rounds": 1}, num_nodes=3, drop=[2])
    assert result.arrays is not None
    assert history[1]["central"]["eval-loss"] < history[0]["central"]["eval-loss"]
