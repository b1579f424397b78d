"""Readable console output: fedledger's own log lines, quieter libraries, one line per round.

    configure()        one ``fedledger: ...`` handler on stderr (level from $FEDLEDGER_LOG_LEVEL, default INFO)
    quiet_libraries()  drop library deprecation noise and known-harmless advisories in this process
    round_line(...)    ``round 2/3  loss 2.3022  ppl 10.00  clients 4 kept, 1 rejected, 0 distrusted  MB ...  61.2 s``

The ServerApp calls ``configure()`` and ``quiet_libraries()`` at start and logs ``round_line``
after each round's central evaluation; ``fedledger run`` sets ``FEDLEDGER_LOG_LEVEL`` for the
flwr processes (WARNING for ``--quiet``, DEBUG for ``--verbose``).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

LOGGER_NAME = "fedledger"
LEVEL_ENV = "FEDLEDGER_LOG_LEVEL"
FORMAT = "fedledger: %(message)s"
HANDLER_NAME = "fedledger-console"

#: Messages that libraries log on every run and that say nothing about this run.
HARMLESS_LIBRARY_LOGS = {
    # importing peft imports bitsandbytes, which looks for an optional hub kernel (never install it: it fetches)
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    # logged on every 8-bit matmul when the input is not fp16
    "bitsandbytes.autograd._functions": ("MatMul8bitLt: inputs will be cast from",),
}

#: Library modules whose UserWarnings are advice about the API, not about this run.
ADVISORY_WARNING_MODULES = r"(peft|transformers)(\.|$)"


class _ConsoleHandler(logging.StreamHandler):
    """The one handler :func:`configure` installs (found again by name, so a second call adds none,
    even from a second copy of this module, e.g. the FAB's). It writes to whatever ``sys.stderr`` is at the time (as :data:`logging.lastResort` does), so
    output captured or redirected after ``configure()`` still gets the lines."""

    def __init__(self):
        logging.Handler.__init__(self)
        self.name = HANDLER_NAME

    @property
    def stream(self):
        return sys.stderr


def log_level(level: str | None = None) -> int:
    """``level`` or ``$FEDLEDGER_LOG_LEVEL`` (default INFO) as a logging level number."""
    name = (level or os.environ.get(LEVEL_ENV) or "INFO").strip().upper()
    number = logging.getLevelName(name)
    if not isinstance(number, int):
        raise ValueError(f"log level {name!r} is not valid; use one of DEBUG, INFO, WARNING, ERROR "
                         f"(argument or ${LEVEL_ENV})")
    return number


def configure(level: str | None = None) -> None:
    """One stderr handler on the ``fedledger`` logger; calling it again only updates the level."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(log_level(level))
    logger.propagate = False  # Flower configures its own handlers: never print a line twice
    if not any(h.name == HANDLER_NAME for h in logger.handlers):
        handler = _ConsoleHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        logger.addHandler(handler)


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_libraries() -> None:
    """Hide library deprecation noise and known-harmless advisories in this process.

    DeprecationWarning / FutureWarning are ignored unless a fedledger module raised them;
    transformers' advisory log lines and peft's/transformers' UserWarnings are ignored; the
    bitsandbytes lines in :data:`HARMLESS_LIBRARY_LOGS` are filtered. Library errors, other
    library log records and every fedledger warning still show. With ``$FEDLEDGER_LOG_LEVEL``
    at DEBUG (``fedledger run --verbose``) nothing is hidden.
    """
    if os.environ.get(LEVEL_ENV, "").strip().upper() == "DEBUG":
        return
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
        warnings.filterwarnings("default", category=category, module=rf"{LOGGER_NAME}(\.|$)")  # ours stay on top
    warnings.filterwarnings("ignore", category=UserWarning, module=ADVISORY_WARNING_MODULES)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # transformers' logger.warning_advice
    for name, prefixes in HARMLESS_LIBRARY_LOGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefixes))


# ---------------------------------------------------------------------------- the per-round line
def round_line(server_round: int, num_rounds: int, report: dict, central: dict | None) -> str:
    """One line for a round from ``RoundReport.to_dict()`` and the central evaluation; parts
    whose values are missing are left out."""
    parts = [f"round {server_round}/{num_rounds}"]
    central = central or {}
    if is_number(central.get("eval-loss")):
        parts.append(f"loss {central['eval-loss']:.4f}")
    if is_number(central.get("perplexity")):
        parts.append(f"ppl {central['perplexity']:.2f}")
    parts += [p for p in (_clients_part(report), _peers_part(report), _traffic_part(report), _seconds_part(report))
              if p]
    return "  ".join(parts)


def is_number(value) -> bool:
    """A measured number: an int or float, not a bool, not NaN (NaN: nothing was measured)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN


def _clients_part(report: dict) -> str | None:
    counts = [f"{len(report[key])} {key}" for key in ("kept", "rejected", "distrusted")
              if isinstance(report.get(key), list)]
    return "clients " + ", ".join(counts) if counts else None


def _peers_part(report: dict) -> str | None:
    """Serverless rounds: how many peers finished the round, and which were missing."""
    live, missing = report.get("participants"), report.get("dropped")
    if not isinstance(live, list):
        return None
    return f"peers {len(live)} live" + (f", missing {sorted(missing)}" if missing else "")


def _traffic_part(report: dict) -> str | None:
    down, up = report.get("bytes-sent"), report.get("bytes-received")
    pieces = [f"{_mb(v)} {name}" for v, name in ((down, "down"), (up, "up")) if is_number(v)]
    return "MB " + " / ".join(pieces) if pieces else None


def _mb(num_bytes: float) -> str:
    mb = num_bytes / 1e6
    return f"{mb:.1f}" if mb >= 1 else f"{mb:.2f}"


def _seconds_part(report: dict) -> str | None:
    if is_number(report.get("wall-seconds")):
        return f"{report['wall-seconds']:.1f} s"
    phases = [v for v in (report.get("seconds") or {}).values() if is_number(v)]
    return f"{sum(phases):.1f} s" if phases else None
