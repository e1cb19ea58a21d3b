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
from tidings.config import SETTINGS, Config, ConfigError, format_duration, load_config

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
    secret = "s" * 40
    assert load_config({}, environ={"JWT_SECRET": secret}) == Config(jwt_secret=secret)
    # Open mode (no JWT secret) listens on 127.0.0.1 unless a host is given.
    assert load_config({}, environ={}) == Config(host="127.0.0.1")
    assert load_config({}, environ={"HOST": "0.0.0.0"}) == Config()


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


@pytest.mark.parametrize(
    ("env", "raw", "seconds"),
    [
        ("HEARTBEAT_INTERVAL", "30000", 30.0),  # the guide's form: bare milliseconds
        ("HEARTBEAT_INTERVAL", "30ms", 0.03),  # a unit says it is meant
        ("HEARTBEAT_INTERVAL", "0.5s", 0.5),
        ("ALERT_P95_LATENCY", "250", 0.25),
        ("ALERT_P95_LATENCY", "0.5ms", 0.0005),
        ("ALERT_P95_LATENCY", "0.5s", 0.5),
        ("HISTORY_TTL", "300000", 300.0),
        ("NODE_TIMEOUT", "2m", 120.0),
        ("DRAIN_WINDOW", "0", 0.0),
        ("DB_RESUME_GRACE", "0", 0.0),
        ("CONNECT_ERROR_BACKOFF_MS", "5", 0.005),  # named _MS: bare milliseconds are plausible
    ],
)
def test_plausible_durations(env: str, raw: str, seconds: float) -> None:
    field = BY_ENV[env].field
    assert getattr(load_config({}, environ={env: raw}), field) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("env", "raw"),
    [
        ("HEARTBEAT_INTERVAL", "30"),
        ("HEARTBEAT_INTERVAL", "999"),
        ("ALERT_P95_LATENCY", "0.5"),
        ("HISTORY_TTL", "300"),
        ("NODE_TIMEOUT", "10"),
        ("ALERT_WINDOW", "60"),
        ("DRAIN_WINDOW", "10"),
        ("DB_RESUME_GRACE", "5"),
    ],
)
def test_implausible_bare_durations_are_refused_in_one_line(env: str, raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({}, environ={env: raw})
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"invalid {env} (environment): {raw!r}: a bare number is milliseconds")
    assert f"write {raw}s, or {raw}ms if you mean it" in text


def test_implausible_bare_duration_in_toml_is_refused(tmp_path: Path) -> None:
    toml = write_toml(tmp_path, "heartbeat_interval = 30\n")
    with pytest.raises(ConfigError, match="HEARTBEAT_INTERVAL.*write 30s"):
        load_config({}, environ={}, toml_path=toml)
    assert load_config({}, environ={}, toml_path=write_toml(tmp_path, "heartbeat_interval = 30000\n")) == (
        load_config({}, environ={"HEARTBEAT_INTERVAL": "30s"})
    )


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (30.0, "30s"),
        (0.5, "500ms"),
        (0.0, "0s"),
        (300.0, "5m"),
        (1.5, "1.5s"),
        (3600.0, "1h"),
        (0.0005, "0.5ms"),
    ],
)
def test_format_duration(seconds: float, shown: str) -> None:
    assert format_duration(seconds) == shown
    if seconds:  # what is shown parses back to the same value
        assert load_config({}, environ={"ALERT_P95_LATENCY": shown}).alert_p95_latency == pytest.approx(
            seconds
        )


def test_defaults_are_shown_with_their_unit() -> None:
    by_env = {s.env: s for s in SETTINGS}
    assert by_env["HEARTBEAT_INTERVAL"].show(by_env["HEARTBEAT_INTERVAL"].default) == "30s"
    assert by_env["ALERT_P95_LATENCY"].show(by_env["ALERT_P95_LATENCY"].default) == "500ms"
    rows = {env: value for env, value, _ in Config().describe()}
    assert rows["HEARTBEAT_INTERVAL"] == "30s" and rows["ALERT_P95_LATENCY"] == "500ms"
    assert rows["HISTORY_TTL"] == "5m" and rows["DATABASE_URL"] == "(unset)"


@pytest.mark.parametrize(
    ("env", "raw", "message"),
    [
        ("PORT", "abc", "'abc': expected a port number 0-65535"),
        ("MAX_CONNECTIONS", "lots", "'lots': expected an integer"),
        ("JWT_JWKS", "notjson", "'notjson': expected a JSON Web Key Set ({\"keys\": [...]}) as JSON text"),
        ("JWT_JWKS", "[1]", 'expected a JSON Web Key Set ({"keys": [...]}), got JSON list'),
        ("JWT_CLAIM_VALIDATORS", "{bad", "expected a JSON object as JSON text, got invalid JSON"),
        (
            "DATABASE_URL",
            "mysql://x",
            "expected a PostgreSQL URL: postgresql://user:password@host:5432/database",
        ),
        ("DATABASE_URL", "localhost", "expected a PostgreSQL URL"),
        ("ALERT_RECONNECT_RATE", "often", "expected a fraction such as 0.1 or 10%"),
    ],
)
def test_bad_values_say_what_is_expected(env: str, raw: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({}, environ={env: raw})
    assert str(info.value).startswith(f"invalid {env} (environment): ")
    assert message in str(info.value)
    assert "invalid literal" not in str(info.value) and "Expecting value" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:p@db:5432/app",
        "postgres://u@db/app",
        "postgresql:///app?host=/var/run/postgresql",
        "host=db dbname=app user=u",
    ],
)
def test_database_urls_accepted(url: str) -> None:
    assert load_config({}, environ={"DATABASE_URL": url}).database_url == url


@pytest.mark.parametrize(
    "url", ["redis://localhost:abc/0", "redis://localhost:6379/x", "http://localhost:6379", "redis://"]
)
def test_bad_redis_urls_are_one_line(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({}, environ={"REDIS_URL": url})
    assert str(info.value) == f"invalid REDIS_URL: {url!r} (use redis://host:port/db)"


@pytest.mark.parametrize(
    "url", ["redis://localhost:6379/0", "rediss://:pw@cache:6380", "redis://r", "unix:///run/redis.sock"]
)
def test_redis_urls_accepted(url: str) -> None:
    assert load_config({}, environ={"REDIS_URL": url}).redis_url == url


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
    assert str(info.value) == f"unknown setting 'max_conections' in {toml} (did you mean 'max_connections'?)"


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("HEARTBEAT_INTERVAL", " (did you mean 'heartbeat_interval'?)"),
        ("heartbeat-interval", " (did you mean 'heartbeat_interval'?)"),
        ("redis_uri", " (did you mean 'redis_url'?)"),
        ("colour", ""),
    ],
)
def test_unknown_toml_key_suggests_the_closest_setting(tmp_path: Path, key: str, hint: str) -> None:
    toml = write_toml(tmp_path, f'{key} = "5s"\n')
    with pytest.raises(ConfigError) as info:
        load_config({}, environ={}, toml_path=toml)
    assert str(info.value) == f"unknown setting {key!r} in {toml}{hint}"


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
