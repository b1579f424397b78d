"""Run-config → typed ``Settings``: one frozen group per concern, one clear error line for any bad value.

The defaults live in ``pyproject.toml`` ``[tool.flwr.app.config]``; users override them with
``flwr run . --run-config "key=value ..."`` (or ``fedledger run --run-config ...``).

Every field of a group names its run-config key and a help line in its ``metadata``.
``Settings.from_run_config`` turns each raw value (a TOML or CLI value) into the field's type,
each group checks its own fields in ``__post_init__``, ``Settings.__post_init__`` checks the
combinations across groups, and ``Settings.check_nodes`` the rules that need the node count.
Every problem is a ``ConfigError`` whose ``key`` is the run-config key and whose message is one
line: ``run-config lora-dropout=3 is not valid: must be in [0, 1)``.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import re
import tomllib
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from urllib.parse import urlparse

from fedledger.clients.attacks import ALL_ATTACKS, is_data_attack as _is_data_attack


class ConfigError(ValueError):
    """A run-config value that cannot be used; the message names the key and the fix."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


# ---------------------------------------------------------------------- allowed values
QUANTIZATIONS = ("none", "4bit", "8bit")
DATASETS = ("chatterbot", "fortunes")
PARTITIONERS = ("natural", "dirichlet", "iid")
HUB_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm", "fedmedian",
                  "fedtrimmedavg", "krum", "multikrum", "bulyan", "pagerank")
SERVERLESS_STRATEGIES = ("ring", "gossip", "async-gossip")
FRAMEWORK_STRATEGIES = ("kd", "split")  # KD-FedLLM and Split-FedLLM: their own round runners
STRATEGIES = HUB_STRATEGIES + SERVERLESS_STRATEGIES + FRAMEWORK_STRATEGIES
KD_VARIANTS = ("server", "client")
SPLIT_DTYPES = ("float32", "float16")
SPLITTABLE_MODEL_TYPES = ("llama",)  # decoder blocks fedledger can run apart (clients/split.py)
DEFAULT_PUBLIC_SIZE = 64
TRUST_MODES = ("none", "pagerank")
TRUST_ANCHORS = ("auto", "reference", "pretrusted", "history", "median", "none")  # = strategies.pagerank.ANCHORS
LEDGERS = ("none", "anvil", "eth-tester")
ATTACKS = ("none", *ALL_ATTACKS)
TOPOLOGIES = ("complete", "geometric")  # or a file
RING_ORDERS = ("tsp", "naive", "random")

_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_URL_SCHEMES = ("http", "https", "ws", "wss")


# ---------------------------------------------------------------------- checks
# A check takes a field's value and returns None when it is allowed, else what is allowed
# (the tail of the error line, starting with ": " or "; ").
Check = Callable[[object], "str | None"]


def one_of(options: Sequence[str]) -> Check:
    return lambda v: None if v in options else f"; choose one of: {', '.join(options)}"


def above(low: float) -> Check:
    return lambda v: None if v > low else f": must be > {low:g}"


def at_least(low: float) -> Check:
    return lambda v: None if v >= low else f": must be >= {low:g}"


def within(low: float, high: float, brackets: str = "[)") -> Check:
    """``low <= v < high`` for ``"[)"``; ``(`` and ``]`` make that end open or closed."""
    def check(v):
        ok_low = v >= low if brackets[0] == "[" else v > low
        ok_high = v <= high if brackets[1] == "]" else v < high
        return None if ok_low and ok_high else f": must be in {brackets[0]}{low:g}, {high:g}{brackets[1]}"
    return check


def module_names(v) -> str | None:
    ok = len(v) > 0 and all(all(part.isidentifier() for part in name.split(".")) for name in v)
    return None if ok else ': must be a non-empty comma list of module names, e.g. "q_proj,v_proj"'


def partition_ids(v) -> str | None:
    ok = all(i >= 0 for i in v) and len(set(v)) == len(v)
    return None if ok else ': must be comma-separated partition ids (whole numbers >= 0, each once), e.g. "0,3"'


def address_or_empty(v) -> str | None:
    return None if v == "" or _ADDRESS.fullmatch(v) else ': must be "" (deploy a new registry) or a 0x + 40 hex digit address'


def enrolment(v) -> str | None:
    ok = v in ("simulation", "none") or (bool(v.strip()) and all(_ADDRESS.fullmatch(a.strip())
                                                                 for a in v.split(",") if a.strip()))
    return None if ok else ': must be "simulation", "none" or a comma-separated list of 0x addresses'


def node_url(v) -> str | None:
    url = urlparse(v)
    ok = url.scheme in _URL_SCHEMES and bool(url.netloc)
    return None if ok else ": must be an http(s):// or ws(s):// URL, e.g. http://127.0.0.1:8545"


def non_empty(v) -> str | None:
    return None if v.strip() else ": must not be empty"


# ---------------------------------------------------------------------- raw value -> field type
@dataclass(frozen=True)
class _Kind:
    """How a field type is read from a raw run-config value, and what it accepts once built."""

    parse: Callable[[object], object]  # raises ValueError/TypeError for a value it cannot read
    accepts: Callable[[object], bool]
    text: str


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_int(raw) -> int:
    if _is_int(raw):
        return raw
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, str):
        return int(raw.strip())
    raise TypeError


def _parse_float(raw) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise TypeError
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError
    return value


def _parse_bool(raw) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in ("true", "false"):
        return raw.strip().lower() == "true"
    raise ValueError


def _parse_str(raw) -> str:
    if not isinstance(raw, str):
        raise TypeError
    return raw


def _items(raw) -> list:
    if isinstance(raw, str):
        return [x.strip() for x in raw.split(",") if x.strip()]
    if isinstance(raw, (list, tuple)):
        return list(raw)
    raise TypeError


def _parse_ints(raw) -> tuple[int, ...]:
    return (raw,) if _is_int(raw) else tuple(_parse_int(x) for x in _items(raw))


def _parse_names(raw) -> tuple[str, ...]:
    return tuple(_parse_str(x).strip() for x in _items(raw))


def _parse_address(raw) -> str:
    """``registry-address=0x5FbD...`` unquoted is a TOML hex integer: read it back as the address."""
    return f"0x{raw:040x}" if _is_int(raw) and raw >= 0 else _parse_str(raw)


_KINDS: dict[object, _Kind] = {
    int: _Kind(_parse_int, _is_int, ": must be a whole number"),
    float: _Kind(_parse_float, lambda v: (_is_int(v) or isinstance(v, float)) and math.isfinite(v),
                 ": must be a finite number"),
    bool: _Kind(_parse_bool, lambda v: isinstance(v, bool), ": must be true or false"),
    str: _Kind(_parse_str, lambda v: isinstance(v, str), ": must be a string"),
    tuple[int, ...]: _Kind(_parse_ints, lambda v: isinstance(v, tuple) and all(map(_is_int, v)),
                           ': must be comma-separated whole numbers, e.g. "0,3"'),
    tuple[str, ...]: _Kind(_parse_names, lambda v: isinstance(v, tuple) and all(isinstance(x, str) for x in v),
                           ': must be a comma-separated list, e.g. "q_proj,v_proj"'),
}


def _as_raw(value):
    """A field value as it is written in the run-config (tuples as comma strings)."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else value


def _shown(value) -> str:
    """A value as an error line shows it: ``'0,3'``, ``'signflip'``, ``3`` (not ``3.0``)."""
    value = _as_raw(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    return repr(value)


def _invalid(key: str, value, allowed: str) -> ConfigError:
    return ConfigError(f"run-config {key}={_shown(value)} is not valid{allowed}", key)


# ---------------------------------------------------------------------- groups
def setting(key: str, default, help: str, *checks: Check, parse: Callable | None = None):
    """A group field: its run-config ``key``, default, ``help`` line, checks and (rarely) own parser."""
    return field(default=default, metadata={"key": key, "help": help, "checks": checks, "parse": parse})


class _Group:
    """What every settings group shares: run-config keys in, checked in ``__post_init__``, keys out."""

    def __post_init__(self):
        hints = _hints(type(self))
        for f in fields(self):
            key, value = f.metadata["key"], getattr(self, f.name)
            kind = _KINDS[hints[f.name]]
            if not kind.accepts(value):
                raise _invalid(key, value, kind.text)
            for check in f.metadata["checks"]:
                allowed = check(value)
                if allowed is not None:
                    raise _invalid(key, value, allowed)

    @classmethod
    def from_run_config(cls, run_config: Mapping):
        hints, values = _hints(cls), {}
        for f in fields(cls):
            key = f.metadata["key"]
            if key in run_config:
                values[f.name] = _coerce(key, run_config[key], f.metadata["parse"] or _KINDS[hints[f.name]].parse,
                                         _KINDS[hints[f.name]].text)
        return cls(**values)

    def to_run_config(self) -> dict:
        return {f.metadata["key"]: _as_raw(getattr(self, f.name)) for f in fields(self)}


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _coerce(key: str, raw, parse: Callable, text: str):
    try:
        return parse(raw)
    except (TypeError, ValueError, OverflowError):
        raise _invalid(key, raw, text) from None


@dataclass(frozen=True)
class ModelSettings(_Group):
    """The base model and its LoRA adapter."""

    name: str = setting("model", "smollm2", '"smollm2", "tiny" (tests), a local HF model folder or a hub id', non_empty)
    cache: str = setting("model-cache", "", 'where converted models are kept; "" = ~/.cache/fedledger')
    quantization: str = setting("quantization", "none", "QLoRA base weights via bitsandbytes", one_of(QUANTIZATIONS))
    lora_r: int = setting("lora-r", 8, "LoRA rank", above(0))
    lora_alpha: float = setting("lora-alpha", 16.0, "LoRA scaling numerator (scale = alpha / r)", above(0))
    lora_dropout: float = setting("lora-dropout", 0.05, "dropout on the LoRA input", within(0, 1, "[)"))
    lora_targets: tuple[str, ...] = setting("lora-targets", ("q_proj", "k_proj", "v_proj", "o_proj"),
                                            "comma-separated module names that get an adapter", module_names)
    activation_checkpointing: int = setting("activation-checkpointing", 0, "recompute every n-th decoder layer's "
                                            "activations in the backward pass instead of keeping them (memory for "
                                            "compute); 0 = off, 1 = every layer", at_least(0))

    def cache_dir(self) -> str | None:
        return os.path.expanduser(self.cache) if self.cache else None


@dataclass(frozen=True)
class DataSettings(_Group):
    """The corpus and how it is split across nodes."""

    dataset: str = setting("dataset", "chatterbot", "corpus shipped in a package", one_of(DATASETS))
    partitioner: str = setting("partitioner", "natural", "natural = one category group per node", one_of(PARTITIONERS))
    dirichlet_alpha: float = setting("dirichlet-alpha", 0.5, "Dirichlet concentration (partitioner=dirichlet)", above(0))
    heldout_fraction: float = setting("heldout-fraction", 0.1, "share of the corpus held out for evaluation",
                                      within(0, 1, "()"))
    max_length: int = setting("max-length", 128, "tokens per example", at_least(1))
    task_train_size: int = setting("task-train-size", 0, "generated tasks (clients/tasks.py) added to the clients' "
                                   "private data, partitioned like the corpus", at_least(0))
    task_eval_size: int = setting("task-eval-size", 24, "held-out generated tasks scored by exact match each round; "
                                  "0 = none", at_least(0))


@dataclass(frozen=True)
class TrainSettings(_Group):
    """Local training on each node."""

    batch_size: int = setting("batch-size", 8, "examples per local step", at_least(1))
    local_steps: int = setting("local-steps", 4, "AdamW steps per round on each node", at_least(1))
    learning_rate: float = setting("learning-rate", 5e-4, "local AdamW learning rate", above(0))
    eval_batches: int = setting("eval-batches", 8, "batches of each evaluation", at_least(1))


@dataclass(frozen=True)
class EvalSettings(_Group):
    """The server's central evaluation of the global adapter on the held-out split."""

    sample: int = setting("eval-sample", 64, "held-out examples the server evaluates after each round (one fixed, "
                          "seeded sample); the whole split is evaluated after the last round; 0 = the whole split "
                          "every round", at_least(0))
    overlap: bool = setting("eval-overlap", False, "evaluate each round in the background, beside the next round's "
                            "training (the server is idle then); the last round is always waited for")


@dataclass(frozen=True)
class StrategySettings(_Group):
    """The aggregation rule (hub strategies) or the serverless exchange."""

    name: str = setting("strategy", "fedavg", "aggregation rule or serverless exchange", one_of(STRATEGIES))
    num_rounds: int = setting("num-rounds", 3, "federated rounds", at_least(1))
    fraction_train: float = setting("fraction-train", 1.0, "share of nodes sampled to train each round",
                                    within(0, 1, "(]"))
    fraction_evaluate: float = setting("fraction-evaluate", 0.0, "share of nodes sampled to evaluate each round",
                                       within(0, 1, "[]"))
    min_train_nodes: int = setting("min-train-nodes", 1, "hub strategies: fewest nodes a round samples to train; "
                                   "serverless: fewest live peers a round may end with (fewer stops the run)",
                                   at_least(1))
    min_available_nodes: int = setting("min-available-nodes", 0, "nodes that must be connected before a round "
                                       "starts (Flower and the serverless relays wait for them); 0 = every node of "
                                       "the run's start (a dropout then stalls the round: set fewer to go on "
                                       "without it)", at_least(0))
    num_malicious: int = setting("num-malicious", -1, "f for Krum/MultiKrum/Bulyan; -1 = the number of malicious ids",
                                 at_least(-1))
    proximal_mu: float = setting("proximal-mu", 0.01, "FedProx proximal term", at_least(0))
    server_lr: float = setting("server-lr", 0.01, "FedAdam/FedYogi/FedAdagrad server learning rate (eta)", above(0))
    server_momentum: float = setting("server-momentum", 0.9, "FedAvgM server momentum", within(0, 1, "[)"))
    trim_beta: float = setting("trim-beta", 0.2, "FedTrimmedAvg: share trimmed at each end", within(0, 0.5, "[)"))
    max_num_examples: int = setting("max-num-examples", 0,
                                    "largest num-examples a train reply may claim; 0 = the training-set size",
                                    at_least(0))

    def f(self, malicious: Sequence[int]) -> int:
        """The number of Byzantine nodes Krum/MultiKrum/Bulyan assume (-1: the malicious ids)."""
        return self.num_malicious if self.num_malicious >= 0 else len(malicious)


@dataclass(frozen=True)
class TrustSettings(_Group):
    """PageRank trust (``trust="pagerank"`` or ``strategy="pagerank"``; see strategies/pagerank.py)."""

    mode: str = setting("trust", "none", "pagerank = score updates and drop the distrusted ones", one_of(TRUST_MODES))
    threshold: float = setting("trust-threshold", 0.5, "exclude nodes whose trust (client mean = 1) is below this",
                               at_least(0))
    damping: float = setting("trust-damping", 0.85, "PageRank damping factor", within(0, 1, "()"))
    norm_tol: float = setting("trust-norm-tol", 3.0, "norm ratio to the median (or reference) allowed before trust drops",
                              at_least(1))
    history_weight: float = setting("trust-history-weight", 0.3, "weight of earlier rounds' trust",
                                    within(0, 1, "[)"))
    anchor: str = setting("trust-anchor", "auto", "where PageRank teleports to", one_of(TRUST_ANCHORS))
    clip: bool = setting("trust-clip", True, "clip each update to the reference norm before weighting")
    pretrusted: tuple[int, ...] = setting("trust-pretrusted", (), "comma-separated partition ids trusted a priori",
                                          partition_ids)


@dataclass(frozen=True)
class TopologySettings(_Group):
    """The simulated network (serverless exchanges and the hub's network accounting)."""

    topology: str = setting("topology", "complete", '"complete", "geometric" or a JSON/edge-list file', non_empty)
    gossip_k: int = setting("gossip-k", 2, "peers each gossip node sends to per step", at_least(1))
    gossip_steps: int = setting("gossip-steps", 1, "gossip mixing steps per round", at_least(1))
    ring_order: str = setting("ring-order", "tsp", "order of the ring all-reduce", one_of(RING_ORDERS))
    link_latency: float = setting("link-latency", 0.02, "seconds per link", at_least(0))
    link_bandwidth: float = setting("link-bandwidth", 12500000.0, "bytes/s per link", above(0))
    speed_heterogeneity: float = setting("speed-heterogeneity", 0.0, "log-normal sd of peer compute speeds",
                                         at_least(0))
    step_seconds: float = setting("step-seconds", 1.0, "simulated seconds of one local step at speed 1", above(0))
    staleness_exponent: float = setting("staleness-exponent", 0.5, "async-gossip: weight of a stale model decays as "
                                        "(1 + staleness) ** -exponent", at_least(0))


@dataclass(frozen=True)
class KDSettings(_Group):
    """KD-FedLLM (``strategy="kd"``): clients share top-k logits on a public set, never parameters."""

    variant: str = setting("kd-variant", "server", "who distils the aggregated soft labels: server (into the global "
                           "adapter, then broadcast) or client (each into its own adapter)", one_of(KD_VARIANTS))
    top_k: int = setting("kd-top-k", 8, "logits per position a client sends (up to the vocabulary size)", at_least(1))
    temperature: float = setting("kd-temperature", 2.0, "softmax temperature of the soft labels", above(0))
    public_size: int = setting("kd-public-size", -1, f"records set aside as the public set before partitioning (in "
                               f"every mode); -1 = {DEFAULT_PUBLIC_SIZE} with strategy='kd', none otherwise",
                               at_least(-1))
    public_file: str = setting("kd-public", "", '"" = the public split; else a JSON / JSON-lines file of '
                               '{"prompt", "response"} records (must not overlap the held-out split)')
    public_batch: int = setting("kd-public-batch", 32, "public examples the server names each round", at_least(1))
    distil_steps: int = setting("kd-distil-steps", 4, "distillation steps per round (on the server or each client)",
                                at_least(1))


@dataclass(frozen=True)
class SplitSettings(_Group):
    """Split-FedLLM (``strategy="split"``): clients run the embeddings and the first blocks only."""

    layer: int = setting("split-layer", 2, "cut after this decoder block: clients run blocks 1..k, the server "
                         "the rest and the LM head (1..num_layers-1, checked against the model)")
    dtype: str = setting("split-dtype", "float32", "activations and their gradients on the wire", one_of(SPLIT_DTYPES))


@dataclass(frozen=True)
class AuditSettings(_Group):
    """The Ethereum audit ledger."""

    ledger: str = setting("audit", "none", "record every round on a chain", one_of(LEDGERS))
    rpc_url: str = setting("rpc-url", "http://127.0.0.1:8545", "the node's JSON-RPC endpoint (audit=anvil)", node_url)
    registry_address: str = setting("registry-address", "", '"" = deploy a new registry for this run',
                                    address_or_empty, parse=_parse_address)
    chain_id: int = setting("chain-id", 0, "expected chain id; 0 = whatever the node reports (recorded)", at_least(0))
    aggregator_key_file: str = setting("aggregator-key-file", "", 'the server\'s signing key; "" = '
                                       "$FEDLEDGER_AGGREGATOR_KEY, else the node's first unlocked account (devnets)")
    admin_key_file: str = setting("admin-key-file", "", 'the registry admin\'s key (enrols clients); "" = '
                                  "$FEDLEDGER_ADMIN_KEY, else the node's second unlocked account (devnets)")
    enrol: str = setting("enrol", "simulation", 'who the admin enrols at run start: "simulation", "none" or 0x '
                         "addresses", enrolment)
    ledger_wait: float = setting("ledger-wait", 120.0, "seconds the run waits for a chain node that does not answer "
                                 "(visible back-off), then stops in one line", at_least(0))


@dataclass(frozen=True)
class AttackSettings(_Group):
    """Simulated attackers (also the detection ground truth)."""

    name: str = setting("attack", "none", "what the malicious nodes do", one_of(ATTACKS))
    malicious: tuple[int, ...] = setting("malicious", (), "comma-separated partition ids that run the attack",
                                         partition_ids)


@dataclass(frozen=True)
class RunSettings(_Group):
    """Where results go and the run's seed."""

    run_dir: str = setting("run-dir", "runs", "folder for each run's results", non_empty)
    seed: int = setting("seed", 42, "seed of model init, data splits and training")
    resume: str = setting("resume", "", 'a run folder to continue after its last completed round (its checkpoint); '
                          '"" = a new run')


# ---------------------------------------------------------------------- the whole run
@dataclass(frozen=True)
class Settings:
    """Every run-config key, typed and checked, grouped by concern."""

    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    strategy: StrategySettings = field(default_factory=StrategySettings)
    trust: TrustSettings = field(default_factory=TrustSettings)
    topology: TopologySettings = field(default_factory=TopologySettings)
    kd: KDSettings = field(default_factory=KDSettings)
    split: SplitSettings = field(default_factory=SplitSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    attack: AttackSettings = field(default_factory=AttackSettings)
    run: RunSettings = field(default_factory=RunSettings)

    def __post_init__(self):
        for f in fields(self):
            if not isinstance(getattr(self, f.name), _hints(Settings)[f.name]):
                raise TypeError(f"Settings.{f.name} must be a {_hints(Settings)[f.name].__name__}")
        self._check_attack()
        self._check_audit()
        self._check_trust()
        self._check_frameworks()
        self._check_resume()

    # ------------------------------------------------------------------ combinations
    def _check_attack(self) -> None:
        a = self.attack
        if a.malicious and a.name == "none":
            raise ConfigError(f"run-config malicious={_shown(a.malicious)} is set but attack='none'; set attack "
                              f"to one of: {', '.join(ALL_ATTACKS)} (or leave malicious empty)", "malicious")
        if a.name != "none" and not a.malicious:
            raise ConfigError(f"run-config attack={a.name!r} is set but malicious is empty; list the attacking "
                              'partition ids, e.g. malicious="0,3" (or set attack=\'none\')', "attack")

    def _check_audit(self) -> None:
        if self.audit.ledger != "none" and self.serverless:
            raise ConfigError(f"run-config audit={self.audit.ledger!r}: audit is not available with "
                              f"strategy={self.strategy.name!r}: the relay has no aggregate to record; use a hub "
                              "strategy (fedavg, krum, ...) or audit='none'", "audit")

    def _check_resume(self) -> None:
        if self.run.resume and self.strategy.name in FRAMEWORK_STRATEGIES:
            raise ConfigError(f"run-config resume={self.run.resume!r}: strategy={self.strategy.name!r} cannot resume "
                              "(its runner keeps no checkpoint: the next global / server part and the public-batch "
                              "schedule are not saved); start the run again, or use a hub strategy", "resume")
        if self.run.resume and self.serverless:
            raise ConfigError(f"run-config resume={self.run.resume!r}: strategy={self.strategy.name!r} cannot resume "
                              "(the peers' models live in their own node state, lost with a simulation); start the "
                              "run again, or use a hub strategy", "resume")

    def _check_trust(self) -> None:
        t = self.trust
        if t.mode == "pagerank" and self.strategy.name == "ring":
            raise ConfigError("run-config trust='pagerank' has no effect with strategy='ring': ring peers only see "
                              "partial sums; use strategy=gossip or async-gossip for peer-side trust, or trust='none'",
                              "trust")
        if t.pretrusted and not self.uses_pagerank:
            raise ConfigError(f"run-config trust-pretrusted={_shown(t.pretrusted)} has no effect with trust='none'; "
                              "set trust='pagerank' (or strategy='pagerank') or leave trust-pretrusted empty",
                              "trust-pretrusted")

    def _check_frameworks(self) -> None:
        name = self.strategy.name
        if name not in FRAMEWORK_STRATEGIES:
            return
        if self.strategy.fraction_train != 1.0:
            raise ConfigError(f"run-config fraction-train={_shown(self.strategy.fraction_train)} has no effect with "
                              f"strategy={name!r}: every node takes part in every round; set fraction-train=1",
                              "fraction-train")
        a = self.attack
        if a.name != "none" and not _is_data_attack(a.name):
            raise ConfigError(f"run-config attack={a.name!r} changes an adapter update; with strategy={name!r} use a "
                              "data attack (label-shuffle, label-corrupt, data-poison) or attack='none'", "attack")
        if name == "kd" and self.kd.variant == "client" and self.audit.ledger != "none":
            raise ConfigError(f"run-config audit={self.audit.ledger!r} is not available with kd-variant='client': there "
                              "is no global model for the clients to sign and check on chain (each keeps its own "
                              "adapter); use kd-variant='server' for an audited KD run, or audit='none'", "audit")
        if self.eval.overlap:
            raise ConfigError(f"run-config eval-overlap=true is not available with strategy={name!r}: the server's "
                              "model also serves the runner between rounds (distillation, the split server part); "
                              "set eval-overlap=false", "eval-overlap")
        if name == "split" and self.trust.mode == "pagerank":
            raise ConfigError("run-config trust='pagerank' is not available with strategy='split' (the server part "
                              "is shared); use strategy='kd' or a hub strategy for trust, or trust='none'", "trust")
        if self.kd.public_file and self.kd.public_size > 0:
            raise ConfigError(f"run-config kd-public-size={self.kd.public_size} and kd-public={self.kd.public_file!r} "
                              "both name a public set; set one (kd-public-size=-1 with a file)", "kd-public-size")
        if name == "kd" and not self.kd.public_file and self.kd.public_size == 0:
            raise ConfigError("run-config kd-public-size=0 leaves strategy='kd' without a public set; set "
                              f"kd-public-size={DEFAULT_PUBLIC_SIZE} (or kd-public=FILE)", "kd-public-size")

    def check_model(self, facts: Mapping | None) -> None:
        """The rules that need the model's config (``clients.model.model_facts``: type, decoder
        blocks, vocabulary), checked before its weights load; None: not knowable here."""
        if facts is None:
            return
        layers, vocab, kind = int(facts["num-layers"]), int(facts["vocab-size"]), str(facts["model-type"])
        if self.strategy.name == "split":
            q = self.model.quantization
            if kind not in SPLITTABLE_MODEL_TYPES:
                what = f"a {q} quantised {kind!r} model" if q != "none" else f"a {kind!r} model"
                raise _invalid("split-layer", self.split.layer, f": strategy='split' cannot place the cut in {what} "
                               f"(decoder blocks fedledger can run apart: {', '.join(SPLITTABLE_MODEL_TYPES)} "
                               f"models); use another model or quantization='none' with a llama model")
            if not 1 <= self.split.layer <= layers - 1:
                raise _invalid("split-layer", self.split.layer, f": must be in 1..{layers - 1} (the model has "
                               f"{layers} decoder blocks)")
        if self.strategy.name == "kd" and self.kd.top_k > vocab:
            raise _invalid("kd-top-k", self.kd.top_k, f": must be in 1..{vocab} (the vocabulary size)")

    @property
    def public_size(self) -> int:
        """Records set aside as the public set (``kd-public-size``, -1 resolved)."""
        if self.kd.public_file:
            return 0
        if self.kd.public_size >= 0:
            return self.kd.public_size
        return DEFAULT_PUBLIC_SIZE if self.strategy.name == "kd" else 0

    # ------------------------------------------------------------------ building
    @classmethod
    def from_run_config(cls, run_config: Mapping, *, strict: bool = True, check_files: bool = True) -> Settings:
        """Typed settings from a run-config (missing keys take the defaults of pyproject.toml).

        ``strict``: an unknown key is an error naming the closest valid key. ``check_files``: the
        files the run-config names (``topology``, ``aggregator-key-file``) must exist here; only
        the server reads them, so nodes build with ``check_files=False`` (see ``cached``).
        """
        if strict:
            _reject_unknown(run_config, cls.keys())
        groups = {f.name: _hints(cls)[f.name].from_run_config(run_config) for f in fields(cls)}
        settings = cls(**groups)
        if check_files:
            settings.check_files()
        return settings

    @classmethod
    def cached(cls, run_config: Mapping, *, check_files: bool = False) -> Settings:
        """``from_run_config`` built once per distinct run-config in this process (the ClientApp's
        path, called for every message). Files are not checked by default: they are the server's."""
        try:
            key = frozenset((k, type(v), v) for k, v in run_config.items())
        except TypeError:  # an unhashable value (e.g. a list): build it every time
            return cls.from_run_config(run_config, check_files=check_files)
        return _build_cached(cls, key, check_files)

    @classmethod
    def keys(cls) -> dict[str, tuple[str, str]]:
        """Run-config key -> (group, field), e.g. ``"lora-r" -> ("model", "lora_r")``."""
        return {g.metadata["key"]: (group.name, g.name)
                for group in fields(cls) for g in fields(_hints(cls)[group.name])}

    def to_run_config(self) -> dict:
        """The flat run-config (pyproject key -> value); ``from_run_config`` reads it back equal."""
        out = {}
        for f in fields(self):
            out.update(getattr(self, f.name).to_run_config())
        return out

    # ------------------------------------------------------------------ questions
    @property
    def serverless(self) -> bool:
        """A relay-only exchange (ring, gossip, async-gossip): no server-side aggregate."""
        return self.strategy.name in SERVERLESS_STRATEGIES

    @property
    def framework(self) -> str:
        """Which of the three ways to fine-tune across clients the run uses (as the audit names it)."""
        return {"kd": "kd-fedllm", "split": "split-fedllm"}.get(self.strategy.name, "fedllm")

    @property
    def uses_pagerank(self) -> bool:
        """PageRank trust runs (``trust="pagerank"`` or ``strategy="pagerank"``)."""
        return self.trust.mode == "pagerank" or self.strategy.name == "pagerank"

    def model_key(self) -> tuple:
        """What identifies a loaded base model + LoRA layout (for per-process caches)."""
        return (self.model, self.run.seed)

    def check_files(self) -> None:
        """The files the run-config names exist on this machine (the server's run-time check)."""
        public = self.kd.public_file
        if public and not os.path.isfile(os.path.expanduser(public)):
            raise _invalid("kd-public", public, ': must be "" (the public split) or an existing JSON / JSON-lines file')
        topo = self.topology.topology
        if topo not in TOPOLOGIES and not os.path.isfile(os.path.expanduser(topo)):
            raise _invalid("topology", topo, ": must be 'complete', 'geometric' or an existing JSON/edge-list file")
        for key, key_file in (("aggregator-key-file", self.audit.aggregator_key_file),
                              ("admin-key-file", self.audit.admin_key_file)):
            if key_file and not os.path.isfile(os.path.expanduser(key_file)):
                raise _invalid(key, key_file, ': must be "" or an existing key file')

    def check_nodes(self, num_nodes: int) -> None:
        """The rules that need the number of nodes (the ServerApp calls this once it knows it)."""
        if num_nodes < 1:
            raise ConfigError(f"a run needs at least one node, got {num_nodes}; start SuperNodes "
                              "(or --num-supernodes N)", None)
        for key, ids in (("malicious", self.attack.malicious), ("trust-pretrusted", self.trust.pretrusted)):
            if ids and max(ids) >= num_nodes:
                raise _invalid(key, ids, f" with {num_nodes} nodes: partition ids are 0..{num_nodes - 1}")
        # Bulyan aggregates nothing below 4f + 3 replies (Flower skips the round): refuse the run.
        # Krum / MultiKrum still aggregate with fewer nodes (Flower takes max(1, n - f - 2)
        # neighbours), only without their n > 2f + 2 guarantee, so they are allowed.
        name, f = self.strategy.name, self.strategy.f(self.attack.malicious)
        need = 4 * f + 3 if name == "bulyan" else 1
        if num_nodes < need:
            source = "the number of malicious ids" if self.strategy.num_malicious < 0 else "num-malicious"
            raise ConfigError(f"run-config strategy={name!r} with f={f} ({source}) "
                              f"needs at least {need} nodes (n >= 4f + 3), got {num_nodes}; add nodes or lower "
                              "num-malicious", "num-malicious")


@functools.lru_cache(maxsize=32)
def _build_cached(cls, key: frozenset, check_files: bool) -> Settings:
    return cls.from_run_config({k: v for k, _, v in key}, check_files=check_files)


def _reject_unknown(run_config: Mapping, known: Mapping) -> None:
    for key in run_config:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "the keys are those of [tool.flwr.app.config]"
            raise ConfigError(f"run-config key {key!r} is not known; {hint} (see pyproject.toml)", str(key))


# ---------------------------------------------------------------------- pyproject and CLI strings
def pyproject_defaults(app_dir: str = ".") -> dict:
    """The ``[tool.flwr.app.config]`` table of an app folder's pyproject.toml."""
    path = os.path.join(app_dir, "pyproject.toml")
    with open(path, "rb") as fh:
        return tomllib.load(fh).get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})


def parse_run_config_string(text: str) -> dict:
    """Parse ``"k=v k2=v2"`` as flwr does (each value a TOML value; bare words are strings)."""
    out = {}
    for item in _split_items(text):
        if "=" not in item:
            raise ConfigError(f"run-config item {item!r} has no '='; write key=value")
        key, value = item.split("=", 1)
        key = key.strip()
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            if value and all(c.isalnum() or c in "-_./:~," for c in value):
                out[key] = value
            else:
                raise ConfigError(f"run-config {key}={value} cannot be parsed; quote strings, e.g. {key}='\"{value}\"'") from None
    return out


def _split_items(text: str) -> list[str]:
    items, cur, quote = [], "", None
    for ch in text.strip():
        if quote:
            cur += ch
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
            cur += ch
        elif ch.isspace():
            if cur:
                items.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        items.append(cur)
    return items
