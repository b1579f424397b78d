"""`fedledger run` output: fedledger's log lines, quieter libraries, the line filter on real
`flwr run --stream` output, the flwr processes' environment, and validation before anything starts."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

import pytest

from fedledger import cli, logs
from fedledger.flwr_runner import LIBRARY_WARNINGS_FILTER, LineFilter, RunOutcome, flwr_env, keep_line, plain_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")


def _sample(name: str) -> list[str]:
    """Real `flwr run --stream` output captured from this app (see tests/data/README.md)."""
    with open(os.path.join(DATA, name), encoding="utf-8") as fh:
        return fh.readlines()


@pytest.fixture
def fedledger_logger():
    """The `fedledger` logger, restored after the test (other tests read it through caplog)."""
    logger = logging.getLogger(logs.LOGGER_NAME)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield logger
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


def _our_lines(capsys, logger, messages: list[str]) -> list[str]:
    """What configure()'s handler really prints for ``messages`` (INFO)."""
    logs.configure("INFO")
    capsys.readouterr()
    for m in messages:
        logger.info("%s", m)
    return capsys.readouterr().err.splitlines(keepends=True)


def _flower_line(level: int, message: str) -> str:
    """A line as Flower's own console handler formats it (colours included)."""
    from flwr.supercore.logger import ConsoleHandler

    record = logging.LogRecord("flwr", level, __file__, 0, message, None, None)
    return ConsoleHandler(colored=True).format(record) + "\n"


# ---------------------------------------------------------------------------- keep_line / LineFilter
def _shown(stream: list[str], mode: str = "default") -> list[str]:
    keep = LineFilter(mode)
    return [line for line in stream if keep(line)]


def test_default_mode_shows_only_fedledger_lines_of_a_completed_run(capsys, fedledger_logger):
    ours = _our_lines(capsys, fedledger_logger, ["run folder /tmp/x", "round 1/1  loss 6.9119  ppl 1004.14"])
    from_actor = [f"\x1b[36m(ClientAppActor pid=6408)\x1b[0m {line}" for line in ours]
    stream = _sample("flwr_stream_completed.log")
    stream[20:20] = ours
    stream[45:45] = from_actor
    assert _shown(stream, "default") == ours + from_actor


def test_default_and_quiet_hide_flower_info_cli_chatter_progress_bars_and_library_warnings():
    stream = _sample("flwr_stream_completed.log")
    assert any("INFO" in line for line in stream) and any("FutureWarning" in line for line in stream)
    assert _shown(stream, "default") == [] and _shown(stream, "quiet") == []


def test_a_failed_run_shows_every_error_record_whole():
    stream = _sample("flwr_stream_failed.log")
    text = [plain_text(line) for line in stream]
    for mode in ("default", "quiet"):
        shown = [plain_text(line) for line in _shown(stream, mode)]
        assert [t for t in shown if t.startswith("ERROR")] == [t for t in text if t.startswith("ERROR")]
        assert shown.count("Traceback (most recent call last):") == text.count("Traceback (most recent call last):")
        for needle in ("ValueError: No query function registered with name 'identity'",
                       "Exception ClientAppException occurred. Message: No query function registered",
                       "RuntimeError: fedledger: error: adapter is missing 16 tensors",
                       "An unhandled exception occurred when running the simulation."):
            assert any(t.startswith(needle) for t in shown), (mode, needle)


def test_a_failed_run_shows_fedledger_records_and_own_warnings_but_no_chatter():
    stream = _sample("flwr_stream_failed.log")
    shown = [plain_text(line) for line in _shown(stream)]
    ours = [plain_text(line) for line in stream if plain_text(line).startswith("fedledger:")]
    assert ours and [t for t in shown if t.startswith("fedledger:")] == ours
    assert any("/clients/model.py:253: UserWarning" in t for t in shown)  # raised by this app's own code
    for noise in ("INFO", "Generating partition_id_to_indices", "Failed to load CPU gemm_4bit_forward",
                  "site-packages/torch/jit/_script.py", "Successfully installed", "Starting local SuperLink"):
        assert not [t for t in shown if noise in t], noise


def test_flwr_cli_error_box_is_shown_whole():
    stream = _sample("flwr_cli_error.log")
    shown = "".join(_shown(stream, "quiet"))
    assert "Unable to launch `flower-superlink`" in shown and "'flower-superlink'" in shown
    assert "Starting local SuperLink" not in shown


def test_verbose_mode_keeps_every_streamed_line():
    stream = _sample("flwr_stream_completed.log") + _sample("flwr_stream_failed.log")
    assert _shown(stream, "verbose") == stream


def test_flower_warnings_and_errors_are_kept_but_known_harmless_ones_are_not():
    real = _flower_line(logging.WARNING, "Node 3 did not reply in time")
    harmless = _flower_line(logging.WARNING, "Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.")
    for mode in ("default", "quiet"):
        assert keep_line(real, mode) and keep_line(_flower_line(logging.ERROR, "ServerApp raised"), mode)
        assert not keep_line(harmless, mode) and not keep_line(_flower_line(logging.INFO, "[ROUND 1/3]"), mode)
    assert keep_line(harmless, "verbose")


def test_a_line_that_starts_no_record_follows_the_record_it_continues():
    assert keep_line("    raise ValueError(x)\n", "default", in_shown_record=True)
    assert not keep_line("    raise ValueError(x)\n", "default", in_shown_record=False)
    assert keep_line("ValueError: boom\n", "default", in_shown_record=False)  # an error line starts a shown record


def test_continuation_lines_belong_to_the_process_that_printed_them():
    stream = [_flower_line(logging.ERROR, "ServerApp raised"),
              "\x1b[36m(ClientAppActor pid=7)\x1b[0m   warnings.warn(\n",       # another process: not part of it
              "  File \"/x/server_app.py\", line 3, in main\n"]                  # the server's: part of it
    assert _shown(stream) == [stream[0], stream[2]]


@pytest.mark.parametrize("path, kept", [
    ("/work/main/.venv/lib/python3.11/site-packages/transformers/modeling_utils.py", False),
    ("/usr/lib/python3.11/importlib/__init__.py", False),
    ("/work/main/strategies/pagerank.py", True),
    ("/root/.flwr/apps/fedledger.fedledger.0.1.0.7725c3a1/fedledger/server_app.py", True),
    ("/work/main/.venv/lib/python3.11/site-packages/fedledger/task.py", True),
])
def test_python_warnings_show_only_when_raised_outside_installed_libraries(path, kept):
    line = f"\x1b[36m(ClientAppActor pid=1)\x1b[0m {path}:12: UserWarning: something to know\n"
    assert keep_line(line, "default") is kept


def test_unknown_output_mode_is_refused():
    with pytest.raises(ValueError, match="output mode 'loud' is not valid"):
        keep_line("x", "loud")


# ---------------------------------------------------------------------------- logs.configure
def test_configure_emits_info_lines_with_the_fedledger_prefix(capsys, fedledger_logger):
    logs.configure()
    fedledger_logger.info("round %s done", 2)
    logging.getLogger("fedledger.chain").debug("hidden at INFO")
    assert capsys.readouterr().err == "fedledger: round 2 done\n"


def test_configure_twice_adds_no_second_handler_and_does_not_propagate(capsys, fedledger_logger):
    logs.configure()
    logs.configure("DEBUG")
    ours = [h for h in fedledger_logger.handlers if isinstance(h, logging.StreamHandler)]
    assert len(ours) == 1 and fedledger_logger.propagate is False
    fedledger_logger.debug("once")
    assert capsys.readouterr().err == "fedledger: once\n"


def test_configure_reads_the_level_from_the_environment(capsys, fedledger_logger, monkeypatch):
    monkeypatch.setenv(logs.LEVEL_ENV, "warning")
    logs.configure()
    fedledger_logger.info("not shown")
    fedledger_logger.warning("shown")
    assert capsys.readouterr().err == "fedledger: shown\n"


def test_configure_refuses_an_unknown_level_naming_the_variable(fedledger_logger, monkeypatch):
    monkeypatch.setenv(logs.LEVEL_ENV, "LOUD")
    with pytest.raises(ValueError, match=r"'LOUD' is not valid.*\$FEDLEDGER_LOG_LEVEL"):
        logs.configure()


# ---------------------------------------------------------------------------- logs.quiet_libraries
def _shown_warnings(raise_them) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # start from "everything shows"
        logs.quiet_libraries()
        raise_them()
    return [str(w.message) for w in seen]


def _warn_from(module: str, message: str, category=DeprecationWarning) -> None:
    warnings.warn_explicit(message, category, filename=module.replace(".", "/") + ".py", lineno=1, module=module)


def test_quiet_libraries_hides_library_deprecations_but_not_fedledger_warnings(monkeypatch):
    monkeypatch.delenv(logs.LEVEL_ENV, raising=False)
    shown = _shown_warnings(lambda: (
        _warn_from("torch.jit._script", "torch deprecation"),
        _warn_from("transformers.modeling_utils", "transformers future", FutureWarning),
        _warn_from("peft.tuners.lora", "peft advice", UserWarning),
        _warn_from("fedledger.task", "our deprecation"),
        _warn_from("fedledger.chain.audit", "our user warning", UserWarning),
        _warn_from("torch.nn", "a library's real problem", RuntimeWarning),
    ))
    assert shown == ["our deprecation", "our user warning", "a library's real problem"]


def test_quiet_libraries_hides_nothing_when_debugging(monkeypatch):
    monkeypatch.setenv(logs.LEVEL_ENV, "DEBUG")
    assert _shown_warnings(lambda: _warn_from("torch.jit._script", "torch deprecation")) == ["torch deprecation"]


def test_quiet_libraries_filters_the_harmless_bitsandbytes_lines_only(monkeypatch):
    monkeypatch.setenv("TRANSFORMERS_NO_ADVISORY_WARNINGS", "x")
    monkeypatch.delenv("TRANSFORMERS_NO_ADVISORY_WARNINGS")  # restored (unset) after the test
    monkeypatch.delenv(logs.LEVEL_ENV, raising=False)
    logs.quiet_libraries()
    logs.quiet_libraries()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    for name, harmless in (("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from "
                            "kernels-community: No module named 'kernels'"),
                           ("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast from "
                            "torch.float32 to float16 during quantization")):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        try:
            logger.warning(harmless)
            logger.warning("an other warning")
            logger.error("CUDA kernel failed")
        finally:
            logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["an other warning", "CUDA kernel failed"] * 2
    assert os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] == "1"


# ---------------------------------------------------------------------------- logs.round_line
def test_round_line_formats_a_full_round_report():
    from fedledger.core.pipeline import RoundReport

    report = RoundReport(round=2, bytes_sent=14_812_000, bytes_received=14_790_000,
                         kept=[{"node-id": i} for i in range(4)], rejected=[{"node-id": 9, "reason": "NaN"}],
                         seconds={"decode": 0.4, "trust": 10.3, "aggregate": 50.5}).to_dict()
    line = logs.round_line(2, 3, report, {"eval-loss": 2.30224, "perplexity": 9.9962, "num-examples": 237})
    assert line == "round 2/3  loss 2.3022  ppl 10.00  clients 4 kept, 1 rejected, 0 distrusted  MB 14.8 down / 14.8 up  61.2 s"


def test_round_line_leaves_out_what_a_partial_report_lacks():
    assert logs.round_line(0, 3, {}, None) == "round 0/3"
    line = logs.round_line(1, 3, {"kept": [{}, {}], "bytes-received": 120_000, "wall-seconds": 3.04},
                           {"eval-loss": 6.9, "perplexity": float("nan")})
    assert line == "round 1/3  loss 6.9000  clients 2 kept  MB 0.12 up  3.0 s"
    assert "nan" not in line


# ---------------------------------------------------------------------------- flwr_env
def test_flwr_env_puts_the_interpreters_bin_folder_first_on_path(tmp_path, monkeypatch):
    bin_dir = os.path.dirname(sys.executable)
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", bin_dir, "/bin"]))
    path = flwr_env(str(tmp_path))["PATH"].split(os.pathsep)
    assert path == [bin_dir, "/usr/bin", "/bin"]


@pytest.mark.parametrize("mode, level", [("quiet", "WARNING"), ("default", "INFO"), ("verbose", "DEBUG")])
def test_flwr_env_sets_the_modes_log_level_and_warning_filter(tmp_path, monkeypatch, mode, level):
    monkeypatch.delenv(logs.LEVEL_ENV, raising=False)
    monkeypatch.setenv("PYTHONWARNINGS", "error::UserWarning")
    env = flwr_env(str(tmp_path), mode=mode)
    assert env[logs.LEVEL_ENV] == level
    expected = "error::UserWarning" if mode == "verbose" else f"{LIBRARY_WARNINGS_FILTER},error::UserWarning"
    assert env["PYTHONWARNINGS"] == expected  # the user's own filter stays last, so it wins


# ---------------------------------------------------------------------------- fedledger run: validation
@pytest.fixture
def no_flwr(monkeypatch, fedledger_logger):
    """Records the calls that would start flwr; a test that reaches it with bad input fails.
    (cli.main configures the fedledger logger and quiets libraries: both are undone after the test.)"""
    monkeypatch.setenv("TRANSFORMERS_NO_ADVISORY_WARNINGS", "x")
    monkeypatch.delenv("TRANSFORMERS_NO_ADVISORY_WARNINGS")
    calls = []

    def fake_run_simulation(app_dir, run_config, federation_config, **kw):
        calls.append({"run_config": run_config, "federation_config": federation_config, **kw})
        return RunOutcome(None, "not-started", "", 0)

    monkeypatch.setattr(cli, "run_simulation", fake_run_simulation)
    return calls


@pytest.mark.parametrize("argv, message", [
    (["--run-config", "num-round=2"], "unknown run-config key(s) num-round (did you mean num-rounds?)"),
    (["--run-config", "num-rounds=0"], "num-rounds"),
    (["--run-config", "attack='sign-flip' malicious='0,7'"], "malicious"),
    (["--num-supernodes", "3", "--federation-config", "num-supernodes=1", "--run-config",
      "attack='sign-flip' malicious='2'"], "with 1 nodes"),
])
def test_bad_settings_stop_the_run_before_flwr_starts(no_flwr, capsys, argv, message):
    assert cli.main(["run", "--app", ROOT, *argv]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("fedledger: error: ") and message in err[0]
    assert no_flwr == []


def test_a_bad_log_level_stops_the_run_before_flwr_starts(no_flwr, capsys, monkeypatch):
    monkeypatch.setenv(logs.LEVEL_ENV, "LOUD")
    assert cli.main(["run", "--app", ROOT]) == 2
    assert capsys.readouterr().err.startswith("fedledger: error: log level 'LOUD'")
    assert no_flwr == []


@pytest.mark.parametrize("flag, mode", [([], "default"), (["--quiet"], "quiet"), (["--verbose"], "verbose")])
def test_valid_settings_reach_flwr_with_the_chosen_output_mode(no_flwr, tmp_path, flag, mode):
    argv = ["run", "--app", ROOT, "--num-supernodes", "3", "--run-config", f"num-rounds=2 run-dir='{tmp_path}'", *flag]
    assert cli.main(argv) == 1  # the fake run did not start
    (call,) = no_flwr
    assert call["mode"] == mode and "num-supernodes=3" in call["federation_config"]
    assert "num-rounds=2" in call["run_config"] and f'run-dir="{tmp_path}"' in call["run_config"]


def test_resume_reaches_flwr_with_the_runs_own_settings_and_the_folder(no_flwr, tmp_path, capsys):
    from fedledger.config import Settings
    from fedledger.core.checkpoint import CHECKPOINT_FILE, atomic_pickle

    folder = tmp_path / "20260101-000000-run5"
    folder.mkdir()
    own = Settings.from_run_config({"strategy": "fedadam", "num-rounds": 4, "model": "tiny"}).to_run_config()
    atomic_pickle(str(folder / CHECKPOINT_FILE), {"format": 1, "round": 2, "extra": {"run-config": own}})
    assert cli.main(["run", "--app", ROOT, "--resume", str(folder), "--run-config", "num-rounds=6"]) == 1
    (call,) = no_flwr
    assert 'strategy="fedadam"' in call["run_config"] and "num-rounds=6" in call["run_config"]
    assert f'resume="{folder}"' in call["run_config"]
    assert f"resuming {folder} after round 2" in capsys.readouterr().out


def test_resume_of_a_folder_without_a_checkpoint_fails_in_one_line(no_flwr, tmp_path, capsys):
    assert cli.main(["run", "--app", ROOT, "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "no checkpoint at" in err[0] and no_flwr == []


def test_quiet_and_verbose_cannot_be_combined(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--quiet", "--verbose"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the real thing
@pytest.mark.slow
def test_venv_fedledger_runs_without_an_activated_venv(tmp_path):
    """`.venv/bin/fedledger run` with a PATH that lacks the venv's bin folder (the way a newcomer
    calls it): flwr must still find flower-superlink / flower-superexec."""
    exe = os.path.join(os.path.dirname(sys.executable), "fedledger")
    bin_dir = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", logs.LEVEL_ENV)}
    env["PATH"] = os.pathsep.join(p for p in ("/usr/local/bin", "/usr/bin", "/bin") if p != bin_dir)
    cmd = [exe, "run", "--app", ROOT, "--num-supernodes", "2", "--flwr-home", str(tmp_path / "flwr"),
           "--run-config", f"model='tiny' num-rounds=1 local-steps=1 run-dir='{tmp_path / 'runs'}'"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "status finished:completed" in out and "Unable to launch" not in out
    assert "INFO" not in out and "DeprecationWarning" not in out, out[-4000:]  # default mode: no chatter
    # ROUND LINE (needs the ServerApp to log logs.round_line after each round's central evaluation):
    assert "fedledger: round 1/1" in out, out[-4000:]


def test_a_run_whose_local_superlink_missed_its_start_window_is_tried_again(monkeypatch, capsys):
    from fedledger import flwr_runner

    box = ("╭─ Error ──────╮\n│ Failed to start local SuperLink within 15s. See logs at │\n"
           "│ /tmp/x/flwr/local-superlink/superlink.log.                │\n╰──────╯\n")
    outcomes = [RunOutcome(None, "not-started", box, 1), RunOutcome("7", "finished:completed", "ok", 0)]
    calls = []
    monkeypatch.setattr(flwr_runner, "_run_once", lambda *a, **k: calls.append(a) or outcomes[len(calls) - 1])
    assert flwr_runner.run_simulation(".", attempts=2).ok and len(calls) == 2
    assert "the run did not start (attempt 1/2)" in capsys.readouterr().err


def test_a_run_that_failed_with_an_error_of_its_own_is_not_tried_again(monkeypatch):
    from fedledger import flwr_runner

    calls = []
    bad = RunOutcome(None, "not-started", "╭─ Error ─╮\n│ Invalid run config: 'num-roundz' │\n", 1)
    monkeypatch.setattr(flwr_runner, "_run_once", lambda *a, **k: calls.append(a) or bad)
    assert flwr_runner.run_simulation(".", attempts=3) is bad and len(calls) == 1
