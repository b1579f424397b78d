"""``fedledger report``: a real audited run (in-process ServerApp, tiny model, eth-tester) with an
attacker and PageRank trust, rendered by a real headless Chromium; a tampered copy of the same run
is reported as failed; a serverless run gets its own figures; bad input says what is missing."""

from __future__ import annotations

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


def test_a_tampered_run_is_reported_as_failed(audited_run, tmp_path):
    tampered = str(tmp_path / "tampered")
    shutil.copytree(audited_run, tampered, ignore=shutil.ignore_patterns("report"))
    updates = os.path.join(tampered, "audit", "round-0001", "updates")
    victim = os.path.join(updates, sorted(os.listdir(updates))[0])
    with open(victim, "r+b") as fh:  # the aggregator rewrites one stored update after the round was committed
        fh.seek(-4, os.SEEK_END)
        last = fh.read(4)
        fh.seek(-4, os.SEEK_END)
        fh.write(bytes(b ^ 0xFF for b in last))
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
