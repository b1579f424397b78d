"""Progress of ``fedledger run``: the ServerApp marks every phase of every round; the live line
shows round i/N, phase, elapsed and ETA; markers are never echoed and nothing is printed twice."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest

from fedledger.progress import MARKER, LiveRound, RoundMarks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _first_phases(lines: list[str]) -> dict[int, list[str]]:
    phases: dict[int, list[str]] = {}
    for line in lines:
        m = re.fullmatch(r"progress round=(\d+)/(\d+) phase=(\w+)", line)
        if m and m.group(3) not in phases.setdefault(int(m.group(1)), []):
            phases[int(m.group(1))].append(m.group(3))
    return phases


def test_the_serverapp_marks_train_aggregate_ledger_evaluate_of_every_round(audited_attacked_run):
    _, lines = audited_attacked_run
    assert _first_phases(lines) == {0: ["evaluate"], 1: ["train", "aggregate", "ledger", "evaluate"],
                                    2: ["train", "aggregate", "ledger", "evaluate"]}
    assert all("/2 " in l for l in lines if l.startswith("progress")), lines


def test_without_the_variable_the_serverapp_marks_nothing(monkeypatch):
    from fedledger import progress

    monkeypatch.delenv("FEDLEDGER_PROGRESS", raising=False)
    assert not progress.enabled()


def test_marks_only_change_of_round_or_phase():
    out = []
    marks = RoundMarks(3, emit=out.append)
    marks.phase("evaluate", 0)
    marks.evaluated(0)
    marks.phase("train")
    marks.phase("train")
    marks.phase("aggregate")
    assert out == [MARKER.format(round=0, rounds=3, phase="evaluate"), MARKER.format(round=1, rounds=3, phase="train"),
                   MARKER.format(round=1, rounds=3, phase="aggregate")]
    with pytest.raises(ValueError, match="expected one of"):
        marks.phase("sleep")


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_the_live_line_shows_round_phase_elapsed_and_an_eta_from_finished_rounds():
    clock = Clock()
    live = LiveRound(enabled=False, clock=clock)
    assert live.feed("(ServerAppActor pid=1) fedledger: progress round=0/3 phase=evaluate\n") is True
    assert live.text() == "round 0/3  initial evaluation  elapsed 0:00  ETA -"
    clock.t += 5
    live.feed("fedledger: progress round=1/3 phase=train")
    clock.t += 20
    live.feed("fedledger: progress round=1/3 phase=evaluate")
    assert live.text() == "round 1/3  evaluate  elapsed 0:25  ETA -"  # no round finished yet
    clock.t += 10
    assert live.feed("fedledger: round 1/3  loss 2.3  clients 2 kept  30.0 s") is False  # echoed, not consumed
    live.feed("fedledger: progress round=2/3 phase=train")
    clock.t += 12
    # one round took 30 s; rounds 2 and 3 are left, 12 s of round 2 spent: 2 * 30 - 12
    assert live.text() == "round 2/3  train  elapsed 0:47  ETA 0:48"
    assert live.feed("INFO :      [ROUND 2/3]") is False


def test_the_live_line_is_drawn_on_a_terminal_and_leaves_nothing_behind():
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=100)
    with LiveRound(console=console) as live:
        live.feed("fedledger: progress round=1/2 phase=train")
        print("fedledger: round 1/2  loss 2.3")  # an echoed line goes above the live line
    out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())
    assert "round 1/2  train" in out and out.count("fedledger: round 1/2  loss 2.3") == 1


def test_no_live_line_when_the_output_is_not_a_terminal():
    from rich.console import Console

    buf = io.StringIO()
    with LiveRound(console=Console(file=buf, force_terminal=False)) as live:
        live.feed("fedledger: progress round=1/2 phase=train")
    assert buf.getvalue() == ""


@pytest.mark.slow
def test_fedledger_run_on_a_terminal_shows_the_live_line_and_prints_each_round_once(tmp_path):
    """A real ``flwr run`` (tiny model) under a pseudo-terminal; then the same with --quiet."""
    import pty

    def run(*extra):
        cmd = [sys.executable, "-m", "fedledger.cli", "run", "--app", ROOT, "--num-supernodes", "2",
               "--flwr-home", str(tmp_path / "flwr"), "--run-config",
               f"model='tiny' num-rounds=2 local-steps=1 eval-batches=2 run-dir='{tmp_path / 'runs'}'", *extra]
        env = {**os.environ, "PYTHONPATH": ROOT, "COLUMNS": "120"}
        master, slave = pty.openpty()
        proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=str(tmp_path))
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        proc.wait(timeout=600)
        return proc.returncode, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))

    code, out = run()
    assert code == 0, out[-3000:]
    assert re.search(r"round 1/2  (train|aggregate|evaluate)  elapsed \d+:\d\d  ETA", out), out[-3000:]
    assert "fedledger: progress" not in out
    for rnd in (1, 2):
        assert len(re.findall(rf"fedledger: round {rnd}/2  loss", out)) == 1, out[-3000:]
    assert "fedledger: report " in out
    code, quiet = run("--quiet")
    assert code == 0 and "ETA" not in quiet and "fedledger: round 1/2" not in quiet, quiet[-3000:]
