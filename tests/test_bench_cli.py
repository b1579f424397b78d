"""``fedledger bench``: suites by name, smoke sizes that never overwrite the committed results."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from fedledger.bench_cli import GROUPS, SUITES, bench_folder, command, resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fedledger.cli", "bench", *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})


def test_every_suite_names_a_script_of_bench():
    bench = bench_folder()
    assert sorted(f for f in os.listdir(bench) if f.startswith("bench_")) == sorted(s.script for s in SUITES.values())
    assert set(GROUPS["trust"]) <= set(SUITES) and "qlora-gpu" not in GROUPS["all"]


def test_a_quick_run_writes_outside_the_committed_results():
    bench = bench_folder()
    for suite in SUITES.values():
        cmd = command(suite, bench, quick=True, out=None)
        out = cmd[cmd.index("--out") + 1]
        assert cmd.count("--out") == 1 and out.startswith(os.path.join(bench, "results", "quick")), cmd


def test_groups_expand_without_repeating_a_suite():
    assert [s.name for s in resolve(["trust-speed", "trust"])] == ["trust-speed", "robustness", "serverless-trust"]


def test_fedledger_bench_quick_writes_the_suite_json_and_markdown(tmp_path):
    out = _cli("trust-speed", "--quick", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    with open(tmp_path / "trust_speed.json") as fh:
        payload = json.load(fh)
    assert payload and (tmp_path / "trust_speed.md").read_text().strip()
    assert f"results in {tmp_path}" in out.stdout


def test_an_unknown_suite_is_one_line_and_exit_2():
    out = _cli("trusst")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "unknown bench suite 'trusst'" in out.stderr
