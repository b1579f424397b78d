"""Bad input for KD-FedLLM and Split-FedLLM: one line naming the key and the allowed values, before any
model is loaded (the model's config and the data are read, its weights never)."""

from __future__ import annotations

import json

import pytest

from fedledger.cli import main as fedledger_cli
from fedledger.config import ConfigError, Settings
from fedledger.frameworks import preflight

TINY = {"model": "tiny"}


def _error(cfg: dict, nodes: int = 3) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        preflight(Settings.from_run_config({**TINY, **cfg}), nodes)
    return info.value


@pytest.mark.parametrize("layer", [0, 2, 5, -1])
def test_a_split_layer_outside_the_models_blocks_is_one_line(layer):
    exc = _error({"strategy": "split", "split-layer": layer})
    assert exc.key == "split-layer" and "\n" not in str(exc)
    assert f"split-layer={layer} is not valid: must be in 1..1 (the model has 2 decoder blocks)" in str(exc)


def test_a_split_layer_inside_the_model_passes():
    preflight(Settings.from_run_config({**TINY, "strategy": "split", "split-layer": 1}), 3)


def test_kd_top_k_below_one_is_refused_by_the_settings():
    with pytest.raises(ConfigError, match=r"kd-top-k=0 is not valid: must be >= 1") as info:
        Settings.from_run_config({**TINY, "strategy": "kd", "kd-top-k": 0})
    assert info.value.key == "kd-top-k"


def test_kd_top_k_beyond_the_vocabulary_is_refused_once_the_config_is_known():
    exc = _error({"strategy": "kd", "kd-top-k": 5000})
    assert exc.key == "kd-top-k" and "must be in 1.." in str(exc) and "vocabulary" in str(exc)


def test_a_quantised_model_whose_cut_cannot_be_placed_is_refused():
    s = Settings.from_run_config({**TINY, "strategy": "split", "split-layer": 3, "quantization": "4bit"})
    with pytest.raises(ConfigError) as info:
        s.check_model({"model-type": "gpt2", "num-layers": 12, "vocab-size": 50257})
    assert info.value.key == "split-layer"
    assert "cannot place the cut in a 4bit quantised 'gpt2' model" in str(info.value) and "llama" in str(info.value)


def test_a_public_file_overlapping_the_heldout_split_is_refused(tmp_path):
    from fedledger.clients import data as data_lib

    _, heldout = data_lib.split_heldout(data_lib.load_corpus("chatterbot"), 0.1, 42)
    path = tmp_path / "public.jsonl"
    rows = [{"prompt": "Hello there", "response": "Hi!"}, {"prompt": heldout[0]["prompt"], "response": heldout[0]["response"]}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    exc = _error({"strategy": "kd", "kd-public": str(path)})
    assert exc.key == "kd-public" and "1 of its 2 records are in the held-out split" in str(exc)


def test_a_disjoint_public_file_passes(tmp_path):
    path = tmp_path / "public.json"
    path.write_text(json.dumps([{"prompt": "Tell me a word", "response": "Banana."}]))
    preflight(Settings.from_run_config({**TINY, "strategy": "kd", "kd-public": str(path)}), 3)


@pytest.mark.parametrize("cfg, key, needle", [
    ({"strategy": "kd", "fraction-train": 0.5}, "fraction-train", "every node takes part"),
    ({"strategy": "split", "attack": "sign-flip", "malicious": "0"}, "attack", "data attack"),
    ({"strategy": "split", "trust": "pagerank"}, "trust", "not available with strategy='split'"),
    ({"strategy": "kd", "kd-public-size": 0}, "kd-public-size", "without a public set"),
    ({"strategy": "kd", "kd-variant": "both"}, "kd-variant", "choose one of: server, client"),
    ({"strategy": "split", "split-dtype": "bfloat16"}, "split-dtype", "choose one of: float32, float16"),
    # issue 10's rules: no global model for a client to sign and check on chain
    ({"strategy": "kd", "kd-variant": "client", "audit": "eth-tester"}, "audit", "not available with kd-variant='client'"),
    ({"strategy": "kd", "kd-variant": "client", "audit": "anvil"}, "audit", "use kd-variant='server'"),
    # issue 12: these runners keep no checkpoint
    ({"strategy": "kd", "resume": "/tmp/some-run"}, "resume", "cannot resume"),
    ({"strategy": "split", "resume": "/tmp/some-run"}, "resume", "keeps no checkpoint"),
    # issue 13: the server's model also serves the runner between rounds
    ({"strategy": "split", "eval-overlap": True}, "eval-overlap", "set eval-overlap=false"),
])
def test_a_framework_setting_that_cannot_work_is_one_line(cfg, key, needle):
    with pytest.raises(ConfigError) as info:
        Settings.from_run_config({**TINY, **cfg})
    assert info.value.key == key and needle in str(info.value) and "\n" not in str(info.value)


def test_an_audited_kd_server_run_and_an_audited_split_run_pass():
    for cfg in ({"strategy": "kd", "kd-variant": "server"}, {"strategy": "split"}):
        for ledger in ("eth-tester", "anvil"):
            Settings.from_run_config({**TINY, **cfg, "audit": ledger})


def test_fedledger_run_refuses_an_audited_kd_client_run_in_one_line(tmp_path, capsys):
    rc = fedledger_cli(["run", "--flwr-home", str(tmp_path / "flwr"), "--run-config",
                        "model='tiny' strategy='kd' kd-variant='client' audit='eth-tester'"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("fedledger: error: run-config audit='eth-tester' is not available with "
                             "kd-variant='client'")
    assert not (tmp_path / "flwr").exists()


def test_the_public_split_is_set_aside_in_every_mode_when_sized():
    fedavg = Settings.from_run_config({**TINY, "kd-public-size": 40})
    kd = Settings.from_run_config({**TINY, "strategy": "kd"})
    assert fedavg.public_size == 40 and kd.public_size == 64
    assert Settings.from_run_config(TINY).public_size == 0


def test_fedledger_run_refuses_a_bad_cut_before_starting_anything(tmp_path, capsys):
    rc = fedledger_cli(["run", "--flwr-home", str(tmp_path / "flwr"), "--run-config",
                        "model='tiny' strategy='split' split-layer=4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("fedledger: error: run-config split-layer=4 is not valid: must be in 1..1")
    assert not (tmp_path / "flwr").exists()
