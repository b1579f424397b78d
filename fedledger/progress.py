"""One live line per round for ``fedledger run``: round i/N, phase, elapsed, ETA.

The run happens in Flower's processes; ``fedledger run`` only sees what ``flwr run --stream``
prints. So the two halves talk through log lines:

    ServerApp (when $FEDLEDGER_PROGRESS=1)   RoundMarks: "fedledger: progress round=2/3 phase=train"
        at each phase change: train (train messages sent), aggregate (replies back), ledger
        (recording / committing on chain), evaluate (central evaluation)
    fedledger run                           LiveRound.feed(line): a marker updates the live line and
        is never echoed; the ServerApp's own per-round line ("fedledger: round 2/3 loss ...") is
        echoed once, above the live line, and closes the round for the ETA

``fedledger run --quiet`` starts neither half (and the flwr processes log at WARNING). Where the
output is not a terminal the live line is not drawn: the per-round lines are all there is.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

ENV = "FEDLEDGER_PROGRESS"
PHASES = ("train", "aggregate", "ledger", "evaluate")
MARKER = "fedledger: progress round={round}/{rounds} phase={phase}"
_MARKER = re.compile(r"fedledger: progress round=(\d+)/(\d+) phase=(\w+)")
_ROUND_LINE = re.compile(r"fedledger: round (\d+)/(\d+)\b")
_ANSI_OR_RAY = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|^\(\w+(?: pid=\d+)?(?:, ip=[\d.]+)?\) ?")

log = logging.getLogger("fedledger")


def enabled() -> bool:
    return os.environ.get(ENV, "").strip() == "1"


# ---------------------------------------------------------------------------- ServerApp side
class RoundMarks:
    """Logs a marker line whenever the (round, phase) changes. The round in progress is the one
    after the last evaluated round (Flower evaluates round 0 before round 1 trains)."""

    def __init__(self, num_rounds: int, emit: Callable[[str], None] | None = None):
        self.num_rounds = num_rounds
        self.round = 0
        self._emit = emit or (lambda text: log.info("%s", text.removeprefix("fedledger: ")))
        self._last: tuple[int, str] | None = None

    def phase(self, phase: str, server_round: int | None = None) -> None:
        if phase not in PHASES:
            raise ValueError(f"progress phase {phase!r}: expected one of {PHASES}")
        mark = (self.round if server_round is None else server_round, phase)
        if mark != self._last:
            self._last = mark
            self._emit(MARKER.format(round=mark[0], rounds=self.num_rounds, phase=phase))

    def evaluated(self, server_round: int) -> None:
        self.round = server_round + 1

    # wrappers around the run's parts; each delegates every call explicitly
    def grid(self, grid: Grid) -> Grid:
        return ProgressGrid(grid, self)

    def trail(self, trail):
        return None if trail is None else ProgressTrail(trail, self)

    def evaluate_fn(self, evaluate_fn):
        def evaluate(server_round: int, arrays):
            self.phase("evaluate", server_round)
            result = evaluate_fn(server_round, arrays)
            self.evaluated(server_round)
            return result

        return evaluate


def _is_train(messages: list[Message]) -> bool:
    return any(m.metadata.message_type.startswith("train") for m in messages)


class ProgressGrid(Grid):
    """A Grid that marks "train" when train messages go out and "aggregate" when their replies are in."""

    def __init__(self, grid: Grid, marks: RoundMarks):
        self.inner, self.marks = grid, marks

    def set_run(self, run) -> None:
        self.inner.set_run(run)

    @property
    def run(self):
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        if _is_train(messages):
            self.marks.phase("train")
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        train = _is_train(messages)
        if train:
            self.marks.phase("train")
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        if train:
            self.marks.phase("aggregate")
        return replies


class ProgressTrail:
    """An audit trail that marks "ledger" while the round is recorded and committed."""

    def __init__(self, trail, marks: RoundMarks):
        self.inner, self.marks = trail, marks

    def begin(self, run: dict, global_arrays, grid) -> None:
        self.inner.begin(run, global_arrays, grid)

    def instruction(self, server_round: int, global_arrays, weight_key: str):
        return self.inner.instruction(server_round, global_arrays, weight_key)

    def verify(self, server_round: int, update):
        return self.inner.verify(server_round, update)

    def record(self, server_round: int, global_arrays, updates, rejected) -> None:
        self.marks.phase("ledger", server_round)
        self.inner.record(server_round, global_arrays, updates, rejected)
        self.marks.phase("aggregate", server_round)

    def commit(self, server_round: int, aggregate, report) -> None:
        self.marks.phase("ledger", server_round)
        self.inner.commit(server_round, aggregate, report)

    def artifact(self, server_round: int, name: str, arrays) -> str:
        """KD / split: one more tensor set of the round (the soft labels, the server part)."""
        return self.inner.artifact(server_round, name, arrays)

    # what a checkpoint and a resume need of the trail (core.checkpoint)
    def position(self) -> dict:
        return self.inner.position()

    def resume(self, position, last_round: int) -> None:
        self.inner.resume(position, last_round)

    def info(self) -> dict:
        return self.inner.info()


# ---------------------------------------------------------------------------- fedledger run side
def _text(line: str) -> str:
    return _ANSI_OR_RAY.sub("", line.rstrip("\r\n"))


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class LiveRound:
    """The live line of ``fedledger run``. ``feed(line)`` returns True for a marker (never echoed).

    ETA: the mean wall time of the finished training rounds times the rounds left, minus the
    time the current round has already taken; none before the first round finishes."""

    def __init__(self, enabled: bool = True, console=None, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.console = console
        self.enabled = enabled
        self.start = clock()
        self.round = self.rounds = 0
        self.phase = ""
        self.round_started: dict[int, float] = {}
        self.round_seconds: dict[int, float] = {}
        self._live = None

    def __enter__(self) -> LiveRound:
        if self.enabled:
            from rich.console import Console
            from rich.live import Live
            from rich.text import Text

            console = self.console or Console(stderr=True)
            if console.is_terminal:
                self._live = Live(console=console, get_renderable=lambda: Text(self.text()), transient=True,
                                  refresh_per_second=2, redirect_stdout=True, redirect_stderr=False)
                self._live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def feed(self, line: str) -> bool:
        text = _text(line)
        marker = _MARKER.search(text)
        if marker:
            self._update(int(marker.group(1)), int(marker.group(2)), marker.group(3))
            return True
        done = _ROUND_LINE.search(text)
        if done:
            self._finished(int(done.group(1)))
        return False

    def _update(self, server_round: int, rounds: int, phase: str) -> None:
        now = self.clock()
        self.round, self.rounds, self.phase = server_round, rounds, phase
        if server_round >= 1 and server_round not in self.round_started:
            self.round_started[server_round] = now
        self._refresh()

    def _finished(self, server_round: int) -> None:
        if server_round in self.round_started and server_round not in self.round_seconds:
            self.round_seconds[server_round] = self.clock() - self.round_started[server_round]
        self._refresh()

    def eta(self) -> float | None:
        if not self.round_seconds or not self.rounds:
            return None
        mean = sum(self.round_seconds.values()) / len(self.round_seconds)
        current = self.round if self.round not in self.round_seconds else self.round + 1
        left = max(0, self.rounds - current + 1)
        spent = self.clock() - self.round_started[current] if current in self.round_started else 0.0
        return max(0.0, mean * left - spent)

    def text(self) -> str:
        if not self.rounds:
            return f"starting the run  elapsed {_clock(self.clock() - self.start)}"
        what = "initial evaluation" if self.round == 0 else self.phase
        return (f"round {self.round}/{self.rounds}  {what}  elapsed {_clock(self.clock() - self.start)}"
                f"  ETA {_clock(self.eta())}")

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.refresh()
