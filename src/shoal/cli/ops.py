"""`shoal serve`, `shoal stop`, `shoal status`, and the HTTP helper the operator commands share.

The operator commands talk to a running server and never start one (the SDK does that on first
use): asking about sandboxes must not create a server with none.
"""

from __future__ import annotations

import json
import os
import signal
import time

import click
import httpx

from shoal import config

EXIT_NO_SERVER = 3


class NoServer(click.ClickException):
    exit_code = EXIT_NO_SERVER


def _where() -> str:
    return os.environ.get("SHOAL_SERVER") or str(config.paths().socket)


def connect(timeout: float | None = 30) -> httpx.Client:
    server = _where()
    if server.startswith(("http://", "https://")):
        base, transport = server, httpx.HTTPTransport()
    else:
        base, transport = "http://shoal", httpx.HTTPTransport(uds=server.removeprefix("unix:"))
    token = os.environ.get("SHOAL_TOKEN")
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=base, transport=transport, headers=headers,
                        timeout=httpx.Timeout(timeout, connect=5))


def api(method: str, path: str, **kwargs):
    """One call; typed shoal errors for error answers, NoServer (exit 3) when none answers."""
    from shoal._client import _error_from

    with connect() as c:
        try:
            r = c.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise NoServer(f"no shoal server answers at {_where()} ({e}); start one with "
                           "`shoal serve`") from None
    if r.status_code >= 400:
        raise _error_from(r.status_code, r.content)
    return r.json() if r.content else None


def locked_server_pid(paths: config.Paths) -> int | None:
    """The pid of the process holding the server's flock on server.lock, from /proc/locks —
    never trusting server.pid alone, which a `kill -9` leaves pointing at a pid that may since
    belong to anything."""
    try:
        st = os.stat(paths.server_lock)
    except FileNotFoundError:
        return None
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if "->" in parts or len(parts) < 8 or parts[1] != "FLOCK":
                continue
            if parts[5] == dev and _is_server(int(parts[4])):
                return int(parts[4])
    return None


def _is_server(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return b"serve" in argv and any(b"shoal" in a for a in argv)


def _alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped by its parent) counts as stopped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


@click.command()
@click.option("--tcp", metavar="HOST:PORT", help="Also listen on TCP (bearer token required); "
              "the dashboard is then at http://HOST:PORT/.")
@click.option("--token", envvar="SHOAL_TOKEN", help="Token for TCP clients (default: generated, "
              "kept in $SHOAL_HOME/token).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
@click.option("--log-format", default="text", show_default=True,
              type=click.Choice(["text", "json"]), help="json: one JSON object per line.")
@click.option("--access-log", is_flag=True, help="Log every request (method, path, status, ms).")
@click.option("--runtime", type=click.Choice(["runc", "gvisor"]), envvar="SHOAL_RUNTIME",
              default="runc", show_default=True,
              help="Default sandbox runtime (per sandbox: experimental_options={'runtime': ...}).")
def serve(tcp, token, log_level, log_format, access_log, runtime) -> None:
    """Run the control plane in the foreground.

    Ctrl-C (or SIGTERM) shuts it down cleanly: the warm pool is removed and running sandboxes keep
    running; the next server adopts them. `shoal stop` terminates them instead.
    """
    if os.geteuid() != 0:
        raise click.ClickException(config.NOT_ROOT)
    os.environ["SHOAL_RUNTIME"] = runtime
    try:
        from shoal.server.main import ServerAlreadyRunning, serve as run
    except ModuleNotFoundError as e:
        if e.name in ("fastapi", "uvicorn", "starlette"):
            raise click.ClickException(f"the shoal server needs its extra ({e.name} is missing): "
                                       "pip install 'shoal[server]'") from None
        raise

    try:
        run(config.paths(), tcp, token, log_level, log_format, access_log)
    except ServerAlreadyRunning as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        pass
    click.echo("shoal server stopped; running sandboxes keep running for the next server",
               err=True)


@click.command()
@click.option("--keep-sandboxes", is_flag=True,
              help="Leave running sandboxes running (the next server adopts them).")
def stop(keep_sandboxes: bool) -> None:
    """Stop the server of this SHOAL_HOME, terminating its sandboxes first.

    Only the process that holds the server's lock is signalled: a stale server.pid is ignored.
    """
    paths = config.paths()
    pid = locked_server_pid(paths)
    if pid is None:
        stale = " (ignoring a stale server.pid)" if paths.server_pid.exists() else ""
        click.echo(f"no server is running{stale}")
        return
    # Clients that lost this server must not start it again behind the operator's back.
    paths.stopped_marker.write_text(f"{time.time()}\n")
    if not keep_sandboxes and paths.socket.exists():
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(paths.socket)),
                              base_url="http://shoal", timeout=60) as c:
                n = c.post("/admin/terminate-all").json()["terminated"]
                click.echo(f"terminated {n} sandbox(es)")
        except httpx.HTTPError as e:
            click.echo(f"could not reach the server to terminate sandboxes: {e}", err=True)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        click.echo("no server is running")
        return
    for _ in range(200):
        if not _alive(pid):
            click.echo("server stopped")
            return
        time.sleep(0.05)
    raise click.ClickException(f"server {pid} did not stop within 10 s")


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def human_duration(seconds: float) -> str:
    """3d4h, 2h5m, 4m10s, 12s."""
    s = int(max(0, seconds))
    d, h, m = s // 86400, s // 3600 % 24, s // 60 % 60
    if d:
        return f"{d}d{h}h"
    if h:
        return f"{h}h{m}m"
    if m:
        return f"{m}m{s % 60}s"
    return f"{s}s"


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(as_json: bool) -> None:
    """Ask the server how it is: version, uptime, runtime, sandboxes, warm pool, disk, log.

    Exits 3 when no server answers.
    """
    info = api("GET", "/status")
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    rows = [("server", f"running, pid {info['pid']}, version {info['version']} "
                       f"(API {info['api_version']})"),
            ("uptime", human_duration(info["uptime"])),
            ("runtime", ", ".join(info["runtimes"])),
            ("sandboxes", f"{info['sandboxes_running']} running"),
            ("warm pool", f"{info['pool_size']} idle, {info['pool_hits']} hits, "
                          f"{info['pool_misses']} misses"),
            ("home", info["home"]),
            ("disk used", human_bytes(info["disk_used"])),
            ("log", info["log_path"] or "stderr of the server process")]
    for k, v in rows:
        click.echo(f"{k + ':':11} {v}")
