"""Chain commands of the ``fedledger`` CLI: ``devnet start|stop|status``, ``registry`` (the admin's
``deploy|enrol|revoke|show``), ``audit`` and ``resend`` (a run's journal against the chain).

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
                     as_json: bool = False, atol: float = 0.0, admin: str | None = None) -> int:
    """Audit one run folder, print the table (or JSON); returns the exit code (see the module)."""
    return audit_folder(folder, rpc_url, registry_address, as_json, atol, admin)[0]


def audit_folder(folder: str, rpc_url: str | None = None, registry_address: str | None = None,
                 as_json: bool = False, atol: float = 0.0, admin: str | None = None
                 ) -> tuple[int, dict | None, str | None]:
    """Audit one run folder and print the table (or JSON), once: (exit code, the audit's JSON as
    ``--json`` prints it, or None with the one-line reason it could not run). ``fedledger run`` hands
    the JSON to its report, so a run is audited once."""
    from fedledger.chain.audit import audit_run
    from fedledger.chain.ledger import LedgerError

    try:
        report = audit_run(folder, rpc_url=rpc_url, registry_address=registry_address, atol=atol, admin=admin)
    except LedgerError as exc:
        return _fail(str(exc)), None, f"{type(exc).__name__}: {exc}"
    except (OSError, ValueError, KeyError) as exc:
        _fail(f"cannot read the audit record in {folder} ({type(exc).__name__}: {exc}); "
              f"pass the folder of an audited run")
        return EXIT_BAD_INPUT, None, f"{type(exc).__name__}: {exc}"
    result = report.to_dict()
    print(json.dumps(result, indent=1) if as_json else report.table())
    return report.exit_code, result, None


def cmd_audit(args) -> int:
    if (args.run_folder is None) == (args.run_id is None):
        return _fail("pass either a run folder or --run-id ID (with --runs DIR, the run-dir of the run)")
    folder = args.run_folder
    if args.run_id is not None:
        folder = _folder_of_run(args.run_id, args.runs)
        if folder is None:
            return EXIT_BAD_INPUT
    return audit_run_folder(folder, rpc_url=args.rpc_url, registry_address=args.registry_address,
                            as_json=args.json, atol=args.atol, admin=args.admin)


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


def cmd_registry(args) -> int:
    """The admin's commands: deploy a registry naming the aggregator, enrol / revoke signers, show it."""
    from fedledger.chain.ledger import Ledger, LedgerError

    try:
        if args.action == "deploy":
            if not args.aggregator:
                return _fail("registry deploy needs --aggregator ADDRESS (the aggregator's account)")
            admin = Ledger.deploy(args.rpc_url, args.aggregator, admin_key_file=args.admin_key_file)
            print(f"registry {admin.address} on chain {admin.chain_id}: admin {admin.admin_address()}, aggregator "
                  f"{admin.aggregator_address()}, deploy block {admin.deploy_block}; give the aggregator "
                  f"--run-config \"registry-address='{admin.address}' enrol='none'\" once you enrolled the clients")
            return 0
        if not args.registry_address:
            return _fail(f"registry {args.action} needs --registry-address ADDRESS")
        ledger = Ledger.connect(args.rpc_url, args.registry_address, read_only=True)
        if args.action == "show":
            info = {**ledger.info(), "enrolled": sorted(ledger.enrolled_signers())}
            print(json.dumps(info, indent=1) if args.json else
                  f"registry {info['registry-address']} on chain {info['chain-id']}: admin {info['admin']}, aggregator "
                  f"{info['aggregator']}, deploy block {info['deploy-block']}, {len(info['enrolled'])} signer(s) "
                  f"enrolled: {', '.join(info['enrolled']) or '-'}")
            return 0
        if not args.signers:
            return _fail(f"registry {args.action} needs the signer addresses to {args.action}")
        admin = ledger.admin(private_key_file=args.admin_key_file)
        changed = admin.enrol(args.signers) if args.action == "enrol" else admin.revoke(args.signers)
        funded = admin.fund(args.signers) if args.action == "enrol" and args.fund_devnet else 0
        done = {"enrol": "enrolled", "revoke": "revoked"}[args.action]
        print(f"registry {admin.address}: {done} {len(changed)} of {len(args.signers)} signer(s)"
              + (f", funded {funded} (devnet)" if funded else ""))
        return 0
    except LedgerError as exc:
        return _fail(str(exc))


def cmd_devnet(args) -> int:
    from fedledger.chain import devnet
    from fedledger.chain.ledger import LedgerError

    try:
        if args.action == "start":
            info = devnet.start(port=args.port, state_dir=args.dir, state_interval=args.state_interval)
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
        if info.get("state-interval"):
            print(f"devnet: {devnet.what_a_kill_loses(info['state-interval'])}")
    else:
        print(f"devnet: {info.get('note', 'not running')} (state {info['state-file']})")
    return 0 if (info["running"] or args.action != "status") else 3


def devnet_interval() -> int:
    from fedledger.chain.devnet import DEFAULT_STATE_INTERVAL

    return DEFAULT_STATE_INTERVAL


def cmd_resend(args) -> int:
    """The run's journal against the chain; with --send, the lost writes re-sent."""
    from fedledger.chain import journal
    from fedledger.chain.ledger import Ledger, LedgerError
    from fedledger.chain.store import ArtifactStore

    store = ArtifactStore(args.run_folder, create=False)
    try:
        loaded = store.read_document(store.run_path)
        if loaded is None:
            return _fail(f"no audit record at {store.run_path}; pass the folder of a run made with audit=\"anvil\"")
        run = loaded[1]
        entries = [e for e in journal.read_journal(os.path.join(store.root, journal.JOURNAL_FILE))
                   if str(e.get("registry", "")).lower() == str(run.get("registry-address", "")).lower()]
        if not entries:
            return _fail(f"{os.path.join(store.root, journal.JOURNAL_FILE)} holds no write of this run's registry")
        ledger = Ledger.connect(args.rpc_url or run["rpc-url"], run["registry-address"], chain_id=run.get("chain-id"),
                                read_only=not args.send, private_key_file=args.aggregator_key_file)
        missing = journal.lost(ledger, entries)
        print(f"journal: {len(entries)} write(s) of run {run['run-id']}, {len(missing)} not on chain"
              + (f" (from {journal.describe(missing[0])} on)" if missing else ""))
        if not missing or not args.send:
            return 1 if missing else 0
        admin = ledger.admin(private_key_file=args.admin_key_file) if any(e["op"] == "enrol" for e in missing) else None
        for entry in missing:
            journal.send(ledger, admin, entry)
            print(f"re-sent {journal.describe(entry)}")
        return 0
    except LedgerError as exc:
        return _fail(str(exc))
    except (OSError, ValueError, KeyError) as exc:
        return _fail(f"cannot read the run record in {args.run_folder} ({type(exc).__name__}: {exc})")


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
    audit.add_argument("--admin", default=None, help="the registry admin you trust (0x address): a registry "
                       "administered by another is flagged (default: report the admin, do not require one)")
    audit.add_argument("--json", action="store_true", help="print the report as JSON")
    audit.set_defaults(func=cmd_audit)

    reg = subparsers.add_parser(
        "registry", help="the admin's commands: deploy a registry, enrol / revoke client signers, show it",
        description="The admin key: --admin-key-file (keystore with its password in $FEDLEDGER_ADMIN_KEY_PASSWORD, "
                    "or 0x hex), else $FEDLEDGER_ADMIN_KEY, else the node's second unlocked account (devnets only).")
    reg.add_argument("action", choices=["deploy", "enrol", "revoke", "show"])
    reg.add_argument("signers", nargs="*", help="client signer addresses (enrol, revoke)")
    reg.add_argument("--rpc-url", default="http://127.0.0.1:8545")
    reg.add_argument("--registry-address", default=None, help="the registry (enrol, revoke, show)")
    reg.add_argument("--aggregator", default=None, help="the aggregator's address (deploy)")
    reg.add_argument("--admin-key-file", default=None, help="the admin's key file")
    reg.add_argument("--fund-devnet", action="store_true", help="enrol: also give each signer 1 ETH for its contests "
                     "(anvil_setBalance: devnets only)")
    reg.add_argument("--json", action="store_true")
    reg.set_defaults(func=cmd_registry)

    dev = subparsers.add_parser("devnet", help="local anvil devnet with its state in a file")
    dev.add_argument("action", choices=["start", "stop", "status"])
    dev.add_argument("--port", type=int, default=8545)
    dev.add_argument("--dir", default=None, help="state folder (default: .fedledger/devnet in the cwd)")
    dev.add_argument("--state-interval", type=int, default=devnet_interval(), help="start: seconds between anvil's "
                     "state dumps; a SIGKILL loses the blocks mined since the last one (default: %(default)s, the "
                     "least anvil allows)")
    dev.add_argument("--json", action="store_true")
    dev.set_defaults(func=cmd_devnet)

    res = subparsers.add_parser(
        "resend", help="compare a run's ledger journal with the chain and re-send what the node lost",
        description="Reads <run folder>/audit/journal.jsonl (every write the run made, journaled before it was sent), "
                    "checks the chain's state for them and, with --send, re-sends the ones the node no longer holds "
                    "(a node restarted from an older state). Exit codes: 0 nothing lost (or all re-sent), 1 lost "
                    "writes found and not re-sent, 2 bad input.")
    res.add_argument("run_folder", help="folder of an audited run (holds audit/journal.jsonl)")
    res.add_argument("--send", action="store_true", help="re-send the lost writes (the run's aggregator key; the "
                     "admin's for a lost enrolment)")
    res.add_argument("--rpc-url", default=None, help="JSON-RPC URL (default: the one the run used)")
    res.add_argument("--aggregator-key-file", default=None, help="the aggregator's key file (default: "
                     "$FEDLEDGER_AGGREGATOR_KEY, else the node's first unlocked account: devnets only)")
    res.add_argument("--admin-key-file", default=None, help="the admin's key file (a lost enrolment only)")
    res.set_defaults(func=cmd_resend)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedledger", description="fedledger chain commands")
    sub = parser.add_subparsers(dest="command", required=True)
    add_chain_commands(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
