"""``tidings serve | check-config | token | bench``."""

from __future__ import annotations

import sys
from typing import Any

import click

from . import __version__
from .config import SETTINGS, ConfigError, Setting, load_config

__all__ = ["main"]


def _option_help(s: Setting) -> str:
    units = "; e.g. 30s, 500ms, 2m (bare = ms)" if s.is_duration else ""
    return f"{s.doc} [env {s.env}; default {s.show(s.default)}{units}]"


def _setting_options(func: Any) -> Any:
    # Values stay strings here: the settings table parses them, so a bad one is the same one line
    # whichever source it came from. The metavar shows the type (--port INTEGER, DURATION, ...).
    for s in reversed(SETTINGS):
        func = click.option(s.flag, s.field, default=None, metavar=s.metavar, help=_option_help(s))(func)
    return click.option(
        "--config",
        "config_file",
        default=None,
        type=click.Path(dir_okay=False),
        help="TOML file with settings (env TIDINGS_CONFIG).",
    )(func)


def _load(config_file: str | None, options: dict[str, Any]) -> Any:
    try:
        return load_config(options, toml_path=config_file)
    except ConfigError as exc:
        click.echo(f"tidings: {exc}", err=True)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="tidings", message="%(prog)s %(version)s")
def main() -> None:
    """Tidings: a real-time server speaking the Supabase Realtime protocol."""


@main.command()
@_setting_options
def serve(config_file: str | None, **options: Any) -> None:
    """Run the server (WebSocket, REST broadcast, health and metrics on one port)."""
    config = _load(config_file, options)
    from .logs import setup_logging
    from .server.app import run

    setup_logging(config.log_level, config.log_format)
    run(config)


@main.command("check-config")
@_setting_options
def check_config(config_file: str | None, **options: Any) -> None:
    """Print the effective settings (from flags, environment, TOML file and defaults)."""
    config = _load(config_file, options)
    width = max(len(s.env) for s in SETTINGS)
    for env, value, doc in config.describe():
        click.echo(f"{env:<{width}}  {value:<24}  {doc}")


@main.command()
@click.option("--secret", envvar="JWT_SECRET", required=True, help="HS256 secret [env JWT_SECRET].")
@click.option("--role", default="authenticated", show_default=True, help="`role` claim.")
@click.option("--sub", default=None, help="`sub` claim (user id).")
@click.option("--ttl", default=3600, show_default=True, type=int, help="Seconds until `exp`.")
def token(secret: str, role: str, sub: str | None, ttl: int) -> None:
    """Mint a development JWT signed with JWT_SECRET."""
    from .auth.keys import quiet_pyjwt_key_length_warning, short_secret_warning
    from .auth.tokens import mint_token

    warning = short_secret_warning(secret, "the secret")
    if warning:
        click.echo(f"tidings: warning: {warning}", err=True)
    quiet_pyjwt_key_length_warning()
    click.echo(mint_token(secret, role=role, sub=sub, ttl=ttl))


def _add_optional_commands() -> None:
    # Commands that live in their own packages register here (the bench pulls in its own deps).
    try:
        from .bench.cli import bench
    except ImportError:
        return
    main.add_command(bench)


_add_optional_commands()

if __name__ == "__main__":  # pragma: no cover
    main()
