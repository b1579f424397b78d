"""Typed settings: every run-config key is one checked field, every bad value one clear line."""

import dataclasses
import pathlib

import pytest

from fedledger.config import (
    ConfigError, Settings, StrategySettings, TRUST_ANCHORS, parse_run_config_string, pyproject_defaults,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = pyproject_defaults(str(ROOT))


def _error(cfg: dict, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        Settings.from_run_config(cfg, **kw)
    return err.value


# ---------------------------------------------------------------------- keys <-> fields
def test_every_pyproject_key_maps_to_exactly_one_field():
    keys = Settings.keys()
    assert sorted(keys) == sorted(PYPROJECT)
    assert len(set(keys.values())) == len(keys)


def test_every_field_has_exactly_one_key_and_a_help_line():
    seen = []
    for group in dataclasses.fields(Settings):
        for f in dataclasses.fields(getattr(Settings(), group.name)):
            assert f.metadata["help"].strip(), f.name
            seen.append(f.metadata["key"])
            assert Settings.keys()[f.metadata["key"]] == (group.name, f.name)
    assert sorted(seen) == sorted(PYPROJECT)


def test_pyproject_defaults_round_trip_through_settings():
    s = Settings.from_run_config(PYPROJECT)
    assert s.to_run_config() == PYPROJECT
    assert Settings.from_run_config(s.to_run_config()) == s


def test_dataclass_defaults_are_the_pyproject_defaults():
    assert Settings().to_run_config() == PYPROJECT


def test_a_non_default_run_config_round_trips():
    cfg = {"lora-targets": "q_proj,v_proj", "malicious": "1,3", "attack": "sign-flip", "trust": "pagerank",
           "trust-pretrusted": "0", "trust-clip": False, "strategy": "krum", "max-num-examples": 500,
           "registry-address": "0x5FbDB2315678afecb367f032d93F642f64180aa3", "chain-id": 31337}
    s = Settings.from_run_config(cfg)
    assert s.model.lora_targets == ("q_proj", "v_proj")
    assert s.attack.malicious == (1, 3) and s.trust.pretrusted == (0,) and s.trust.clip is False
    assert Settings.from_run_config(s.to_run_config()) == s
    assert {k: s.to_run_config()[k] for k in cfg} == cfg


def test_values_are_coerced_to_the_field_types():
    s = Settings.from_run_config({"lora-alpha": 32, "num-rounds": 5.0, "learning-rate": "1e-3", "malicious": 2,
                                  "attack": "scale", "trust-clip": "False"})
    assert s.model.lora_alpha == 32.0 and isinstance(s.model.lora_alpha, float)
    assert s.strategy.num_rounds == 5 and isinstance(s.strategy.num_rounds, int)
    assert s.train.learning_rate == 1e-3
    assert s.attack.malicious == (2,)
    assert s.trust.clip is False


def test_an_unquoted_registry_address_from_the_command_line_stays_an_address():
    address = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
    raw = parse_run_config_string(f"registry-address={address}")["registry-address"]  # TOML: a hex integer
    s = Settings.from_run_config({"registry-address": raw})
    assert s.audit.registry_address == address.lower()


# ---------------------------------------------------------------------- one line per bad value
BAD_VALUES = [
    ("num-rounds", "two"), ("num-rounds", 0), ("num-rounds", True), ("num-rounds", 2.5),
    ("model", ""), ("quantization", "3bit"), ("lora-r", 0), ("lora-alpha", 0), ("lora-alpha", -1),
    ("lora-dropout", 3), ("lora-dropout", 1.0), ("lora-dropout", -0.1), ("lora-targets", ""),
    ("lora-targets", "q_proj,v-proj"), ("lora-targets", "q proj"),
    ("dataset", "wikipedia"), ("partitioner", "random"), ("dirichlet-alpha", -1), ("dirichlet-alpha", 0),
    ("heldout-fraction", 0), ("heldout-fraction", 1), ("heldout-fraction", 1.5), ("max-length", 0),
    ("batch-size", 0), ("local-steps", 0), ("learning-rate", 0), ("learning-rate", "fast"),
    ("learning-rate", "inf"), ("learning-rate", float("nan")), ("eval-batches", 0),
    ("strategy", "fedsgd"), ("fraction-train", 0), ("fraction-train", 1.5), ("fraction-evaluate", 7),
    ("fraction-evaluate", -0.5), ("num-malicious", -2), ("proximal-mu", -0.1), ("server-lr", 0),
    ("server-momentum", 1), ("server-momentum", -0.1), ("trim-beta", 0.5), ("trim-beta", -0.1),
    ("max-num-examples", -1),
    ("trust", "eigentrust"), ("trust-threshold", -0.1), ("trust-damping", 5), ("trust-damping", 0),
    ("trust-damping", 1), ("trust-norm-tol", 0.5), ("trust-history-weight", 1), ("trust-history-weight", -0.1),
    ("trust-anchor", "root"), ("trust-clip", "no"), ("trust-clip", 1), ("trust-clip", "yes"),
    ("gossip-k", 0), ("gossip-steps", 0), ("ring-order", "shortest"), ("link-latency", -1),
    ("link-bandwidth", 0), ("speed-heterogeneity", -1), ("step-seconds", 0), ("staleness-exponent", -0.5),
    ("topology", ""), ("topology", "star"), ("topology", "/no/such/topology.json"),
    ("audit", "ganache"), ("rpc-url", "127.0.0.1:8545"), ("rpc-url", "ftp://127.0.0.1:8545"),
    ("rpc-url", "http://"), ("registry-address", "0x1234"), ("registry-address", "5FbDB2315678afecb367f032d93F642f64180aa3"),
    ("registry-address", "0x5FbDB2315678afecb367f032d93F642f64180aaZ"), ("chain-id", -1), ("chain-id", "mainnet"),
    ("aggregator-key-file", "/no/such/key.json"),
    ("attack", "signflip"), ("run-dir", ""), ("seed", "forty-two"),
]


@pytest.mark.parametrize("key, value", BAD_VALUES, ids=[f"{k}={v!r}" for k, v in BAD_VALUES])
def test_a_bad_value_is_one_line_naming_the_key(key, value):
    err = _error({key: value})
    assert err.key == key
    assert str(err).startswith(f"run-config {key}="), str(err)
    assert "is not valid" in str(err) and "\n" not in str(err)


@pytest.mark.parametrize("cfg, key", [
    ({"malicious": "a,b", "attack": "sign-flip"}, "malicious"),
    ({"malicious": "0,-1", "attack": "sign-flip"}, "malicious"),
    ({"malicious": "1,1", "attack": "sign-flip"}, "malicious"),
    ({"trust-pretrusted": "x", "trust": "pagerank"}, "trust-pretrusted"),
])
def test_a_bad_id_list_names_its_key(cfg, key):
    err = _error(cfg)
    assert err.key == key
    assert "partition ids" in str(err) or "whole numbers" in str(err)


def test_a_choice_error_lists_the_choices():
    assert "choose one of: none, sign-flip, scale" in str(_error({"attack": "signflip"}))
    assert str(_error({"lora-dropout": 3})) == "run-config lora-dropout=3 is not valid: must be in [0, 1)"


def test_the_attack_choices_are_the_attack_module_names():
    from fedledger.clients.attacks import ALL_ATTACKS

    for name in ALL_ATTACKS:
        assert Settings.from_run_config({"attack": name, "malicious": "0"}).attack.name == name


def test_the_trust_anchors_are_the_pagerank_anchors():
    from fedledger.strategies.pagerank import ANCHORS

    assert TRUST_ANCHORS == ANCHORS


def test_the_bad_examples_of_the_issue_fail_before_the_run():
    for cfg in ({"attack": "signflip", "malicious": "0"}, {"fraction-evaluate": 7}, {"dirichlet-alpha": -1},
                {"lora-dropout": 3}, {"trust-damping": 5}, {"strategy": "ring", "audit": "anvil"}):
        _error(cfg)


# ---------------------------------------------------------------------- combinations
@pytest.mark.parametrize("cfg, key, needle", [
    ({"malicious": "1"}, "malicious", "attack='none'"),
    ({"attack": "sign-flip"}, "attack", "malicious is empty"),
    ({"strategy": "ring", "audit": "anvil"}, "audit", "audit is not available with strategy='ring'"),
    ({"strategy": "gossip", "audit": "eth-tester"}, "audit", "the relay has no aggregate to record"),
    ({"strategy": "async-gossip", "audit": "anvil"}, "audit", "use a hub strategy"),
    ({"strategy": "ring", "trust": "pagerank"}, "trust", "ring peers only see partial sums"),
    ({"trust-pretrusted": "0"}, "trust-pretrusted", "trust='none'"),
])
def test_a_bad_combination_is_one_line_naming_the_key(cfg, key, needle):
    err = _error(cfg)
    assert err.key == key and needle in str(err) and "\n" not in str(err)


@pytest.mark.parametrize("cfg", [
    {"strategy": "gossip", "trust": "pagerank"},
    {"strategy": "pagerank", "trust-pretrusted": "0,1"},
    {"trust": "pagerank", "trust-pretrusted": "2"},
    {"strategy": "krum", "audit": "eth-tester", "attack": "noise", "malicious": "0"},
])
def test_a_good_combination_builds(cfg):
    Settings.from_run_config(cfg)


def test_serverless_is_true_only_for_relay_exchanges():
    assert [Settings.from_run_config({"strategy": n}).serverless for n in ("ring", "gossip", "async-gossip")] == [True] * 3
    assert not Settings.from_run_config({"strategy": "fedavg"}).serverless


# ---------------------------------------------------------------------- strict mode
def test_strict_mode_rejects_a_typo_with_a_suggestion():
    err = _error({"lora-rank": 16})
    assert err.key == "lora-rank" and "did you mean 'lora-r'?" in str(err) and "\n" not in str(err)
    assert "did you mean 'trust-damping'?" in str(_error({"trust-dampening": 0.8}))


def test_strict_mode_rejects_an_unknown_key_without_a_close_match():
    err = _error({"zzz": 1})
    assert err.key == "zzz" and "did you mean" not in str(err)


def test_non_strict_mode_ignores_unknown_keys():
    assert Settings.from_run_config({"lora-rank": 16}, strict=False) == Settings()


# ---------------------------------------------------------------------- files
def test_a_topology_file_and_a_key_file_must_exist(tmp_path):
    topo, key = tmp_path / "net.json", tmp_path / "aggregator.key"
    topo.write_text("{}")
    key.write_text("0x" + "11" * 32)
    s = Settings.from_run_config({"topology": str(topo), "aggregator-key-file": str(key)})
    assert s.topology.topology == str(topo) and s.audit.aggregator_key_file == str(key)


def test_nodes_skip_the_file_checks_of_the_server():
    cfg = {"aggregator-key-file": "/only/on/the/server.key", "topology": "/only/on/the/server.json"}
    assert _error(cfg).key == "topology"
    assert Settings.from_run_config(cfg, check_files=False).audit.aggregator_key_file == "/only/on/the/server.key"
    assert Settings.cached(cfg).topology.topology == "/only/on/the/server.json"


# ---------------------------------------------------------------------- cache
def test_cached_returns_the_same_object_for_equal_run_configs():
    a = Settings.cached({"model": "tiny", "num-rounds": 2, "seed": 7})
    b = Settings.cached(dict(reversed(list({"model": "tiny", "num-rounds": 2, "seed": 7}.items()))))
    assert a is b
    assert Settings.cached({"model": "tiny", "num-rounds": 3, "seed": 7}) is not a


def test_cached_does_not_mistake_a_bool_for_an_int():
    assert Settings.cached({"trust-clip": True}).trust.clip is True
    with pytest.raises(ConfigError):
        Settings.cached({"trust-clip": 1})


def test_cached_still_rejects_bad_values():
    with pytest.raises(ConfigError):
        Settings.cached({"lora-dropout": 3})


def test_model_key_changes_with_the_model_and_not_with_the_strategy():
    base = Settings.from_run_config({"model": "tiny"})
    assert base.model_key() == Settings.from_run_config({"model": "tiny", "strategy": "krum"}).model_key()
    assert base.model_key() != Settings.from_run_config({"model": "tiny", "lora-r": 4}).model_key()
    assert base.model_key() != Settings.from_run_config({"model": "tiny", "seed": 1}).model_key()
    hash(base.model_key())


# ---------------------------------------------------------------------- node count
def _settings(**cfg):
    return Settings.from_run_config({k.replace("_", "-"): v for k, v in cfg.items()})


@pytest.mark.parametrize("cfg, n, key", [
    ({"attack": "noise", "malicious": "0,4"}, 4, "malicious"),
    ({"trust": "pagerank", "trust_pretrusted": "3"}, 3, "trust-pretrusted"),
    ({"strategy": "bulyan", "attack": "noise", "malicious": "0"}, 6, "num-malicious"),  # needs n >= 4f + 3 = 7
    ({"strategy": "bulyan", "num_malicious": 2}, 10, "num-malicious"),
])
def test_check_nodes_rejects_what_this_node_count_cannot_run(cfg, n, key):
    with pytest.raises(ConfigError) as err:
        _settings(**cfg).check_nodes(n)
    assert err.value.key == key and "\n" not in str(err.value)


@pytest.mark.parametrize("cfg, n", [
    ({"attack": "noise", "malicious": "0,3"}, 4),
    ({"trust": "pagerank", "trust_pretrusted": "2"}, 3),
    ({"strategy": "krum", "attack": "noise", "malicious": "0,1"}, 7),
    ({"strategy": "krum", "attack": "noise", "malicious": "1"}, 4),  # Flower's Krum aggregates below n > 2f + 2
    ({"strategy": "multikrum", "num_malicious": 1}, 4),
    ({"strategy": "bulyan", "attack": "noise", "malicious": "0"}, 7),
    ({"strategy": "bulyan", "attack": "noise", "malicious": "0", "num_malicious": 0}, 3),
    ({"strategy": "fedavg"}, 1),
])
def test_check_nodes_accepts_what_this_node_count_can_run(cfg, n):
    _settings(**cfg).check_nodes(n)


def test_krum_f_defaults_to_the_number_of_malicious_ids():
    assert StrategySettings(num_malicious=-1).f((0, 3, 5)) == 3
    assert StrategySettings(num_malicious=1).f((0, 3, 5)) == 1


# ---------------------------------------------------------------------- direct construction
def test_groups_check_themselves_when_built_directly():
    with pytest.raises(ConfigError) as err:
        StrategySettings(fraction_evaluate=7)
    assert err.value.key == "fraction-evaluate"
    with pytest.raises(ConfigError):
        StrategySettings(num_rounds="3")
    with pytest.raises(dataclasses.FrozenInstanceError):
        StrategySettings().num_rounds = 5


# ---------------------------------------------------------------------- CLI strings
def test_run_config_string_parses_like_flwr():
    out = parse_run_config_string("num-rounds=3 model='tiny' learning-rate=1e-3 run-dir=/tmp/x audit=\"anvil\"")
    assert out == {"num-rounds": 3, "model": "tiny", "learning-rate": 1e-3, "run-dir": "/tmp/x", "audit": "anvil"}
    with pytest.raises(ConfigError):
        parse_run_config_string("num-rounds")
