"""``fedledger report``: a real audited run (in-process ServerApp, tiny model, eth-tester) with an
attacker and PageRank trust, rendered by a real headless Chromium; a tampered copy of the same run
is reported as failed; a serverless run gets its own figures; bad input says what is missing."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from flwr.app import Context, RecordDict

from fedledger.report import build_report

from .conftest import TINY

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HUB_FIGURES = {"loss", "traffic", "clients", "trust", "detection", "audit"}


def _run(tmp_path_factory, name: str, cfg: dict, nodes: int = 3) -> str:
    from fedledger import server_app
    from fedledger.client_app import app as client_app
    from fedledger.inprocess import InProcessGrid

    cfg = {**TINY, "local-steps": 1, "run-dir": str(tmp_path_factory.mktemp(name)), **cfg}
    grid = InProcessGrid(client_app, nodes, cfg, run_id=21, seed=3)
    return server_app.run(grid, Context(run_id=21, node_id=0, node_config={}, state=RecordDict(), run_config=cfg),
                          settle=0.0)


@pytest.fixture
def audited_run(audited_attacked_run) -> str:
    return audited_attacked_run[0]


def rendered_dom(page: str) -> str:
    """The DOM of ``page`` after Chromium loaded it (images decoded, no network)."""
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must have chromium: scripts/setup.sh installs Debian's chromium package")
        pytest.skip("no chromium on this machine (apt-get install -y chromium; scripts/setup.sh does it)")
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          f"file://{os.path.abspath(page)}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "<html" in out.stdout, out.stderr[-2000:]
    return out.stdout


def figures_in(dom: str) -> set[str]:
    """Figures whose PNG is embedded as an image in the rendered page."""
    found = re.findall(r"<figure id=\"fig-(\w+)\"[^>]*>.*?<img [^>]*src=\"data:image/png;base64,([A-Za-z0-9+/=]{100,})\"",
                       dom, flags=re.S)
    return {name for name, _ in found}


def verdict_in(dom: str) -> str:
    m = re.search(r"<p id=\"verdict\" class=\"[^\"]*\" data-verdict=\"([\w-]+)\">([^<]*)", dom)
    assert m, dom[:2000]
    return m.group(1), m.group(2)


def test_the_page_shows_every_figure_of_an_audited_attacked_run_in_a_real_browser(audited_run):
    report = build_report(audited_run)
    dom = rendered_dom(report.html)
    assert figures_in(dom) == HUB_FIGURES == set(report.figures)
    # an eth-tester chain dies with its process: the audit checks the aggregator's own copy of the
    # events, finds no problem, and says it could not check them against a chain (never "passed")
    verdict, text = verdict_in(dom)
    assert verdict == "incomplete" and "aggregator's own copy" in text, (verdict, text)
    assert report.missing == []
    with open(os.path.join(audited_run, "metrics.json")) as fh:
        registry = json.load(fh)["ledger"]["registry-address"]
    assert registry in dom and str(report.audit["chain-id"]) in dom
    assert re.search(r"0x[0-9a-f]{64}", dom), "transaction hashes"
    for name in HUB_FIGURES:  # the same plots beside the page
        with open(os.path.join(report.folder, f"{name}.png"), "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def _tamper(folder: str) -> None:
    """The aggregator rewrites one stored update of round 1 after the round was committed."""
    updates = os.path.join(folder, "audit", "round-0001", "updates")
    victim = os.path.join(updates, sorted(os.listdir(updates))[0])
    with open(victim, "r+b") as fh:
        fh.seek(-4, os.SEEK_END)
        last = fh.read(4)
        fh.seek(-4, os.SEEK_END)
        fh.write(bytes(b ^ 0xFF for b in last))


def test_a_tampered_run_is_reported_as_failed(audited_run, tmp_path):
    tampered = str(tmp_path / "tampered")
    shutil.copytree(audited_run, tampered, ignore=shutil.ignore_patterns("report"))
    _tamper(tampered)
    report = build_report(tampered)
    dom = rendered_dom(report.html)
    verdict, text = verdict_in(dom)
    assert verdict == "failed" and "FAILED" in text and "problem" in text, text
    assert "audit" in figures_in(dom)
    bad = [r for r in report.audit["rows"] if r["status"] == "MISMATCH"]
    assert bad and bad[0]["round"] == 1, report.audit["rows"]


def test_an_audit_that_cannot_reach_its_chain_is_not_checked_never_passed(audited_run, tmp_path):
    """The aggregator points the run's record at a chain that is not there: no verdict is shown."""
    moved = str(tmp_path / "moved")
    shutil.copytree(audited_run, moved, ignore=shutil.ignore_patterns("report"))
    path = os.path.join(moved, "audit", "run.json")
    with open(path) as fh:
        run = json.load(fh)
    run.update({"kind": "anvil", "rpc-url": "http://127.0.0.1:9"})
    with open(path, "w") as fh:
        json.dump(run, fh)
    report = build_report(moved)
    assert report.verdict == "not-checked" and report.audit is None
    assert "audit" not in report.figures and any("could not run" in m for m in report.missing), report.missing
    dom = rendered_dom(report.html)
    assert verdict_in(dom)[0] == "not-checked" and "PASSED" not in dom


@pytest.mark.parametrize("tampered", [False, True], ids=["clean", "tampered"])
def test_fedledger_run_audits_once_and_its_report_shows_the_verdict_it_printed(audited_run, tmp_path, monkeypatch,
                                                                               capsys, tampered):
    """``fedledger run`` ends with the audit table and the report: one audit (calls counted on the
    real ``audit_run``), and the page's verdict is the printed one (flwr itself is not started:
    the finished run is the shared audited run folder, tampered or not)."""
    from fedledger import cli
    from fedledger.chain import audit as chain_audit
    from fedledger.flwr_runner import RunOutcome

    run_dir = tmp_path / "runs"
    folder = run_dir / os.path.basename(audited_run)
    shutil.copytree(audited_run, folder, ignore=shutil.ignore_patterns("report"))
    if tampered:
        _tamper(str(folder))

    def finished_run(app_dir, run_config, federation_config, **kw):  # what flwr leaves behind: the run folder
        (run_dir / "LATEST").write_text(str(folder))
        return RunOutcome("21", "finished:completed", "", 0)

    calls, real_audit = [], chain_audit.audit_run

    def counted_audit(*args, **kwargs):
        calls.append(args[0] if args else kwargs.get("run_folder"))
        return real_audit(*args, **kwargs)

    monkeypatch.setattr(cli, "run_simulation", finished_run)
    monkeypatch.setattr(chain_audit, "audit_run", counted_audit)
    code = cli.main(["run", "--app", os.path.dirname(os.path.dirname(__file__)), "--num-supernodes", "3", "--quiet",
                     "--run-config", f"model='tiny' audit='eth-tester' run-dir='{run_dir}'"])
    out = capsys.readouterr().out.splitlines()
    assert calls == [str(folder)], f"the run was audited {len(calls)} times"
    assert code == (1 if tampered else 3)  # problems found / no problem but not checked against a chain
    printed = [l for l in out if l.startswith("audit: ")]
    page = [l.split("fedledger: report ", 1)[1] for l in out if l.startswith("fedledger: report ")]
    assert len(printed) == 1 and page == [str(folder / "report" / "report.html")], out
    with open(page[0]) as fh:
        verdict = re.search(r"data-verdict='([\w-]+)'>([^<]*)</p>", fh.read())
    assert verdict.group(1) == ("failed" if tampered else "incomplete")
    assert html.unescape(verdict.group(2)).endswith(printed[0]), (verdict.group(2), printed[0])
    if tampered:
        assert "problem(s) found" in printed[0]


def test_a_serverless_run_gets_consensus_and_network_figures(tmp_path_factory):
    folder = _run(tmp_path_factory, "gossip", {"strategy": "gossip", "trust": "pagerank", "attack": "sign-flip",
                                                "malicious": "2", "num-rounds": 1})
    report = build_report(folder)
    dom = rendered_dom(report.html)
    assert figures_in(dom) == {"loss", "traffic", "clients", "trust", "detection", "serverless"}
    assert verdict_in(dom)[0] == "not-audited"


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedledger.cli", "report", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))})


def test_a_missing_folder_or_a_folder_that_is_not_a_run_is_one_line_and_exit_1(tmp_path):
    for path in (str(tmp_path / "nope"), str(tmp_path)):
        out = _cli(path)
        assert out.returncode == 1, out
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fedledger: error:") and path in lines[0], out.stderr


def test_a_crashed_run_renders_its_audit_and_says_metrics_are_missing(audited_run, tmp_path):
    crashed = str(tmp_path / "crashed")
    shutil.copytree(audited_run, crashed, ignore=shutil.ignore_patterns("report", "metrics.json"))
    out = _cli(crashed)
    assert out.returncode == 0, out
    assert out.stderr.strip().count("\n") == 0 and "missing: metrics.json" in out.stderr, out.stderr
    report = build_report(crashed)
    assert report.figures == ["audit"] and report.verdict == "incomplete"


def test_a_run_with_a_round_missing_says_which(audited_run, tmp_path):
    partial = str(tmp_path / "partial")
    shutil.copytree(audited_run, partial, ignore=shutil.ignore_patterns("report"))
    path = os.path.join(partial, "metrics.json")
    with open(path) as fh:
        m = json.load(fh)
    del m["rounds"]["2"]
    with open(path, "w") as fh:
        json.dump(m, fh)
    report = build_report(partial)
    assert report.missing == ["round(s) 2 of 2 (not in metrics.json)"]
    assert "loss" in report.figures
    with open(report.html) as fh:
        assert "round(s) 2 of 2" in fh.read()
