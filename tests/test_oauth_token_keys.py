"""Stored Locate2u tokens have a key of their own (RELAY_TOKEN_KEYS, a MultiFernet list): rotation keeps them
readable, the webhook secret can rotate on its own, and a missing key is a visible warning (real Redis)."""
import secrets

import pytest
from click.testing import CliRunner
from cryptography.fernet import Fernet

from receiver import create_app
from workers.ops.cli import main
from workers.config import ConfigError, Settings
from workers.locate2u.token_store import ACCOUNT_KEY, KEY_WARNING, TOKENS_KEY, TokenStore

OLD_KEY, NEW_KEY = Fernet.generate_key().decode(), Fernet.generate_key().decode()
TOKENS = {"access_token": "stored-access-token", "refresh_token": "stored-refresh-token"}
ACCOUNT = {"userId": 1, "teamId": 2, "email": "ops@example.com", "teamName": "Ops"}


def store(redis_client, settings, **changes):
    return TokenStore.from_settings(redis_client, settings.replace(**changes))


def cli(settings, *args):
    return CliRunner().invoke(main, list(args), env=settings.to_env(), catch_exceptions=False)


def test_key_rotation_keeps_tokens_readable(sim, settings, redis_client):
    settings = sim.configure(settings)
    store(redis_client, settings, token_keys=(OLD_KEY,)).save(TOKENS, account=ACCOUNT)
    rotating = settings.replace(token_keys=(NEW_KEY, OLD_KEY))  # the new key added in front
    rotated = cli(rotating, "oauth", "rotate-key")
    assert rotated.exit_code == 0, rotated.output
    assert rotated.stdout == "re-encrypted 2 stored value(s) under the first key of RELAY_TOKEN_KEYS\n"
    retired = store(redis_client, settings, token_keys=(NEW_KEY,))  # the old key retired
    assert retired.load() == TOKENS and retired.account() == ACCOUNT
    assert store(redis_client, settings, token_keys=(OLD_KEY,)).load() is None


def test_a_value_under_an_older_key_moves_to_the_first_when_read(settings, redis_client):
    store(redis_client, settings, token_keys=(OLD_KEY,)).save(TOKENS)
    assert store(redis_client, settings, token_keys=(NEW_KEY, OLD_KEY)).load() == TOKENS
    assert store(redis_client, settings, token_keys=(NEW_KEY,)).load() == TOKENS


def test_tokens_from_the_derived_key_move_to_the_token_key_and_survive_webhook_secret_rotation(settings,
                                                                                           redis_client):
    store(redis_client, settings).save(TOKENS)  # as before RELAY_TOKEN_KEYS existed
    keyed = settings.replace(token_keys=(NEW_KEY,))
    assert TokenStore.from_settings(redis_client, keyed).load() == TOKENS  # re-encrypted under NEW_KEY
    rotated_secret = keyed.replace(webhook_secret="a-new-webhook-secret-0123456789")  # no previous secret kept
    assert TokenStore.from_settings(redis_client, rotated_secret).load() == TOKENS
    assert TOKENS["access_token"] not in redis_client.get(TOKENS_KEY)


def test_rotate_key_without_token_keys_is_a_configuration_error(sim, settings, redis_client):
    answer = cli(sim.configure(settings), "oauth", "rotate-key")
    assert answer.exit_code == 2 and "RELAY_TOKEN_KEYS: unset" in answer.stderr


def test_rotate_key_reports_values_no_key_can_read(sim, settings, redis_client):
    store(redis_client, settings, token_keys=(OLD_KEY,)).save(TOKENS, account=ACCOUNT)
    answer = cli(sim.configure(settings, token_keys=(NEW_KEY,)), "oauth", "rotate-key")
    assert answer.exit_code == 1
    assert f"2 value(s) could not be decrypted with any key and were left as they are: {TOKENS_KEY}, " \
           f"{ACCOUNT_KEY}" in answer.stderr


def test_new_key_prints_a_fernet_key_the_settings_accept(settings):
    key = CliRunner().invoke(main, ["oauth", "new-key"]).stdout.strip()
    Fernet(key.encode())
    assert Settings.from_env({"RELAY_WEBHOOK_SECRET": "x" * 16, "RELAY_TOKEN_KEYS": f"{key}, {OLD_KEY}"}
                             ).token_keys == (key, OLD_KEY)


@pytest.mark.parametrize("value", ["not-a-key", OLD_KEY[:-13], OLD_KEY + ",short"],
                         ids=["not-a-key", "a-cut-key", "a-key-then-a-short-one"])  # the keys are random
def test_a_bad_token_key_names_the_setting(value):
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"RELAY_WEBHOOK_SECRET": "x" * 16, "RELAY_TOKEN_KEYS": value})
    assert "RELAY_TOKEN_KEYS" in caught.value.problems
    assert "is neither a Fernet key nor a secret of at least 32 characters" in str(caught.value)
    assert value.split(",")[-1] not in str(caught.value)


def test_a_generated_secret_works_as_a_token_key(settings, redis_client):
    """app.json's generator makes 64 hex characters, not a Fernet key: it is turned into one."""
    generated = secrets.token_hex(32)
    assert Settings.from_env({"RELAY_WEBHOOK_SECRET": "x" * 16, "RELAY_TOKEN_KEYS": generated}).token_keys == (
        generated,)
    store(redis_client, settings, token_keys=(generated,)).save(TOKENS)
    assert store(redis_client, settings, token_keys=(NEW_KEY, generated)).load() == TOKENS
    assert store(redis_client, settings, token_keys=(NEW_KEY,)).load() == TOKENS
    assert store(redis_client, settings, token_keys=(secrets.token_hex(32),)).load() is None


def test_a_missing_key_is_a_warning_in_readyz_and_status(sim, settings, redis_client):
    unkeyed = sim.configure(settings)
    ready = create_app(unkeyed).test_client().get("/readyz").get_json()
    assert ready["checks"]["token_key"] == f"warning: {KEY_WARNING}"
    status = cli(unkeyed, "status")
    assert f"warning       {KEY_WARNING}" in status.stdout
    assert f"token_key: {KEY_WARNING}" in cli(unkeyed, "oauth", "status").stdout

    keyed = unkeyed.replace(token_keys=(NEW_KEY,))
    assert "token_key" not in create_app(keyed).test_client().get("/readyz").get_json()["checks"]
    assert "warning       RELAY_TOKEN_KEYS" not in cli(keyed, "status").stdout
    assert "token_key: RELAY_TOKEN_KEYS" in cli(keyed, "oauth", "status").stdout


def test_re_encrypting_never_undoes_a_newer_token_set(settings, redis_client):
    """A worker that read tokens under the old key must not write them back over a renewal stored meanwhile."""
    store(redis_client, settings, token_keys=(OLD_KEY,)).save(TOKENS)
    reader = store(redis_client, settings, token_keys=(NEW_KEY, OLD_KEY))
    stale = redis_client.get(TOKENS_KEY)
    renewed = {**TOKENS, "access_token": "renewed-access-token"}
    reader.save(renewed)  # another worker renews
    reader._reencrypt(TOKENS_KEY, stale)  # the first worker's re-encryption of what it read before
    assert reader.load() == renewed


class CountingFernet(Fernet):
    """A Fernet that counts its decryptions."""

    decrypted = 0

    def decrypt(self, token, ttl=None):
        CountingFernet.decrypted += 1
        return super().decrypt(token, ttl)


def test_a_stored_value_read_again_unchanged_is_decrypted_once(redis_client, monkeypatch):
    """Every stop read takes the access token from Redis; a value unchanged since this process
    decrypted it is not decrypted again (an HMAC check and an AES decryption per read), a new one is."""
    monkeypatch.setattr(CountingFernet, "decrypted", 0)
    tokens = TokenStore(redis_client, [CountingFernet(NEW_KEY)], dedicated=True)
    tokens.save(TOKENS, account=ACCOUNT)
    assert [tokens.load() for _ in range(3)] == [TOKENS] * 3 and tokens.account() == ACCOUNT
    assert CountingFernet.decrypted == 2  # the token set once, the account once
    renewed = {**TOKENS, "access_token": "renewed-access-token"}
    TokenStore(redis_client, [Fernet(NEW_KEY)]).save(renewed)  # by another process
    assert tokens.load() == renewed and tokens.load() == renewed
    assert CountingFernet.decrypted == 3
    loaded = tokens.load()
    loaded["access_token"] = "changed by a caller"
    assert tokens.load() == renewed
