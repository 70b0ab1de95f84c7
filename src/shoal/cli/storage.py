"""`shoal volume ...` and `shoal nfs ...`: the storage commands, built on the public SDK."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path, PurePosixPath

import click

PROGRESS_THRESHOLD = 4 << 20  # show a progress bar for transfers larger than this


@contextlib.contextmanager
def progress(total: int, what: str):
    """A callback that advances a bytes/rate/ETA bar on stderr (only for large transfers)."""
    if total < PROGRESS_THRESHOLD:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


def _entry_json(e) -> dict:
    return {"path": e.path, "type": e.type.name.lower(), "size": e.size,
            "mtime": datetime.datetime.fromtimestamp(e.mtime).isoformat()}


def _print_entries(entries, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([_entry_json(e) for e in entries], indent=1))
        return
    for e in entries:
        suffix = "/" if e.type.name == "DIRECTORY" else ""
        when = datetime.datetime.fromtimestamp(e.mtime).strftime("%Y-%m-%d %H:%M")
        click.echo(f"{e.type.name.lower():9} {e.size:>12}  {when}  {e.path}{suffix}")


def _safe_local_target(base: Path, rel: str) -> Path:
    target = (base / rel).resolve()
    if base.resolve() not in (target, *target.parents):
        raise click.ClickException(f"refusing to write {rel!r} outside {base}")
    return target


def _download(obj, remote: str, local: str, force: bool) -> None:
    entries = obj.listdir(remote)
    single = len(entries) == 1 and entries[0].path == remote.strip("/") \
        and entries[0].type.name == "FILE"
    if local == "-":
        if not single:
            raise click.ClickException(f"{remote!r} is not a file; '-' needs a single file")
        for chunk in obj.read_file(remote):
            sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        return
    if single:
        files = [(entries[0], PurePosixPath(entries[0].path).name)]
        dest_base = Path(local)
        if dest_base.is_dir():
            pairs = [(files[0][0], dest_base / files[0][1])]
        else:
            pairs = [(files[0][0], dest_base)]
    else:
        root = remote.strip("/")
        all_entries = obj.listdir(remote, recursive=True)
        base = Path(local)
        pairs = []
        for e in all_entries:
            if e.type.name != "FILE":
                continue
            rel = e.path[len(root):].lstrip("/") if root else e.path
            pairs.append((e, _safe_local_target(base, rel)))
    if not force:
        for _, dest in pairs:
            if dest.exists():
                raise click.ClickException(f"{dest} exists; use --force to overwrite")
    total = sum(e.size for e, _ in pairs)
    with progress(total, f"get {remote}") as advance:
        for entry, dest in pairs:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
            try:
                with os.fdopen(fd, "wb") as f:
                    obj.read_file_into_fileobj(entry.path, f, progress_cb=advance)
                os.replace(tmp, dest)
            except BaseException:
                os.unlink(tmp)
                raise


def _local_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def make_group(kind: str) -> click.Group:
    """The command group for one kind: 'volume' or 'nfs'."""
    label = "volume" if kind == "volume" else "network file system"

    def cls():
        import shoal

        return shoal.Volume if kind == "volume" else shoal.NetworkFileSystem

    @click.group(name=kind, help=f"Manage {label}s.")
    def group() -> None:
        pass

    @group.command()
    @click.argument("name")
    def create(name: str) -> None:
        """Create a named {label}."""
        cls().objects.create(name)
        click.echo(f"created {label} {name}")

    @group.command("list")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    def list_(as_json: bool) -> None:
        """List named {label}s."""
        objs = cls().objects.list()
        rows = []
        for o in objs:
            info = o.info()
            rows.append({"name": o.name, "id": o.object_id,
                         "created_at": info.created_at.isoformat()})
        if as_json:
            click.echo(json.dumps(rows, indent=1))
        else:
            for r in rows:
                click.echo(f"{r['name']:40} {r['id']}  {r['created_at']}")

    @group.command()
    @click.argument("name")
    @click.argument("path", default="/")
    @click.option("-r", "--recursive", is_flag=True)
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    def ls(name: str, path: str, recursive: bool, as_json: bool) -> None:
        """List files (PATH may be a glob: '**/*.py')."""
        _print_entries(cls().from_name(name).listdir(path, recursive=recursive), as_json)

    @group.command()
    @click.argument("name")
    @click.argument("local_path", type=click.Path(exists=True, path_type=Path))
    @click.argument("remote_path", default="/")
    @click.option("-f", "--force", is_flag=True, help="Overwrite existing files.")
    def put(name: str, local_path: Path, remote_path: str, force: bool) -> None:
        """Upload a local file or directory (into REMOTE_PATH if it ends with '/')."""
        obj = cls().from_name(name)
        total = _local_size(local_path)
        if local_path.is_dir():
            remote = remote_path if remote_path != "/" else f"/{local_path.name}"
        else:
            remote = remote_path + local_path.name if remote_path.endswith("/") else remote_path
        with progress(total, f"put {local_path}") as advance:
            if kind == "volume":
                with obj.batch_upload(force=force, progress_cb=advance) as batch:
                    if local_path.is_dir():
                        batch.put_directory(local_path, remote)
                    else:
                        batch.put_file(local_path, remote)
            else:
                if not force and local_path.is_file():
                    with contextlib.suppress(FileNotFoundError):
                        obj.listdir(remote)
                        raise click.ClickException(f"{remote} exists; use --force to overwrite")
                if local_path.is_dir():
                    obj.add_local_dir(local_path, remote, progress_cb=advance)
                else:
                    obj.add_local_file(local_path, remote, progress_cb=advance)
        click.echo(f"uploaded {local_path} to {name}:{remote}", err=True)

    @group.command()
    @click.argument("name")
    @click.argument("remote_path")
    @click.argument("local_path", default=".")
    @click.option("-f", "--force", is_flag=True, help="Overwrite existing local files.")
    def get(name: str, remote_path: str, local_path: str, force: bool) -> None:
        """Download a file or directory; LOCAL_PATH '-' writes a file to stdout."""
        _download(cls().from_name(name), remote_path, local_path, force)

    @group.command()
    @click.argument("name")
    @click.argument("path")
    @click.option("-r", "--recursive", is_flag=True, help="Remove a directory and its contents.")
    def rm(name: str, path: str, recursive: bool) -> None:
        """Remove a file or directory."""
        cls().from_name(name).remove_file(path, recursive=recursive)

    @group.command()
    @click.argument("name")
    @click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
    def delete(name: str, yes: bool) -> None:
        """Delete a named {label} and all its files."""
        if not yes:
            click.confirm(f"Delete {label} {name!r} and all its files?", abort=True)
        cls().objects.delete(name)
        click.echo(f"deleted {label} {name}")

    if kind == "volume":
        @group.command()
        @click.argument("name")
        @click.argument("paths", nargs=-1, required=True)
        @click.option("-r", "--recursive", is_flag=True, help="Copy directories.")
        def cp(name: str, paths: tuple[str, ...], recursive: bool) -> None:
            """Copy within a volume: SRC... DST (like cp)."""
            if len(paths) < 2:
                raise click.UsageError("give at least one source and a destination")
            cls().from_name(name).copy_files(list(paths[:-1]), paths[-1], recursive=recursive)

        @group.command()
        @click.argument("old_name")
        @click.argument("new_name")
        def rename(old_name: str, new_name: str) -> None:
            """Rename a volume."""
            cls().rename(old_name, new_name)
            click.echo(f"renamed {old_name} to {new_name}")

    for command in group.commands.values():
        if command.help:
            command.help = command.help.replace("{label}", label)
    return group
