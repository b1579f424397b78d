"""``fedledger`` command line.

    fedledger run     [--run-config "k=v ..."] [--num-supernodes N]   a flwr simulation, checked and cleaned up
                      [--quiet | --verbose]                          warnings only / everything flwr streams
                      [--resume RUN_FOLDER]                          continue a run after its last completed round
    fedledger audit   ...                                              re-hash and verify a run's ledger history
    fedledger devnet  start|stop|status                                the local anvil devnet
    fedledger report  RUN_DIR                                          HTML page + PNG plots of a run
    fedledger bench   SUITE... [--quick]                               the benchmarks of bench/ (chain, trust, ...)

Errors in user input print one line (``fedledger: error: ...``) and exit with status 2; the
settings are checked before any process starts. ``.venv/bin/fedledger`` works without an
activated virtualenv (the flwr processes get the interpreter's bin folder first on PATH).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys

from . import logs
from .app_folder import toml_value
from .config import ConfigError, Settings, parse_run_config_string, pyproject_defaults
from .flwr_runner import MODE_LEVELS, run_simulation
from .progress import LiveRound


def _fail(message: str, code: int = 2) -> int:
    print(f"fedledger: error: {message}", file=sys.stderr)
    return code


def _latest_run_folder(run_dir: str) -> str | None:
    path = os.path.join(run_dir, "LATEST")
    if os.path.exists(path):
        with open(path) as fh:
            return fh.read().strip() or None
    return None


def cmd_run(args) -> int:
    mode = _output_mode(args)
    app_dir = _app_dir(args.app, mode)
    try:
        logs.configure(None if mode == "default" else MODE_LEVELS[mode])
        settings, overrides = _checked_settings(app_dir, args, _resumed_run_config(args.resume))
    except (ConfigError, ValueError) as exc:  # ValueError: a bad $FEDLEDGER_LOG_LEVEL
        return _fail(str(exc))
    except FileNotFoundError:
        return _fail(f"no pyproject.toml in {app_dir}; run from the fedledger folder or pass --app DIR")

    run_dir = os.path.abspath(os.path.expanduser(settings.run.run_dir))
    overrides["run-dir"] = run_dir
    if settings.audit.ledger == "anvil":
        try:
            from fedledger.chain import devnet

            ledger_note = devnet.ensure_running(rpc_url=settings.audit.rpc_url)
        except Exception as exc:  # a clear line, not a traceback wall
            return _fail(f"could not reach or start the devnet at {settings.audit.rpc_url}: {exc}")
        if ledger_note and mode != "quiet":
            print(f"fedledger: {ledger_note}")
    run_config = " ".join(f"{k}={toml_value(v)}" for k, v in overrides.items())
    before = _latest_run_folder(run_dir)
    with LiveRound(enabled=mode != "quiet") as live:  # one live line per round; --quiet: none
        outcome = run_simulation(app_dir, run_config, _federation_config(args), flwr_home=args.flwr_home,
                                 timeout=args.timeout, mode=mode, progress=live.feed if mode != "quiet" else None)
    folder = _latest_run_folder(run_dir)
    print(f"\nfedledger: run {outcome.run_id} status {outcome.status}")
    if not outcome.ok:
        errors = [l[l.index("fedledger: error:"):] for l in outcome.log.splitlines() if "fedledger: error:" in l]
        errors = errors or [l.strip() for l in outcome.log.splitlines() if "Error" in l][-1:]
        if errors:
            print(errors[0], file=sys.stderr)
        return 1
    if folder and (folder != before or args.resume):
        print(f"fedledger: results in {folder}")
        _print_summary(folder)
        code, audit_result = 0, None
        if settings.audit.ledger != "none" and not args.no_audit:
            from fedledger.cli_chain import audit_folder

            code, audit_json, audit_error = audit_folder(folder)
            audit_result = (audit_json, audit_error)
        _print_report(folder, audit=not args.no_audit, audit_result=audit_result)
        return code
    return 0


def _print_report(folder: str, audit: bool, audit_result: tuple[dict | None, str | None] | None = None) -> None:
    """The run's HTML report (fedledger.report) with the audit just printed (``audit_result``:
    its JSON and error; the run is not audited a second time); a report that fails does not
    fail the run."""
    from .report import build_report

    try:
        report = build_report(folder, audit=audit, audit_result=audit_result)
    except Exception as exc:  # the run's results are written: say so, in one line
        print(f"fedledger: warning: could not write the report ({type(exc).__name__}: {exc}); "
              f"try: fedledger report {folder}", file=sys.stderr)
        return
    print(f"fedledger: report {report.html}")


def _app_dir(app: str | None, mode: str) -> str:
    """--app, else the current folder, else (no pyproject.toml here) the installed package's app."""
    if app is not None or os.path.exists("pyproject.toml"):
        return os.path.abspath(app or ".")
    from .app_folder import APP_FOLDER, write_app

    folder = write_app(APP_FOLDER)
    if mode != "quiet":
        print(f"fedledger: no pyproject.toml here: running the installed fedledger app ({folder})")
    return folder


def _output_mode(args) -> str:
    return "quiet" if args.quiet else "verbose" if args.verbose else "default"


def _resumed_run_config(folder: str | None) -> dict:
    """The run-config of the run in ``folder`` (its checkpoint) plus ``resume=<folder>``; {} for a new run."""
    if not folder:
        return {}
    from fedledger.core.checkpoint import Checkpoint, CheckpointError

    path = os.path.abspath(folder)
    try:
        state = Checkpoint(path).load()
    except CheckpointError as exc:
        raise ConfigError(f"--resume {folder}: {exc}") from None
    print(f"fedledger: resuming {path} after round {state['round']}")
    return {**state["extra"].get("run-config", {}), "resume": path}


def _checked_settings(app_dir: str, args, base: dict | None = None) -> tuple[Settings, dict]:
    """Typed settings for defaults + overrides, checked against the node count, before anything starts.
    ``base``: a resumed run's own run-config, under the command line's overrides."""
    overrides = {**(base or {}), **parse_run_config_string(args.run_config or "")}
    defaults = pyproject_defaults(app_dir)
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, defaults, n=1)) else k
                 for k in unknown]
        raise ConfigError(f"unknown run-config key(s) {', '.join(hints)}; valid keys are listed in "
                          f"[tool.flwr.app.config] of {os.path.join(app_dir, 'pyproject.toml')}")
    settings = Settings.from_run_config({**defaults, **overrides}, strict=True)
    settings.check_nodes(_num_supernodes(args))
    from .frameworks import preflight  # the model's config and the data, still before anything starts

    preflight(settings, _num_supernodes(args))
    return settings, overrides


def _federation_config(args) -> str:
    fed = f"num-supernodes={args.num_supernodes} client-resources-num-cpus={args.cpus_per_client}"
    return f"{fed} {args.federation_config}" if args.federation_config else fed


def _num_supernodes(args) -> int:
    """--num-supernodes, unless --federation-config sets num-supernodes (flwr takes the last value)."""
    extra = parse_run_config_string(args.federation_config or "")
    value = extra.get("num-supernodes", args.num_supernodes)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"--federation-config num-supernodes={value!r} is not valid; pass a whole number, "
                          "e.g. --num-supernodes 4")
    return value


def _print_summary(folder: str) -> None:
    with open(os.path.join(folder, "metrics.json")) as fh:
        m = json.load(fh)
    print(f"{'round':>5} {'held-out loss':>14} {'perplexity':>11} {'train loss':>11} {'MB sent':>8} {'MB recv':>8}")
    for rnd, entry in m.get("rounds", {}).items():
        c, t, tr = entry.get("central", {}), entry.get("train", {}), entry.get("traffic", {})
        cells = [_cell(c.get("eval-loss"), 14, ".4f"), _cell(c.get("perplexity"), 11, ".2f"),
                 _cell(t.get("train-loss"), 11, ".4f"), _cell(_mb(tr.get("bytes-sent")), 8, ".2f"),
                 _cell(_mb(tr.get("bytes-received")), 8, ".2f")]
        print(f"{rnd:>5} " + " ".join(cells))


def _mb(num_bytes) -> float | None:
    return num_bytes / 1e6 if isinstance(num_bytes, (int, float)) else None


def _cell(value, width: int, fmt: str) -> str:
    """A number, or "-" where the run did not record one."""
    return f"{value:>{width}{fmt}}" if isinstance(value, (int, float)) and value == value else f"{'-':>{width}}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedledger", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a Flower simulation of the app and check its real status")
    run.add_argument("--app", default=None, help="app folder holding pyproject.toml (default: ., or the installed "
                     "package's app where . has none)")
    run.add_argument("--run-config", default="", help='overrides, e.g. "num-rounds=5 model=\'tiny\'"')
    run.add_argument("--num-supernodes", type=int, default=4)
    run.add_argument("--cpus-per-client", type=int, default=1,
                     help="CPUs Ray gives each ClientApp (a whole number: Flower refuses fractions)")
    run.add_argument("--federation-config", default="", help="extra federation overrides")
    run.add_argument("--flwr-home", default=".flwr", help="FLWR_HOME for this run (default: ./.flwr)")
    run.add_argument("--timeout", type=float, default=3 * 3600)
    run.add_argument("--no-audit", action="store_true", help="skip the audit at the end of an audited run")
    run.add_argument("--resume", default=None, metavar="RUN_FOLDER", help="continue the run of RUN_FOLDER after its "
                     "last completed round, with its settings and its run id on the ledger (--run-config may raise "
                     "num-rounds); pass the same --num-supernodes")
    output = run.add_mutually_exclusive_group()
    output.add_argument("--quiet", action="store_true", help="only warnings, errors and the final result lines")
    output.add_argument("--verbose", action="store_true",
                        help="everything flwr streams (Flower's INFO lines, library warnings) and fedledger's DEBUG lines")
    run.set_defaults(func=cmd_run)
    from .cli_chain import add_chain_commands
    from .bench_cli import add_bench_command
    from .report import add_report_command

    add_chain_commands(sub)
    add_report_command(sub)
    add_bench_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not getattr(args, "verbose", False):
        logs.quiet_libraries()
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
