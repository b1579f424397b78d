"""``fedledger bench SUITE... [--quick] [--out DIR]``: the benchmarks in ``bench/``, by name.

Each suite is one script of the checkout's ``bench/`` folder, run as its own process (fixed
seeds, the same JSON + markdown + PNG outputs as running the script by hand). Without
``--quick`` the outputs go to ``bench/results/`` (the committed results); ``--quick`` runs the
suite's smoke sizes (what CI runs) into ``bench/results/quick/`` unless ``--out`` says otherwise,
so a smoke run never overwrites a real result. A bar shows the suites done and the time spent;
the scripts' own lines are printed above it. ``trust`` is robustness + serverless-trust +
trust-speed; ``all`` is every suite that runs on a CPU.

``docs/results.md`` ends in generated tables: one block per results file, between
``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``, holding ``bench/results/NAME.md`` with
its headings moved down three levels. A full run (no ``--quick``, no ``--out``) rewrites the
blocks of the suites it ran; ``fedledger bench --docs`` rewrites every block from the results
as they are (after running a bench script by hand). The text above the blocks (what the
numbers mean, verdicts) is written by people and is not touched.

Exit: 0 every suite finished, 1 a suite failed (named), 2 bad input (unknown suite, no bench/).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Suite:
    name: str
    script: str                 # file in bench/
    quick: tuple[str, ...]      # arguments of the smoke run
    full: tuple[str, ...] = ()  # arguments of the real run (the script's defaults when empty)
    about: str = ""
    gpu: bool = False           # the full run needs a CUDA GPU

    @property
    def results(self) -> str:
        """The stem of its files in bench/results (bench_trust_speed.py -> trust_speed)."""
        return self.script.removeprefix("bench_").removesuffix(".py")


SUITES = {s.name: s for s in (
    Suite("chain", "bench_chain.py", ("--quick",), about="gas and wall time per round, audit time, hashing (anvil)"),
    Suite("serverless", "bench_serverless.py", ("--nodes", "5", "--seeds", "0", "--rounds", "2"),
          about="server FedAvg vs ring vs gossip vs async gossip: latency, bytes, perplexity"),
    Suite("serverless-smollm2", "bench_serverless_smollm2.py",
          ("--model", "tiny", "--peers", "3", "--rounds", "1", "--local-steps", "1", "--eval-batches", "1",
           "--seeds", "42"), about="the serverless modes on SmolLM2-135M"),
    Suite("serverless-trust", "bench_serverless_trust.py", ("--quick",), about="peer-side PageRank trust in gossip"),
    Suite("robustness", "bench_robustness.py", ("--quick",), about="PageRank trust vs Flower's robust rules under attack"),
    Suite("trust-speed", "bench_trust_speed.py", ("--quick",), about="PageRank trust cost vs one GEMM"),
    Suite("quality", "bench_quality.py", ("--model", "tiny", "--clients", "2", "--rounds", "1", "--local-steps", "1",
                                          "--eval-batches", "1"),
          about="federated vs centralised vs local-only held-out perplexity (SmolLM2)"),
    Suite("aggregation", "bench_aggregation.py", ("--quick",),
          about="server FedAvg vs Flower's own vs the memory-bandwidth bound, configure_train, topology set-up"),
    Suite("hashing", "bench_hashing.py", ("--repeats", "3"), about="canonical hashing on the server's path vs raw sha256"),
    Suite("client-memory", "bench_client_memory.py", ("--rounds", "2", "--steps", "1", "--variants", "0"),
          about="client peak RSS per round (SmolLM2 LoRA training)"),
    Suite("rounds", "bench_rounds.py", ("--rounds", "1", "--steps", "1", "--clients", "2", "--variants", "sample"),
          about="round overhead over the slowest client's training (central evaluation variants)"),
    Suite("train-speed", "bench_train_speed.py", ("--rounds", "1", "--steps", "1", "--batch-size", "2"),
          about="client training tokens/s vs plain Hugging Face transformers + peft"),
    Suite("frameworks", "bench_frameworks.py", ("--quick",),
          about="FedLLM vs KD-FedLLM vs Split-FedLLM: accuracy, bytes, client compute and memory (SmolLM2)"),
    Suite("load", "bench_load.py", ("--quick",),
          about="100 clients x 20 rounds through `fedledger run` audited on anvil: wall, peak RSS, records, audit"),
    Suite("qlora-gpu", "bench_qlora_gpu.py", ("--model", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1"),
          ("--out", "bench/results/qlora_gpu"), about="LoRA/QLoRA throughput on a CUDA GPU", gpu=True),
)}
GROUPS = {"trust": ("robustness", "serverless-trust", "trust-speed"),
          "all": tuple(n for n, s in SUITES.items() if not s.gpu)}


class BenchError(Exception):
    """One line for the user; ``code`` 2 for bad input, 1 for a suite that failed."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def bench_folder(start: str | None = None) -> str:
    """The checkout's bench/ folder (beside the fedledger package, or under the current folder)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for root in (start, here, os.getcwd()):
        if root and os.path.exists(os.path.join(root, "bench", "common.py")):
            return os.path.join(root, "bench")
    raise BenchError("no bench/ folder here: the benchmarks live in the fedledger repository, not in the installed "
                     "package; run `fedledger bench` from a checkout of the repository")


def resolve(names: list[str]) -> list[Suite]:
    suites: list[Suite] = []
    for name in names:
        if name not in SUITES and name not in GROUPS:
            raise BenchError(f"unknown bench suite {name!r}; choose from {', '.join([*SUITES, *GROUPS])}")
        for n in GROUPS.get(name, (name,)):
            if SUITES[n] not in suites:
                suites.append(SUITES[n])
    return suites


def command(suite: Suite, bench: str, quick: bool, out: str | None) -> list[str]:
    args = list(suite.quick if quick else suite.full)
    if out is not None or quick:
        args = [a for i, a in enumerate(args) if a != "--out" and (i == 0 or args[i - 1] != "--out")]
        target = out or os.path.join(bench, "results", "quick")
        args += ["--out", os.path.join(target, "qlora_gpu") if suite.name == "qlora-gpu" else target]
    return [sys.executable, os.path.join(bench, suite.script), *args]


def run_suites(suites: list[Suite], quick: bool = False, out: str | None = None, bench: str | None = None,
               show_progress: bool = True) -> dict[str, float]:
    """Run the suites one after another; seconds per suite. Raises BenchError naming a failed suite."""
    bench = bench or bench_folder()
    root = os.path.dirname(bench)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "FLWR_TELEMETRY_ENABLED": "0"}
    seconds: dict[str, float] = {}
    with _Bar(len(suites), show_progress) as bar:
        for suite in suites:
            if suite.gpu and not quick and not _has_cuda():
                raise BenchError(f"bench {suite.name} measures a CUDA GPU and none is visible; run it with --quick "
                                 f"for a CPU smoke run, or on a GPU machine")
            bar.start(suite.name)
            started = time.perf_counter()
            done = subprocess.run(command(suite, bench, quick, out), cwd=root, env=env)
            seconds[suite.name] = time.perf_counter() - started
            if done.returncode != 0:
                raise BenchError(f"bench {suite.name} failed (exit {done.returncode}); its output is above", code=1)
            bar.advance()
    return seconds


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


class _Bar:
    """A rich progress bar over the suites (only on a terminal)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.progress, self.task = total, enabled, None, None

    def __enter__(self):
        if self.enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("bench {task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=Console(stderr=True), transient=True)
            self.progress.start()
            self.task = self.progress.add_task("", total=self.total)
        return self

    def start(self, name: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description=name)
        else:
            print(f"fedledger: bench {name} ...", file=sys.stderr, flush=True)

    def advance(self) -> None:
        if self.progress is not None:
            self.progress.advance(self.task)

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()


# ---------------------------------------------------------------------------- docs/results.md
_BLOCK = re.compile(r"(<!-- bench:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /bench:(?P=name) -->)", re.S)


def generated_block(results_md: str) -> str:
    """A results file as it sits in docs/results.md: its headings three levels down."""
    return re.sub(r"(?m)^(#{1,3}) ", lambda m: "#" * (len(m.group(1)) + 3) + " ", results_md.strip()) + "\n"


def regenerate_docs(docs: str, results: str, names: set[str] | None = None) -> tuple[str, list[str]]:
    """``docs`` with its generated blocks rewritten from the ``results`` folder (only ``names``
    when given); also the names of blocks whose results file is missing (left as they were)."""
    missing: list[str] = []

    def fill(m: re.Match) -> str:
        name = m.group("name")
        path = os.path.join(results, f"{name}.md")
        if (names is not None and name not in names) or not os.path.exists(path):
            if names is None or name in names:
                missing.append(name)
            return m.group(0)
        with open(path) as fh:
            return m.group(1) + generated_block(fh.read()) + m.group(4)

    return _BLOCK.sub(fill, docs), missing


def refresh_docs(bench: str, names: set[str] | None = None) -> str:
    """Rewrite docs/results.md's generated blocks (see the module docstring); its path."""
    path = os.path.join(os.path.dirname(bench), "docs", "results.md")
    if not os.path.exists(path):
        raise BenchError(f"{path} does not exist: run this in a checkout of the repository")
    with open(path) as fh:
        text, missing = regenerate_docs(fh.read(), os.path.join(bench, "results"), names)
    with open(path, "w") as fh:
        fh.write(text)
    if missing:
        print(f"fedledger: docs/results.md: no results yet for {', '.join(missing)} (blocks left as they were)",
              file=sys.stderr)
    return path


def cmd_bench(args) -> int:
    try:
        if not args.suites and not args.docs:
            raise BenchError("name a suite (or 'all'), or give --docs to rewrite docs/results.md from bench/results")
        suites = resolve(args.suites)
        seconds = run_suites(suites, quick=args.quick, out=args.out)
        full = not args.quick and args.out is None
        docs = (refresh_docs(bench_folder(), None if args.docs else {s.results for s in suites})
                if args.docs or (full and suites) else None)
    except BenchError as exc:
        print(f"fedledger: error: {exc}", file=sys.stderr)
        return exc.code
    if suites:
        out = args.out or os.path.join(bench_folder(), "results", *(("quick",) if args.quick else ()))
        print("fedledger: bench " + ", ".join(f"{n} {s:.0f} s" for n, s in seconds.items()) + f"; results in {out}")
    if docs:
        print(f"fedledger: rewrote the generated tables of {docs}")
    return 0


def add_bench_command(subparsers) -> None:
    listing = "\n".join(f"  {s.name:<20} {s.about}" for s in SUITES.values())
    b = subparsers.add_parser("bench", help="run benchmark suites of bench/ (JSON + markdown + PNG in bench/results)",
                              description=f"suites:\n{listing}\n  trust                robustness + serverless-trust + "
                                          f"trust-speed\n  all                  every CPU suite",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("suites", nargs="*", metavar="SUITE", help="suite name(s), 'trust' or 'all'")
    b.add_argument("--docs", action="store_true",
                   help="rewrite docs/results.md's generated tables from bench/results (all of them)")
    b.add_argument("--quick", action="store_true", help="smoke sizes (CI), results in bench/results/quick")
    b.add_argument("--out", default=None, help="results folder (default bench/results, or bench/results/quick)")
    b.set_defaults(func=cmd_bench)
