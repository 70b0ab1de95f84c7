"""`shoal sandbox ...`, `shoal shell` and `shoal app ...`: operating sandboxes from the command
line, in docker's and Modal's words (`list`, `inspect`, `logs -f`, `exec -it`, `stop`, `stats`)."""

from __future__ import annotations

import datetime
import json
import sys
import threading
import time

import click

from shoal.cli.ops import api, connect, human_bytes, human_duration, NoServer

SHELL = ["/bin/sh", "-c", "if command -v bash >/dev/null 2>&1; then exec bash -l; fi; exec sh -l"]


def _parse_tags(tags: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for t in tags:
        k, sep, v = t.partition("=")
        if not sep or not k:
            raise click.BadParameter(f"{t!r} is not KEY=VALUE", param_hint="--tag")
        out[k] = v
    return out


def _app_id(app: str | None) -> str | None:
    if app is None or app.startswith("ap-"):
        return app
    for a in api("GET", "/apps"):
        if a["name"] == app:
            return a["app_id"]
    raise click.ClickException(f"no app named {app!r} (see `shoal app list`)")


def resolve(ref: str, app: str | None = None) -> dict:
    """A sandbox by id (sb-...) or by name among running sandboxes (of --app, if given)."""
    if ref.startswith("sb-"):
        return api("GET", f"/ops/sandboxes/{ref}")
    params = {"app_id": _app_id(app)} if app else {}
    found = [s for s in api("GET", "/ops/sandboxes", params=params) if s["name"] == ref]
    if not found:
        raise click.ClickException(f"no running sandbox has the id or name {ref!r} "
                                   "(see `shoal sandbox list`)")
    if len(found) > 1:
        apps = ", ".join(sorted(s["app_name"] or s["app_id"] for s in found))
        raise click.ClickException(f"{len(found)} running sandboxes are named {ref!r} (apps "
                                   f"{apps}); give its id, or --app")
    return found[0]


def _age(ts: float) -> str:
    return human_duration(time.time() - ts)


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


@click.group()
def sandbox() -> None:
    """Sandboxes: list, inspect, logs, exec, shell, stop, stats."""


@sandbox.command("list")
@click.option("--app", help="Only this app's (name or id).")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Only with this tag "
              "(repeatable; all must match).")
@click.option("-a", "--all", "show_all", is_flag=True, help="Include finished sandboxes.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def sandbox_list(app, tags, show_all, as_json) -> None:
    """Running sandboxes (with --all, finished ones too)."""
    params = {"include_finished": show_all}
    if app:
        params["app_id"] = _app_id(app)
    if tags:
        params["tags"] = json.dumps(_parse_tags(tags))
    rows = api("GET", "/ops/sandboxes", params=params)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    _table([[s["sandbox_id"], s["app_name"] or s["app_id"], s["name"] or "-",
             s["state"] if s["state"] == "running" else f"{s['end_reason']} ({s['returncode']})",
             (s["image_id"] or "-")[:19], _age(s["created_at"]),
             ",".join(f"{k}={v}" for k, v in s["tags"].items()) or "-"] for s in rows],
           ["ID", "APP", "NAME", "STATE", "IMAGE", "AGE", "TAGS"])


@sandbox.command("inspect")
@click.argument("ref", metavar="ID|NAME")
@click.option("--app", help="The app, when NAME is used in several.")
def sandbox_inspect(ref, app) -> None:
    """Everything about one sandbox, as JSON."""
    click.echo(json.dumps(resolve(ref, app), indent=1))


def _copy_stream(path: str, params: dict, out, errors: list) -> None:
    try:
        with connect(timeout=None) as c, c.stream("GET", path, params=params) as r:
            if r.status_code >= 400:
                from shoal._client import _error_from

                errors.append(_error_from(r.status_code, r.read()))
                return
            for chunk in r.iter_raw():
                out.write(chunk)
                out.flush()
    except Exception as e:  # reported by the caller, once
        errors.append(e)


@sandbox.command("logs")
@click.argument("ref", metavar="ID|NAME")
@click.option("-f", "--follow", is_flag=True, help="Keep printing output until the sandbox ends.")
@click.option("--app", help="The app, when NAME is used in several.")
def sandbox_logs(ref, follow, app) -> None:
    """The entrypoint's output: its stdout on stdout, its stderr on stderr."""
    sid = resolve(ref, app)["sandbox_id"]
    errors: list = []
    threads = [threading.Thread(target=_copy_stream, daemon=True,
                                args=(f"/sandboxes/{sid}/logs/{stream}",
                                      {"follow": follow}, out, errors))
               for stream, out in (("stdout", sys.stdout.buffer), ("stderr", sys.stderr.buffer))]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.2)
    if errors:
        raise errors[0] if not isinstance(errors[0], OSError) else NoServer(str(errors[0]))


@sandbox.command("exec", context_settings={"ignore_unknown_options": True,
                                           "allow_interspersed_args": False})
@click.option("-i", "--interactive", is_flag=True, help="Send this terminal's input.")
@click.option("-t", "--tty", is_flag=True, help="Run in a pseudo-terminal.")
@click.option("--app", help="The app, when NAME is used in several.")
@click.argument("ref", metavar="ID|NAME")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def sandbox_exec(interactive, tty, app, ref, command) -> None:
    """Run COMMAND in a sandbox: `shoal sandbox exec -it ID -- bash`. Exits with its exit code."""
    from shoal.cli.terminal import run

    command = list(command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise click.UsageError("give the command after the sandbox: exec ID -- CMD...")
    sid = resolve(ref, app)["sandbox_id"]
    sys.exit(run(sid, command, pty=tty, interactive=interactive))


@click.command("shell")
@click.argument("ref", metavar="ID|NAME")
@click.option("--app", help="The app, when NAME is used in several.")
@click.option("--cmd", default=None, help="Run this instead of bash (or sh).")
def shell(ref, app, cmd) -> None:
    """An interactive shell in a running sandbox (a real terminal: colours, resize, Ctrl-C).

    Leave it with `exit` or Ctrl-D; the sandbox keeps running.
    """
    from shoal.cli.terminal import run

    sid = resolve(ref, app)["sandbox_id"]
    argv = ["/bin/sh", "-c", cmd] if cmd else SHELL
    sys.exit(run(sid, argv, pty=True, interactive=True))


sandbox.add_command(shell)


@sandbox.command("stop")
@click.argument("refs", metavar="ID|NAME...", nargs=-1)
@click.option("--all", "stop_all", is_flag=True, help="Stop every running sandbox.")
@click.option("--app", help="With --all: only this app's. Else: the app of NAMEs.")
def sandbox_stop(refs, stop_all, app) -> None:
    """Terminate sandboxes (their processes get SIGKILL; returncode 137)."""
    if stop_all == bool(refs):
        raise click.UsageError("give sandbox ids or names, or --all")
    if stop_all:
        params = {"app_id": _app_id(app)} if app else {}
        ids = [s["sandbox_id"] for s in api("GET", "/ops/sandboxes", params=params)]
    else:
        ids = [resolve(r, app)["sandbox_id"] for r in refs]
    for sid in ids:
        api("POST", f"/sandboxes/{sid}/terminate")
        click.echo(sid)


def _stats_rows(rows: list[dict], names: dict[str, str]) -> list[list[str]]:
    out = []
    for r in rows:
        limit = r["memory_limit"]
        mem = human_bytes(r["memory_bytes"]) + (f" / {human_bytes(limit)}" if limit else "")
        cpu = "-" if r["cpu_percent"] is None else f"{r['cpu_percent']:.1f}%"
        out.append([r["sandbox_id"], names.get(r["sandbox_id"]) or "-", cpu, mem,
                    human_bytes(r["disk_bytes"]), str(r["pids"])])
    return out


@sandbox.command("stats")
@click.option("--no-stream", is_flag=True, help="Print once and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON once (implies --no-stream).")
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds between refreshes.")
def sandbox_stats(no_stream, as_json, interval) -> None:
    """CPU, memory, disk and processes of each running sandbox, read on the host (like
    `docker stats`); refreshes until Ctrl-C unless --no-stream."""
    rows = api("GET", "/stats")
    if any(r["cpu_percent"] is None for r in rows):
        time.sleep(0.5)  # CPU % needs two samples
        rows = api("GET", "/stats")
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    header = ["ID", "NAME", "CPU %", "MEMORY", "DISK", "PIDS"]
    while True:
        names = {s["sandbox_id"]: s["name"] for s in api("GET", "/ops/sandboxes")}
        if not no_stream and sys.stdout.isatty():
            click.echo("\x1b[2J\x1b[H", nl=False)
        _table(_stats_rows(rows, names), header)
        if no_stream:
            return
        time.sleep(interval)
        rows = api("GET", "/stats")


@click.group()
def app() -> None:
    """Apps: list, stop."""


@app.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def app_list(as_json) -> None:
    """Apps, with how many sandboxes each runs."""
    rows = api("GET", "/apps")
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    _table([[a["app_id"], a["name"], str(a["sandboxes_running"]),
             datetime.datetime.fromtimestamp(a["created_at"]).strftime("%Y-%m-%d %H:%M")]
            for a in rows], ["ID", "NAME", "SANDBOXES", "CREATED"])


@app.command("stop")
@click.argument("ref", metavar="NAME|ID")
def app_stop(ref) -> None:
    """Terminate every running sandbox of an app."""
    app_id = _app_id(ref)
    n = api("POST", f"/apps/{app_id}/stop")["terminated"]
    click.echo(f"terminated {n} sandbox(es) of {ref}")
