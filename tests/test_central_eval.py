"""The server's central evaluation: one fixed sample per round plus the whole split at the end,
optionally overlapped with the next round's training; the numbers do not depend on the overlap."""

from __future__ import annotations

import json
import os

import pytest
from flwr.app import Context, RecordDict

from fedledger import server_app
from fedledger.client_app import app as client_app
from fedledger.config import ConfigError, Settings
from fedledger.inprocess import InProcessGrid

from .conftest import TINY


def _run(tmp_path, cfg, num_nodes=2):
    cfg = {**TINY, "run-dir": str(tmp_path / "runs"), **cfg}
    grid = InProcessGrid(client_app, num_nodes, cfg, run_id=5, seed=3)
    folder = server_app.run(grid, Context(run_id=5, node_id=0, node_config={}, state=RecordDict(), run_config=cfg),
                            settle=0.0)
    with open(os.path.join(folder, "metrics.json")) as fh:
        return json.load(fh)


def test_the_sample_is_fixed_seeded_and_in_split_order():
    items = list(range(100))
    a, b = server_app.fixed_sample(items, 10, seed=1), server_app.fixed_sample(items, 10, seed=1)
    assert a == b == sorted(a) and len(set(a)) == 10 and set(a) <= set(items)
    assert server_app.fixed_sample(items, 10, seed=2) != a
    assert server_app.fixed_sample(items, 0, seed=1) == items == server_app.fixed_sample(items, 500, seed=1)


def test_eval_settings_are_checked():
    with pytest.raises(ConfigError, match="eval-sample=-1 is not valid"):
        Settings.from_run_config({"eval-sample": -1})
    assert Settings.from_run_config({"eval-overlap": "true"}).eval.overlap is True


def test_each_round_evaluates_the_sample_and_the_last_the_whole_split_overlapped_or_not(tmp_path):
    serial = _run(tmp_path / "serial", {"eval-sample": 24, "eval-overlap": False})
    overlapped = _run(tmp_path / "overlap", {"eval-sample": 24, "eval-overlap": True})
    for m in (serial, overlapped):
        assert [m["rounds"][r]["central"]["num-examples"] for r in ("0", "1", "2")] == [24, 24, 24]
        full = m["rounds"]["2"]["central-full"]
        assert full["num-examples"] > 24 and "central-full" not in m["rounds"]["1"]
    # the overlap changes when the evaluation runs, not what it computes
    for r in ("0", "1", "2"):
        assert overlapped["rounds"][r]["central"]["eval-loss"] == serial["rounds"][r]["central"]["eval-loss"]
    assert overlapped["rounds"]["2"]["central-full"]["eval-loss"] == serial["rounds"]["2"]["central-full"]["eval-loss"]


def test_eval_sample_zero_evaluates_the_whole_split_every_round(tmp_path):
    m = _run(tmp_path, {"eval-sample": 0, "num-rounds": 1})
    n = {m["rounds"][r]["central"]["num-examples"] for r in ("0", "1")}
    assert len(n) == 1 and n.pop() > 64 and "central-full" not in m["rounds"]["1"]


def test_evaluate_with_no_answer_token_gives_nan_not_a_perplexity_of_one(tiny_task):
    import math

    from fedledger.clients import train as train_lib

    for examples in ([], [{"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}]):  # nothing / every answer cut off
        result = train_lib.evaluate(tiny_task.model, examples, tiny_task.pad_id)
        assert all(math.isnan(result[k]) for k in ("eval-loss", "perplexity", "accuracy")), result
        assert result["num-examples"] == len(examples)
    scored = train_lib.evaluate(tiny_task.model, tiny_task.examples("heldout")[:4], tiny_task.pad_id)
    assert scored["perplexity"] > 1.0 and 0.0 <= scored["accuracy"] <= 1.0


def test_a_run_with_no_heldout_examples_says_so_once_and_its_report_shows_no_heldout_data(tmp_path, monkeypatch):
    """No setting of the tiny model empties the held-out split while the clients still train (every
    prompt is 12 tokens or more in both), so the Task's held-out split is emptied here; the
    ServerApp, the clients and the report are the real ones."""
    import logging
    import math

    from fedledger.report import NO_HELDOUT, build_report
    from fedledger.task import Task

    real_examples = Task.examples
    monkeypatch.setattr(Task, "examples", lambda self, split, *args, **kwargs:
                        [] if split == "heldout" else real_examples(self, split, *args, **kwargs))
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("fedledger").addHandler(handler)
    try:
        m = _run(tmp_path, {"num-rounds": 1, "local-steps": 1, "task-eval-size": 0})
    finally:
        logging.getLogger("fedledger").removeHandler(handler)
    for rnd in ("0", "1"):
        central = m["rounds"][rnd]["central"]
        assert central["num-examples"] == 0 and math.isnan(central["perplexity"]) and math.isnan(central["accuracy"])
    assert len(warnings) == 1 and warnings[0].startswith("no held-out examples"), warnings
    report = build_report(_latest(tmp_path / "runs"))
    assert NO_HELDOUT in report.missing and "loss" not in report.figures
    with open(report.html) as fh:
        page = fh.read()
    assert "no held-out data" in page


def _latest(run_dir) -> str:
    with open(os.path.join(str(run_dir), "LATEST")) as fh:
        return fh.read().strip()
