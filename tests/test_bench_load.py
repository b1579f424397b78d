"""``fedledger bench load``: registered, its sizes parsed, its process sampler measuring a real tree.

The bench itself (100 clients x 20 rounds through ``fedledger run``, about an hour here) is not run
by the tests; its smoke size is ``fedledger bench load --quick``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from fedledger.bench_cli import SUITES, bench_folder, command, resolve

sys.path.insert(0, bench_folder())
import bench_load  # noqa: E402


def test_load_is_a_suite_of_fedledger_bench_and_its_quick_run_writes_to_quick():
    (suite,) = resolve(["load"])
    assert suite is SUITES["load"] and suite.script == "bench_load.py" and not suite.gpu
    bench = bench_folder()
    cmd = command(suite, bench, quick=True, out=None)
    assert cmd[1:] == [os.path.join(bench, "bench_load.py"), "--quick", "--out", os.path.join(bench, "results", "quick")]
    assert command(suite, bench, quick=False, out=None)[2:] == []   # the full run: the script's own sizes


def test_quick_is_ten_clients_three_rounds_and_the_full_size_is_a_hundred_by_twenty():
    quick, full = bench_load.parse_args(["--quick"]), bench_load.parse_args([])
    assert (quick.clients, quick.rounds, quick.audit_records) == (10, 3, 1000)
    assert (full.clients, full.rounds, full.audit_records) == (100, 20, 10_000)
    mixed = bench_load.parse_args(["--quick", "--clients", "4", "--audit-records", "0"])
    assert (mixed.clients, mixed.rounds, mixed.audit_records) == (4, 3, 0)


@pytest.mark.parametrize("argv", [["--clients", "0"], ["--rounds", "-1"], ["--audit-records", "-5"]])
def test_a_size_below_one_is_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_load.parse_args(argv)
    assert exc.value.code == 2 and "must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("cmdline, part", [
    ("/venv/bin/python /venv/bin/flwr-simulation --runtime-api-address 127.0.0.1:35179 --token ab", "server"),
    ("ray::ClientAppActor.run", "clients"),
    ("ray::IDLE", "clients"),
    ("ray::DashboardAgent", "ray daemons"),
    ("/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --raylet_socket_name=/tmp/ray/x", "ray daemons"),
    ("/venv/bin/python /venv/bin/flower-superlink --insecure --simulation", "flwr cli + superlink"),
])
def test_each_process_of_a_simulation_is_counted_as_server_clients_or_the_rest(cmdline, part):
    assert bench_load.process_class(cmdline) == part


def test_the_sampler_sees_a_childs_memory_and_stops_what_is_left_by_pid():
    child = "x = bytearray(80 * 2**20); import time; time.sleep(60)"        # 80 MiB, touched
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time; "
                               f"subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(60)"])
    sampler = bench_load.TreeSampler(parent.pid, 0.2, time.perf_counter())
    try:
        sampler.start()
        deadline = time.time() + 60
        while time.time() < deadline and not any(rss > 80 * 2**20 for _, rss, _ in sampler.peak.values()):
            time.sleep(0.2)
        sampler.halt.set()
        sampler.join(timeout=10)
        assert len(sampler.seen) == 2 and max(rss for _, rss, _ in sampler.peak.values()) > 80 * 2**20
        tree = sampler.summary()["tree"]["peak-rss-mb-sum-at-one-sample"]
        assert tree > 80 and sampler.samples[-1]["t"] > 0
        killed = sampler.stop_leftovers()
        assert sorted(killed) == sorted(sampler.seen) and parent.wait(timeout=30) != 0
    finally:
        sampler.halt.set()
        sampler.stop_leftovers()
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=30)


def test_the_report_of_a_run_that_stopped_says_how_far_it_got_and_shows_its_last_lines(tmp_path):
    import json

    run = {"status": "unknown", "returncode": -9, "wall-s": 50.0, "log-tail": "fedledger: round 2/5 ...\n",
           "rounds": [{"round": 1, "end-s": 30.0, "wall-s": 20.0}, {"round": 2, "end-s": 45.0, "wall-s": 15.0}],
           "samples": [{"t": 1.0, "load": 3.0, "server": 2**20, "total": 2**21}],
           "memory": {"server": {"processes": 1, "peak-rss-mb-largest-process": 1.0,
                                 "peak-rss-mb-sum-at-one-sample": 1.0}, "tree": {"peak-rss-mb-sum-at-one-sample": 2.0}}}
    raw = {"machine": {"cpu": "x", "cpus": 2, "torch": "t", "torch-threads": 2, "commit": "c", "date": "d",
                       "memory-gb": 1}, "clients": 4, "rounds": 5, "local-steps": 1, "ray-actors": 2,
           "federation-config": "init-args-num-cpus=2", "sample-s": 1.0, "load": {"start": 3.0}, "run": run}
    path = tmp_path / "load.json"
    path.write_text(json.dumps(raw))
    bench_load.render(str(path), str(tmp_path))
    md = (tmp_path / "load.md").read_text()
    assert "did not complete (2 of 5 rounds done)" in md and "fedledger: round 2/5 ..." in md
    assert "audit of the run" not in md and (tmp_path / "load.png").stat().st_size > 0
