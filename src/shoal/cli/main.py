"""The `shoal` command line."""

from __future__ import annotations

import json
import os
import signal
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
    mistakes."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (Error, OSError, ValueError, TypeError) as e:
            _fail(str(e) or type(e).__name__)


@click.group(cls=_Group)
@click.version_option(package_name="shoal")
def main() -> None:
    """shoal: self-hosted sandboxes for untrusted code."""


@main.command()
@click.option("--tcp", metavar="HOST:PORT", help="Also listen on TCP (bearer token required).")
@click.option("--token", envvar="SHOAL_TOKEN", help="Token for TCP clients (default: generated, "
              "kept in $SHOAL_HOME/token).")
@click.option("--log-level", default="info", show_default=True)
@click.option("--runtime", type=click.Choice(["runc", "gvisor"]), envvar="SHOAL_RUNTIME",
              default="runc", show_default=True,
              help="Default sandbox runtime (per sandbox: experimental_options={'runtime': ...}).")
def serve(tcp: str | None, token: str | None, log_level: str, runtime: str) -> None:
    """Run the control plane in the foreground."""
    os.environ["SHOAL_RUNTIME"] = runtime
    try:
        from shoal.server.main import ServerAlreadyRunning, serve as run
    except ModuleNotFoundError as e:
        if e.name in ("fastapi", "uvicorn", "starlette"):
            _fail(f"the shoal server needs its extra ({e.name} is missing): "
                  "pip install 'shoal[server]'")
        raise

    try:
        run(config.paths(), tcp, token, log_level)
    except ServerAlreadyRunning as e:
        _fail(str(e))


@main.command()
@click.option("--keep-sandboxes", is_flag=True,
              help="Leave running sandboxes running (the next server adopts them).")
def stop(keep_sandboxes: bool) -> None:
    """Stop the server of this SHOAL_HOME, terminating its sandboxes first."""
    paths = config.paths()
    if not paths.server_pid.exists():
        click.echo("no server is running")
        return
    pid = int(paths.server_pid.read_text())
    if not keep_sandboxes and paths.socket.exists():
        import httpx

        try:
            transport = httpx.HTTPTransport(uds=str(paths.socket))
            with httpx.Client(transport=transport, base_url="http://shoal", timeout=60) as c:
                n = c.post("/admin/terminate-all").json()["terminated"]
                click.echo(f"terminated {n} sandbox(es)")
        except httpx.HTTPError as e:
            click.echo(f"could not reach the server to terminate sandboxes: {e}", err=True)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        click.echo("no server is running (stale pid file)")
        return
    for _ in range(200):
        if not _alive(pid):
            click.echo("server stopped")
            return
        time.sleep(0.05)
    _fail(f"server {pid} did not stop within 10 s")


def _alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped by its parent) counts as stopped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


@main.command()
def status() -> None:
    """Show whether a server is running for this SHOAL_HOME."""
    paths = config.paths()
    info = {"home": str(paths.home), "socket": str(paths.socket), "running": False}
    if paths.server_pid.exists():
        pid = int(paths.server_pid.read_text())
        if _alive(pid):
            info.update(running=True, pid=pid)
    click.echo(json.dumps(info, indent=1))



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
