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
    # bench_setup.sh is not a suite: it builds a whole fresh virtualenv (minutes, the network), run by hand
    scripts = sorted(f for f in os.listdir(bench) if f.startswith("bench_") and f.endswith(".py"))
    assert scripts == sorted(s.script for s in SUITES.values())
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


# ---------------------------------------------------------------------------- docs/results.md
def test_docs_results_holds_every_committed_bench_result_as_generated():
    from fedledger.bench_cli import regenerate_docs

    results = os.path.join(bench_folder(), "results")
    with open(os.path.join(ROOT, "docs", "results.md")) as fh:
        docs = fh.read()
    regenerated, missing = regenerate_docs(docs, results)
    assert not missing
    assert regenerated == docs, "docs/results.md is behind bench/results: run `fedledger bench --docs`"
    stems = {f[:-3] for f in os.listdir(results) if f.endswith(".md")}
    assert all(f"<!-- bench:{n} -->" in docs for n in stems)
    assert {s.results for s in SUITES.values()} <= stems | {"qlora_gpu"}


def test_a_full_run_rewrites_only_its_own_block_and_keeps_the_words_around_it(tmp_path):
    from fedledger.bench_cli import regenerate_docs

    (tmp_path / "a.md").write_text("# A bench\n\n## part\n| x |\n|---|\n| 2 |\n")
    (tmp_path / "b.md").write_text("# B bench\nnew b\n")
    docs = ("# Results\nwords about a\n\n<!-- bench:a -->\nold a\n<!-- /bench:a -->\nmiddle words\n"
            "<!-- bench:b -->\nold b\n<!-- /bench:b -->\n<!-- bench:c -->\nold c\n<!-- /bench:c -->\n")
    only_a, missing = regenerate_docs(docs, str(tmp_path), {"a"})
    assert only_a == docs.replace("old a\n", "#### A bench\n\n##### part\n| x |\n|---|\n| 2 |\n") and not missing
    every, missing = regenerate_docs(docs, str(tmp_path))
    assert "new b" in every and "old b" not in every and "old c" in every and missing == ["c"]
    assert every.startswith("# Results\nwords about a\n") and "middle words" in every


def test_bench_with_neither_a_suite_nor_docs_is_one_line_and_exit_2():
    done = _cli()
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "fedledger: error: name a suite (or 'all'), or give --docs to rewrite docs/results.md from bench/results"]
