"""Run-config → typed ``Settings``, with one clear error line for any bad value.

The defaults live in ``pyproject.toml`` ``[tool.flwr.app.config]``; users override them with
``flwr run . --run-config "key=value ..."`` (or ``fedledger run --run-config ...``).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields


class ConfigError(ValueError):
    """A run-config value that cannot be used; the message names the key and the fix."""


CHOICES = {
    "quantization": ("none", "4bit", "8bit"),
    "dataset": ("chatterbot", "fortunes"),
    "partitioner": ("natural", "dirichlet", "iid"),
    "strategy": ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm", "fedmedian",
                 "fedtrimmedavg", "krum", "multikrum", "bulyan", "pagerank", "ring", "gossip", "async-gossip"),
    "trust": ("none", "pagerank"),
    "audit": ("none", "anvil", "eth-tester"),
}


@dataclass(frozen=True)
class Settings:
    model: str = "smollm2"
    model_cache: str = ""
    quantization: str = "none"
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"
    dataset: str = "chatterbot"
    partitioner: str = "natural"
    dirichlet_alpha: float = 0.5
    heldout_fraction: float = 0.1
    max_length: int = 128
    batch_size: int = 8
    local_steps: int = 4
    learning_rate: float = 5e-4
    eval_batches: int = 8
    num_rounds: int = 3
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    strategy: str = "fedavg"
    trust: str = "none"
    audit: str = "none"
    rpc_url: str = "http://127.0.0.1:8545"
    registry_address: str = ""
    run_dir: str = "runs"
    seed: int = 42
    attack: str = "none"
    malicious: str = ""
    extra: dict = field(default_factory=dict)  # keys for plug-ins (topology, gossip-k, trust-*...)

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_run_config(cls, run_config: dict) -> "Settings":
        known = {f.name.replace("_", "-"): f for f in fields(cls) if f.name != "extra"}
        values, extra = {}, {}
        for key, raw in dict(run_config).items():
            f = known.get(key)
            if f is None:
                extra[key] = raw
                continue
            values[f.name] = _coerce(key, raw, f.type)
        settings = cls(**values, extra=extra)
        settings.validate()
        return settings

    def validate(self) -> None:
        for key, options in CHOICES.items():
            value = getattr(self, key.replace("-", "_"))
            if value not in options:
                raise ConfigError(f"run-config {key}={value!r} is not valid; choose one of: {', '.join(options)}")
        positive = ("lora_r", "max_length", "batch_size", "local_steps", "num_rounds", "eval_batches")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"run-config {name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if not 0 < self.heldout_fraction < 1:
            raise ConfigError(f"run-config heldout-fraction must be in (0, 1), got {self.heldout_fraction}")
        if not 0 < self.fraction_train <= 1:
            raise ConfigError(f"run-config fraction-train must be in (0, 1], got {self.fraction_train}")
        if self.learning_rate <= 0:
            raise ConfigError(f"run-config learning-rate must be > 0, got {self.learning_rate}")
        try:
            self.malicious_ids()
        except ValueError:
            raise ConfigError(f"run-config malicious={self.malicious!r} must be comma-separated partition ids, e.g. \"0,3\"") from None
        if self.malicious_ids() and self.attack == "none":
            raise ConfigError("run-config malicious is set but attack=none; set attack=<name> too")

    # ------------------------------------------------------------------ helpers
    def malicious_ids(self) -> list[int]:
        return [int(x) for x in str(self.malicious).replace(" ", "").split(",") if x != ""]

    def cache_dir(self) -> str | None:
        return os.path.expanduser(self.model_cache) if self.model_cache else None

    def get(self, key: str, default=None):
        """A plug-in key (not a Settings field), e.g. ``get("topology", "complete")``."""
        return self.extra.get(key, default)

    def model_key(self) -> tuple:
        """What identifies a loaded base model + LoRA layout (for per-process caches)."""
        return (self.model, self.model_cache, self.quantization, self.lora_r, self.lora_alpha,
                self.lora_dropout, self.lora_targets, self.seed)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        extra = d.pop("extra")
        return {**{k.replace("_", "-"): v for k, v in d.items()}, **extra}


def _coerce(key: str, raw, typ):
    typ = {"int": int, "float": float, "str": str}.get(typ, typ) if isinstance(typ, str) else typ
    try:
        if typ is int:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            return int(raw)
        if typ is float:
            return float(raw)
        if typ is str:
            if isinstance(raw, bool):
                return "none" if raw is False else str(raw).lower()
            return str(raw)
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"run-config {key}={raw!r} is not a valid {typ.__name__}; e.g. --run-config \"{key}=...\"")


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
