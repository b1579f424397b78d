"""Chain commands of the ``fedledger`` CLI: ``devnet start|stop|status`` and ``audit``.

``fedledger/cli.py`` calls :func:`add_chain_commands`; ``python -m fedledger.cli_chain ...`` works
too. ``fedledger audit RUN_FOLDER`` (or ``fedledger audit --run-id ID [--runs DIR]``, which finds
``DIR/<time>-runID/``) exits with 0 when every record is verified, 1 when it finds problems,
2 on bad input (unreachable RPC, wrong chain id, unknown registry, missing artifact or run
folder: one ``fedledger: error: ...`` line) and 3 when it found no problem but could not verify
everything (an aggregate it cannot recompute, unsigned updates).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

EXIT_BAD_INPUT = 2


def _fail(msg: str) -> int:
    print(f"fedledger: error: {msg}", file=sys.stderr)
    return EXIT_BAD_INPUT


def audit_run_folder(folder: str, rpc_url: str | None = None, registry_address: str | None = None,
                     as_json: bool = False, atol: float = 0.0) -> int:
    """Audit one run folder, print the table (or JSON); returns the exit code (see the module)."""
    from fedledger.chain.audit import audit_run
    from fedledger.chain.ledger import LedgerError

    try:
        report = audit_run(folder, rpc_url=rpc_url, registry_address=registry_address, atol=atol)
    except LedgerError as exc:
        return _fail(str(exc))
    except (OSError, ValueError, KeyError) as exc:
        return _fail(f"cannot read the audit record in {folder} ({type(exc).__name__}: {exc}); "
                     f"pass the folder of an audited run")
    print(json.dumps(report.to_dict(), indent=1) if as_json else report.table())
    return report.exit_code


def cmd_audit(args) -> int:
    if (args.run_folder is None) == (args.run_id is None):
        return _fail("pass either a run folder or --run-id ID (with --runs DIR, the run-dir of the run)")
    folder = args.run_folder
    if args.run_id is not None:
        folder = _folder_of_run(args.run_id, args.runs)
        if folder is None:
            return EXIT_BAD_INPUT
    return audit_run_folder(folder, rpc_url=args.rpc_url, registry_address=args.registry_address,
                            as_json=args.json, atol=args.atol)


def _folder_of_run(run_id: int, runs: str) -> str | None:
    """The one audited run folder of ``run_id`` under ``runs``; None (after one error line) otherwise."""
    from fedledger.chain.store import find_run_folders

    found = find_run_folders(runs, run_id)
    if not found:
        _fail(f"no audited run {run_id} under {os.path.abspath(runs)} (looked for */audit/run.json in "
              f"*-run{run_id}); pass --runs with the run-dir of that run")
        return None
    if len(found) > 1:
        _fail(f"run {run_id} has {len(found)} audited folders under {os.path.abspath(runs)}: "
              f"{', '.join(os.path.basename(f) for f in found)}; pass the folder itself")
        return None
    return found[0]


def cmd_devnet(args) -> int:
    from fedledger.chain import devnet
    from fedledger.chain.ledger import LedgerError

    try:
        if args.action == "start":
            info = devnet.start(port=args.port, state_dir=args.dir)
        elif args.action == "stop":
            info = devnet.stop(state_dir=args.dir)
        else:
            info = devnet.status(state_dir=args.dir)
    except LedgerError as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps(info, indent=1))
    elif info["running"]:
        extra = f", block {info['block']}, chain id {info['chain-id']}" if "block" in info else ""
        print(f"devnet: {info.get('note', 'running')}: anvil pid {info['pid']} at {info.get('rpc-url')}{extra}; "
              f"state {info['state-file']}")
    else:
        print(f"devnet: {info.get('note', 'not running')} (state {info['state-file']})")
    return 0 if (info["running"] or args.action != "status") else 3


def add_chain_commands(subparsers) -> None:
    audit = subparsers.add_parser(
        "audit", help="audit a run: chain records vs stored files, every aggregate recomputed",
        description="Exit codes: 0 every record verified, 1 problems found, 2 bad input, 3 no problem found but "
                    "not everything verified (an aggregate not recomputed, unsigned updates).")
    audit.add_argument("run_folder", nargs="?", default=None, help="folder of an audited run (holds audit/run.json)")
    audit.add_argument("--run-id", type=int, default=None, help="audit the run with this Flower run id instead "
                       "(its folder <runs>/<time>-run<ID>)")
    audit.add_argument("--runs", default="runs", help="run-dir to look for --run-id in (default: ./runs)")
    audit.add_argument("--rpc-url", default=None, help="JSON-RPC URL (default: the one the run used)")
    audit.add_argument("--registry-address", default=None, help="registry address (default: the run's)")
    audit.add_argument("--atol", type=float, default=0.0, help="tolerance for the recomputed aggregate (default: bit-exact)")
    audit.add_argument("--json", action="store_true", help="print the report as JSON")
    audit.set_defaults(func=cmd_audit)

    dev = subparsers.add_parser("devnet", help="local anvil devnet with its state in a file")
    dev.add_argument("action", choices=["start", "stop", "status"])
    dev.add_argument("--port", type=int, default=8545)
    dev.add_argument("--dir", default=None, help="state folder (default: .fedledger/devnet in the cwd)")
    dev.add_argument("--json", action="store_true")
    dev.set_defaults(func=cmd_devnet)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedledger", description="fedledger chain commands")
    sub = parser.add_subparsers(dest="command", required=True)
    add_chain_commands(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
