"""Settings: precedence CLI > env > TOML > default, one-line errors naming the setting, the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tidings.auth.tokens import Verifier
from tidings.cli import main
from tidings.config import SETTINGS, Config, ConfigError, load_config

BY_ENV = {s.env: s for s in SETTINGS}


def write_toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "tidings.toml"
    path.write_text(text)
    return str(path)


# -- the table ---------------------------------------------------------------------------------


def test_settings_table_matches_config_fields_and_defaults() -> None:
    fields = {f.name: f.default for f in dataclasses.fields(Config)}
    assert sorted(s.field for s in SETTINGS) == sorted(fields)
    for s in SETTINGS:
        assert s.default == fields[s.field], s.field
        assert s.doc.strip()
        assert s.flag == "--" + s.field.replace("_", "-")
    assert len({s.env for s in SETTINGS}) == len(SETTINGS)


def test_guide_names_are_kept() -> None:
    for env in (
        "MAX_CONNECTIONS",
        "MAX_CHANNELS_PER_CLIENT",
        "MAX_JOINS_PER_SECOND",
        "MAX_MESSAGES_PER_SECOND",
    ):
        assert env in BY_ENV
    assert "HEARTBEAT_INTERVAL" in BY_ENV and "JWT_SECRET" in BY_ENV and "PORT" in BY_ENV


def test_defaults() -> None:
    assert load_config({}, environ={}) == Config()


# -- precedence --------------------------------------------------------------------------------


def test_precedence_cli_over_env_over_toml_over_default(tmp_path: Path) -> None:
    toml = write_toml(tmp_path, "port = 1111\nmax_connections = 7\nhistory_size = 3\n")
    env = {"PORT": "2222", "MAX_CONNECTIONS": "8"}
    cfg = load_config({"port": "3333"}, environ=env, toml_path=toml)
    assert (cfg.port, cfg.max_connections, cfg.history_size, cfg.replay_max) == (
        3333,
        8,
        3,
        Config().replay_max,
    )
    cfg = load_config({}, environ=env, toml_path=toml)
    assert (cfg.port, cfg.max_connections) == (2222, 8)
    cfg = load_config({}, environ={}, toml_path=toml)
    assert (cfg.port, cfg.max_connections) == (1111, 7)


def test_cli_none_means_not_given() -> None:
    assert load_config({"port": None}, environ={"PORT": "5"}).port == 5


def test_toml_under_a_tidings_table_and_from_env(tmp_path: Path) -> None:
    toml = write_toml(tmp_path, '[tidings]\nlog_level = "debug"\nheartbeat_interval = "5s"\n')
    cfg = load_config({}, environ={"TIDINGS_CONFIG": toml})
    assert (cfg.log_level, cfg.heartbeat_interval) == ("debug", 5.0)


def test_toml_native_values(tmp_path: Path) -> None:
    toml = write_toml(
        tmp_path,
        'max_frame_size = 2048\njwt_claim_validators = { iss = "supabase" }\njwt_secret = "s"\n',
    )
    cfg = load_config({}, environ={}, toml_path=toml)
    assert cfg.max_frame_size == 2048
    assert cfg.jwt_claim_validators == {"iss": "supabase"}
    assert cfg.jwt_secret == "s"


# -- values ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        ("30s", 30.0),
        ("250ms", 0.25),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("1500", 1.5),
        (" 10 s ", 10.0),
    ],
)
def test_durations(raw: str, seconds: float) -> None:
    assert load_config({}, environ={"HEARTBEAT_INTERVAL": raw}).heartbeat_interval == pytest.approx(seconds)


def test_zero_backoffs_are_allowed() -> None:
    cfg = load_config({}, environ={"CHANNEL_ERROR_BACKOFF_MS": "0", "CONNECT_ERROR_BACKOFF_MS": "0"})
    assert (cfg.channel_error_backoff, cfg.connect_error_backoff) == (0.0, 0.0)


def test_underscores_in_numbers() -> None:
    assert load_config({}, environ={"MAX_CONNECTIONS": "20_000"}).max_connections == 20_000


def test_json_settings() -> None:
    cfg = load_config({}, environ={"JWT_CLAIM_VALIDATORS": '{"iss":"supabase"}', "JWT_JWKS": ""})
    assert cfg.jwt_claim_validators == {"iss": "supabase"}
    assert cfg.jwt_jwks is None


def test_choices_are_case_insensitive() -> None:
    assert load_config({}, environ={"LOG_LEVEL": "WARNING", "LOG_FORMAT": "Json"}).log_format == "json"


BAD_VALUES = {
    "PORT": ["70000", "-1", "http"],
    "MAX_CONNECTIONS": ["0", "-5", "lots", "1.5"],
    "MAX_CONNECTIONS_PER_USER": ["-1", "x"],
    "MAX_CHANNELS_PER_CLIENT": ["0"],
    "MAX_JOINS_PER_SECOND": ["0"],
    "MAX_MESSAGES_PER_SECOND": ["none"],
    "MAX_NODE_MESSAGES_PER_SECOND": ["-3"],
    "MAX_PAYLOAD_SIZE_KB": ["0"],
    "MAX_FRAME_SIZE": ["1MB"],
    "MAX_UNSENT_BYTES": ["0"],
    "HEARTBEAT_INTERVAL": ["0", "0s", "soon", "-5s", "5 days"],
    "CONNECT_ERROR_BACKOFF_MS": ["-1", "later"],
    "CHANNEL_ERROR_BACKOFF_MS": ["x"],
    "DRAIN_WINDOW": ["forever"],
    "JWT_JWKS": ["[1]", "{bad json", "not json", '{"keys": []}', '{"keys": [{"kty": "nope"}]}'],
    "JWT_CLAIM_VALIDATORS": ["[1]", "{bad", '"iss"'],
    "HISTORY_SIZE": ["-1"],
    "HISTORY_TTL": ["0"],
    "REPLAY_MAX": ["0"],
    "LOG_LEVEL": ["loud"],
    "LOG_FORMAT": ["xml"],
}
NO_BAD_VALUE = {"HOST", "JWT_SECRET"}


def test_the_bad_values_name_real_settings() -> None:
    assert set(BAD_VALUES) | NO_BAD_VALUE <= set(BY_ENV)


@pytest.mark.parametrize(("env", "raw"), [(env, raw) for env, raws in BAD_VALUES.items() for raw in raws])
def test_bad_env_value_is_one_line_naming_the_setting(env: str, raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({}, environ={env: raw})
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"invalid {env} (environment): ")


def test_bad_cli_value_names_the_setting() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"max_connections": "0"}, environ={})
    assert str(info.value).startswith("invalid MAX_CONNECTIONS (--max-connections): '0'")


def test_bad_toml_value_names_the_setting_and_file(tmp_path: Path) -> None:
    toml = write_toml(tmp_path, 'max_connections = "many"\n')
    with pytest.raises(ConfigError) as info:
        load_config({}, environ={}, toml_path=toml)
    assert str(info.value).startswith(f"invalid MAX_CONNECTIONS ({toml}): 'many'")


def test_toml_float_for_an_integer(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="MAX_CONNECTIONS"):
        load_config({}, environ={}, toml_path=write_toml(tmp_path, "max_connections = 1.5\n"))


def test_unknown_toml_key(tmp_path: Path) -> None:
    toml = write_toml(tmp_path, "max_conections = 5\n")
    with pytest.raises(ConfigError) as info:
        load_config({}, environ={}, toml_path=toml)
    assert str(info.value) == f"unknown setting 'max_conections' in {toml}"


@pytest.mark.parametrize("text", ["port = = 1", "[tidings\n"])
def test_broken_toml_is_one_line(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({}, environ={}, toml_path=write_toml(tmp_path, text))
    assert "\n" not in str(info.value) and "TIDINGS_CONFIG" in str(info.value)


def test_missing_toml_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="TIDINGS_CONFIG"):
        load_config({}, environ={"TIDINGS_CONFIG": str(tmp_path / "absent.toml")})


def test_describe_masks_the_secret() -> None:
    rows = {
        env: value for env, value, _ in Config(jwt_secret="hunter2", jwt_claim_validators={"a": 1}).describe()
    }
    assert rows["JWT_SECRET"] == "(set)"
    assert json.loads(rows["JWT_CLAIM_VALIDATORS"]) == {"a": 1}
    assert "hunter2" not in "".join(rows.values())


# -- CLI ---------------------------------------------------------------------------------------


def clean_env() -> dict[str, str | None]:
    """CliRunner env that hides any setting of the developer's shell."""
    env: dict[str, str | None] = {s.env: None for s in SETTINGS}
    return env | {"TIDINGS_CONFIG": None}


def test_check_config_prints_effective_settings(tmp_path: Path) -> None:
    toml = write_toml(tmp_path, "history_size = 9\n")
    env = clean_env() | {"MAX_CONNECTIONS": "5", "JWT_SECRET": "hunter2"}
    result = CliRunner().invoke(main, ["check-config", "--config", toml, "--port", "4321"], env=env)
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()}
    assert lines["MAX_CONNECTIONS"] == "5"
    assert lines["PORT"] == "4321"
    assert lines["HISTORY_SIZE"] == "9"
    assert lines["JWT_SECRET"] == "(set)"
    assert "hunter2" not in result.stdout
    assert set(lines) == set(BY_ENV)


def test_check_config_bad_value_exits_with_one_line() -> None:
    env = clean_env() | {"HEARTBEAT_INTERVAL": "soon"}
    result = CliRunner().invoke(main, ["check-config"], env=env)
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("tidings: invalid HEARTBEAT_INTERVAL (environment): 'soon'")


def test_token_command_mints_a_verifiable_token() -> None:
    secret = "a-development-secret-that-is-long-enough"
    result = CliRunner().invoke(
        main,
        ["token", "--secret", secret, "--role", "service_role", "--sub", "u1", "--ttl", "60"],
        env=clean_env(),
    )
    assert result.exit_code == 0, result.output
    principal = Verifier(secret).verify(result.stdout.strip())
    assert (principal.role, principal.sub) == ("service_role", "u1")


def test_token_command_reads_jwt_secret_and_defaults_to_authenticated() -> None:
    secret = "another-development-secret-long-enough"
    result = CliRunner().invoke(main, ["token"], env=clean_env() | {"JWT_SECRET": secret})
    assert result.exit_code == 0, result.output
    assert Verifier(secret).verify(result.stdout.strip()).role == "authenticated"


def test_token_command_needs_a_secret() -> None:
    result = CliRunner().invoke(main, ["token"], env=clean_env())
    assert result.exit_code != 0
    assert "--secret" in result.output


def serve(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in BY_ENV and k != "TIDINGS_CONFIG"}
    return subprocess.run(
        [sys.executable, "-m", "tidings", "serve", "--host", "127.0.0.1", "--port", "0", *args],
        env=base | env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("env", "args", "setting"),
    [
        ({"MAX_CONNECTIONS": "0"}, (), "MAX_CONNECTIONS"),
        ({}, ("--heartbeat-interval", "soon"), "HEARTBEAT_INTERVAL"),
        ({"JWT_JWKS": '{"keys": "none"}'}, (), "JWT_JWKS"),
    ],
)
def test_serve_with_a_bad_setting_exits_with_one_line(
    env: dict[str, str], args: tuple[str, ...], setting: str
) -> None:
    proc = serve(env, *args)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()] + proc.stdout.splitlines()
    assert len(lines) == 1, proc.stderr + proc.stdout
    assert lines[0].startswith(f"tidings: invalid {setting} ")


def test_check_config_masks_passwords_in_urls() -> None:
    config = load_config(
        {}, environ={"DATABASE_URL": "postgresql://app:s3cret@db:5432/x", "REDIS_URL": "redis://:pw@r:6379/0"}
    )
    shown = {env: value for env, value, _ in config.describe()}
    assert shown["DATABASE_URL"] == "postgresql://app:***@db:5432/x"
    assert shown["REDIS_URL"] == "redis://:***@r:6379/0"
    assert "s3cret" not in str(config.describe())
