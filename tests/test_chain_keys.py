"""The aggregator's key: from $FEDLEDGER_AGGREGATOR_KEY or a key file; every bad key is one line."""

from __future__ import annotations

import json

import pytest
from eth_account import Account

from fedledger.chain.ledger import KEY_ENV, KEY_PASSWORD_ENV, LedgerError, aggregator_account


@pytest.fixture()
def fresh(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(KEY_PASSWORD_ENV, raising=False)
    return Account.create()


def one_line_error(match: str, **kw) -> str:
    with pytest.raises(LedgerError, match=match) as info:
        aggregator_account(**kw)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_no_key_anywhere_gives_none(fresh):
    assert aggregator_account() is None


def test_key_from_the_environment(fresh, monkeypatch):
    monkeypatch.setenv(KEY_ENV, fresh.key.to_0x_hex())
    assert aggregator_account().address == fresh.address


def test_key_file_holding_hex_wins_over_the_environment(fresh, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, Account.create().key.to_0x_hex())
    path = tmp_path / "aggregator.key"
    path.write_text(fresh.key.to_0x_hex() + "\n")
    assert aggregator_account(private_key_file=str(path)).address == fresh.address


def test_encrypted_keystore_with_its_password(fresh, tmp_path, monkeypatch):
    path = tmp_path / "keystore.json"
    path.write_text(json.dumps(Account.encrypt(fresh.key, "s3cret", iterations=2)))
    one_line_error(f"put its password in \\${KEY_PASSWORD_ENV}", private_key_file=str(path))
    monkeypatch.setenv(KEY_PASSWORD_ENV, "wrong")
    one_line_error("wrong password for the aggregator keystore", private_key_file=str(path))
    monkeypatch.setenv(KEY_PASSWORD_ENV, "s3cret")
    assert aggregator_account(private_key_file=str(path)).address == fresh.address


def test_bad_keys_and_files_are_one_line_errors(fresh, tmp_path, monkeypatch):
    one_line_error("key file .* not found; check aggregator-key-file", private_key_file=str(tmp_path / "nope"))
    one_line_error("cannot read aggregator key file", private_key_file=str(tmp_path))   # a folder
    (tmp_path / "garbage.key").write_text("not a key")
    one_line_error("is not a 0x-hex private key", private_key_file=str(tmp_path / "garbage.key"))
    (tmp_path / "broken.json").write_text("{not json")
    one_line_error("neither a JSON keystore nor a 0x-hex key", private_key_file=str(tmp_path / "broken.json"))
    monkeypatch.setenv(KEY_ENV, "0x1234")
    message = one_line_error(f"\\${KEY_ENV} is not a 0x-hex private key")
    assert "aggregator-key-file" in message   # names both ways to give a key
