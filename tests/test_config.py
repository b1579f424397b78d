import pytest

from fedledger.config import ConfigError, Settings, parse_run_config_string, pyproject_defaults


def test_pyproject_defaults_parse_into_settings():
    s = Settings.from_run_config(pyproject_defaults("."))
    assert s.model == "smollm2" and s.strategy == "fedavg" and s.num_rounds >= 1


def test_unknown_keys_are_kept_for_plugins():
    s = Settings.from_run_config({"topology": "complete", "gossip-k": 2})
    assert s.get("topology") == "complete" and s.get("gossip-k") == 2


@pytest.mark.parametrize("cfg, needle", [
    ({"num-rounds": "two"}, "num-rounds"),
    ({"num-rounds": 0}, "num-rounds must be > 0"),
    ({"strategy": "fedsgd"}, "choose one of"),
    ({"quantization": "3bit"}, "quantization"),
    ({"malicious": "a,b", "attack": "sign-flip"}, "malicious"),
    ({"malicious": "1"}, "attack=none"),
    ({"heldout-fraction": 1.5}, "heldout-fraction"),
])
def test_bad_values_name_the_key(cfg, needle):
    with pytest.raises(ConfigError) as err:
        Settings.from_run_config(cfg)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_run_config_string_parses_like_flwr():
    out = parse_run_config_string("num-rounds=3 model='tiny' learning-rate=1e-3 run-dir=/tmp/x audit=\"anvil\"")
    assert out == {"num-rounds": 3, "model": "tiny", "learning-rate": 1e-3, "run-dir": "/tmp/x", "audit": "anvil"}
    with pytest.raises(ConfigError):
        parse_run_config_string("num-rounds")
