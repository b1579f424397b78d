"""``fedledger`` command line.

    fedledger run     [--run-config "k=v ..."] [--num-supernodes N]   a flwr simulation, checked and cleaned up
    fedledger audit   ...                                              re-hash and verify a run's ledger history
    fedledger devnet  start|stop|status                                the local anvil devnet

Errors in user input print one line (``fedledger: error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .config import ConfigError, Settings, parse_run_config_string, pyproject_defaults


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
    from .flwr_runner import run_simulation

    app_dir = os.path.abspath(args.app)
    try:
        overrides = parse_run_config_string(args.run_config or "")
        defaults = pyproject_defaults(app_dir)
        unknown = sorted(set(overrides) - set(defaults))
        if unknown:
            return _fail(f"unknown run-config key(s) {', '.join(unknown)}; valid keys are listed in "
                         f"[tool.flwr.app.config] of {os.path.join(app_dir, 'pyproject.toml')}")
        settings = Settings.from_run_config({**defaults, **overrides})
    except ConfigError as exc:
        return _fail(str(exc))
    except FileNotFoundError:
        return _fail(f"no pyproject.toml in {app_dir}; run from the fedledger folder or pass --app DIR")

    run_dir = os.path.abspath(os.path.expanduser(settings.run_dir))
    overrides["run-dir"] = run_dir
    ledger_note = None
    if settings.audit == "anvil":
        try:
            from fedledger.chain import devnet

            ledger_note = devnet.ensure_running(rpc_url=settings.rpc_url)
        except Exception as exc:  # a clear line, not a traceback wall
            return _fail(f"could not reach or start the devnet at {settings.rpc_url}: {exc}")
        if ledger_note:
            print(f"fedledger: {ledger_note}")
    run_config = " ".join(f"{k}={_toml(v)}" for k, v in overrides.items())
    fed = f"num-supernodes={args.num_supernodes} client-resources-num-cpus={args.cpus_per_client}"
    if args.federation_config:
        fed += " " + args.federation_config
    before = _latest_run_folder(run_dir)
    outcome = run_simulation(app_dir, run_config, fed, flwr_home=args.flwr_home, timeout=args.timeout, echo=not args.quiet)
    folder = _latest_run_folder(run_dir)
    print(f"\nfedledger: run {outcome.run_id} status {outcome.status}")
    if not outcome.ok:
        errors = [l[l.index("fedledger: error:"):] for l in outcome.log.splitlines() if "fedledger: error:" in l]
        errors = errors or [l.strip() for l in outcome.log.splitlines() if "Error" in l][-1:]
        if errors:
            print(errors[0], file=sys.stderr)
        return 1
    if folder and folder != before:
        print(f"fedledger: results in {folder}")
        _print_summary(folder)
        if settings.audit != "none" and not args.no_audit:
            from fedledger.cli_chain import audit_run_folder

            return audit_run_folder(folder)
    return 0


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def _print_summary(folder: str) -> None:
    with open(os.path.join(folder, "metrics.json")) as fh:
        m = json.load(fh)
    print(f"{'round':>5} {'held-out loss':>14} {'perplexity':>11} {'train loss':>11} {'MB sent':>8} {'MB recv':>8}")
    for rnd, entry in m["rounds"].items():
        c, t, tr = entry.get("central", {}), entry.get("train", {}), entry.get("traffic", {})
        print(f"{rnd:>5} {c.get('eval-loss', float('nan')):>14.4f} {c.get('perplexity', float('nan')):>11.2f} "
              f"{t.get('train-loss', float('nan')):>11.4f} {tr.get('bytes-sent', 0) / 1e6:>8.2f} {tr.get('bytes-received', 0) / 1e6:>8.2f}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedledger", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a Flower simulation of the app and check its real status")
    run.add_argument("--app", default=".", help="app folder holding pyproject.toml (default: .)")
    run.add_argument("--run-config", default="", help='overrides, e.g. "num-rounds=5 model=\'tiny\'"')
    run.add_argument("--num-supernodes", type=int, default=4)
    run.add_argument("--cpus-per-client", type=float, default=1)
    run.add_argument("--federation-config", default="", help="extra federation overrides")
    run.add_argument("--flwr-home", default=".flwr", help="FLWR_HOME for this run (default: ./.flwr)")
    run.add_argument("--timeout", type=float, default=3 * 3600)
    run.add_argument("--no-audit", action="store_true", help="skip the audit at the end of an audited run")
    run.add_argument("--quiet", action="store_true")
    run.set_defaults(func=cmd_run)
    from .cli_chain import add_chain_commands

    add_chain_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
