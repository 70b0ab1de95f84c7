"""The `shoal` command line."""

from __future__ import annotations

import json
import os
import sys
import time

import click

from shoal import config
from shoal.exception import Error


def _fail(message: str) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(1)


class _Group(click.Group):
    """Turns shoal's typed errors into a one-line message and exit code 1: no tracebacks for user
    mistakes. Ctrl-C exits 130 (as a shell reports SIGINT), a closed pipe (`| head`) quietly."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            sys.exit(130)
        except BrokenPipeError:
            # Nothing more can be written; keep Python's final flush from failing too.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
        except (Error, OSError, ValueError, TypeError) as e:
            _fail(str(e) or type(e).__name__)


EXIT_CODES = """\b
Exit codes:
  0    success
  1    error: the server refused (not found, invalid, conflict) or a local failure
  2    usage error (unknown option, missing argument)
  3    no shoal server answers (status, sandbox, app commands)
  130  interrupted (Ctrl-C; `serve` exits 0: that is its clean shutdown)
  141  the output's reader went away (`| head`)
  `sandbox exec` and `shell` exit with the command's exit code."""


@click.group(cls=_Group, epilog=EXIT_CODES,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="shoal")
def main() -> None:
    """shoal: self-hosted sandboxes for untrusted code."""


@main.command()
def ca() -> None:
    """Print the path of the local CA certificate that encrypted tunnels' certificates come
    from (created on first use), so a client can trust it: `curl --cacert "$(shoal ca)" URL`."""
    from shoal.server.network.ca import ensure_ca

    click.echo(str(ensure_ca(config.paths().home / "ca")))


from shoal.cli.storage import make_group  # noqa: E402

main.add_command(make_group("volume"))
main.add_command(make_group("nfs"))

from shoal.cli.secrets import secret  # noqa: E402

main.add_command(secret)

# --- operations (cli/ops.py, cli/sandbox.py)
from shoal.cli import ops as _ops, sandbox as _sandbox  # noqa: E402

for _cmd in (_ops.serve, _ops.stop, _ops.status, _sandbox.sandbox, _sandbox.shell, _sandbox.app):
    main.add_command(_cmd)


@main.group()
def image() -> None:
    """Images."""


def _api(method: str, path: str, **kwargs):
    """One call to the server through the SDK's transport (starting a server if needed)."""
    from shoal._client import get_client
    from shoal._sync import run_blocking

    async def call():
        client = await get_client()
        return await client.call(method, path, **kwargs)

    return run_blocking(call())


@image.command("build")
@click.argument("target", metavar="FILE::NAME")
def image_build(target: str) -> None:
    """Build the Image called NAME in the Python file FILE, showing the build."""
    import runpy

    import shoal

    path, sep, name = target.partition("::")
    if not sep or not name:
        raise click.UsageError("give FILE::NAME, e.g. images.py::app_image")
    if not os.path.isfile(path):
        _fail(f"no such file: {path}")
    namespace = runpy.run_path(path, run_name="__shoal_image_build__")
    img = namespace.get(name)
    if not isinstance(img, shoal.Image):
        _fail(f"{name!r} in {path} is not a shoal.Image (it is {type(img).__name__})")
    with shoal.enable_output():
        img.build()
    click.echo(img.object_id)


@image.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def image_list(as_json: bool) -> None:
    """Images built on this server."""
    rows = _api("GET", "/images")
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created_at"]))
        click.echo(f"{r['image_id']}  {r['layers']:>2} layers  {when}  {r['description']}")


@image.command("rm")
@click.argument("image_ids", nargs=-1, required=True)
def image_rm(image_ids: tuple[str, ...]) -> None:
    """Remove images (their layers go at the next prune)."""
    for image_id in image_ids:
        _api("DELETE", f"/images/{image_id}")
        click.echo(f"removed {image_id}")


@image.command("prune")
def image_prune() -> None:
    """Remove layers that no image and no running sandbox uses."""
    r = _api("POST", "/images/prune")
    click.echo(f"removed {len(r['removed_layers'])} layer(s), freed {r['freed_bytes'] / 1e6:.1f} MB")


@image.command("build-default")
def image_build_default() -> None:
    """Build the default image (Debian bookworm + Python) into the image store, if missing."""
    from shoal.server.images.base import ensure_base_image

    path = ensure_base_image(config.paths().images, log=lambda line: click.echo(line, err=True))
    click.echo(str(path))
