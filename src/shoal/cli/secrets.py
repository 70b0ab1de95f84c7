"""`shoal secret create|list|delete`: named secrets, built on the public SDK. Values are read from
the command line or a dotenv file and never printed."""

from __future__ import annotations

import json
import time

import click


@click.group()
def secret() -> None:
    """Named secrets (environment variables stored by the server)."""


@secret.command("create")
@click.argument("name")
@click.argument("pairs", nargs=-1, metavar="KEY=VALUE...")
@click.option("--from-dotenv", "dotenv", type=click.Path(exists=True, dir_okay=False),
              help="Read KEY=VALUE lines from this file (before the arguments, which win).")
@click.option("--force", is_flag=True, help="Replace the values of an existing secret.")
def create(name: str, pairs: tuple[str, ...], dotenv: str | None, force: bool) -> None:
    """Create the secret NAME from KEY=VALUE pairs and/or a dotenv file.

        shoal secret create aws AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...
    """
    from pathlib import Path

    from shoal.secret import Secret, _parse_dotenv

    env: dict[str, str] = _parse_dotenv(Path(dotenv)) if dotenv else {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.UsageError(f"expected KEY=VALUE, got an argument without '=' "
                                   f"(key {key!r})")
        env[key] = value
    if not env:
        raise click.UsageError("give at least one KEY=VALUE or --from-dotenv FILE")
    Secret.objects.create(name, env, allow_existing=force)
    click.echo(f"created secret {name} with keys {', '.join(sorted(env))}")


@secret.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_(as_json: bool) -> None:
    """Named secrets: names, key names and dates (never values)."""
    from shoal.secret import Secret

    rows = Secret.objects.list()
    if as_json:
        click.echo(json.dumps([{"name": r.name, "keys": r.keys,
                                "created_at": r.created_at.timestamp(),
                                "updated_at": r.updated_at.timestamp()} for r in rows], indent=1))
        return
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.updated_at.timestamp()))
        click.echo(f"{r.name}  {when}  {', '.join(r.keys)}")


@secret.command("delete")
@click.argument("name")
@click.option("--allow-missing", is_flag=True)
def delete(name: str, allow_missing: bool) -> None:
    """Delete the secret NAME."""
    from shoal.secret import Secret

    Secret.objects.delete(name, allow_missing=allow_missing)
    click.echo(f"deleted secret {name}")
