"""Cloud bucket mounts: an S3-compatible bucket mounted on the host by s3fs-fuse, then bind-mounted
into a sandbox (so the sandbox needs no FUSE device, under runc or gVisor alike).

Why s3fs and not rclone: see docs/buckets.md (measured on this machine). In short: s3fs uploads a
written file before `close()` returns and reports a dead endpoint as EIO on writes too; rclone's
streaming mode failed against an S3 server here and its caching mode acknowledges writes that it
uploads later (and loses if the sandbox ends first).

Layout: `$SHOAL_HOME/buckets/` (0700, so other host users cannot reach a mount even though it is
mounted `allow_other`) holds one directory per mount, `<sandbox id>-<n>/`, with `mnt/` (the FUSE
mount point), `tmp/` (s3fs's spool for files being written: on disk, not in memory), `pid` and
`log` (0600).

Credentials reach only the environment of the s3fs process (`AWSACCESSKEYID`, ...): not its command
line, not a file, not the sandbox (whose `/proc/mounts` shows `s3fs`), not a log line or an error
message (s3fs's own output is scrubbed of them before it is shown).

Lifetime: mounted before the container starts (a failure is an error of `create`, before anything
runs); unmounted (lazily: the container's copy of the mount is already gone with its namespace) and
the s3fs process ended when the sandbox ends. s3fs is started in its own session, so a server that
is killed leaves the mounts of running sandboxes working; the next server's `reconcile` unmounts
those whose sandbox it did not adopt.

Every external command runs with a timeout; nothing here blocks the event loop for long (the
mountinfo poll is a small file read).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from shoal.exception import ExecutionError, InvalidError

log = logging.getLogger("shoal.buckets")

S3FS = "s3fs"
FUSERMOUNT = "fusermount3"
MOUNT_TIMEOUT = 30.0  # s3fs checks the bucket (and credentials) before it mounts
COMMAND_TIMEOUT = 15.0
STOP_GRACE = 5.0
# An endpoint that stops answering gives EIO after about connect + readwrite timeout x retries.
S3FS_TIMEOUTS = "connect_timeout=5,readwrite_timeout=10,retries=2"
PASS_ENV = ("PATH", "LANG", "SSL_CERT_FILE", "SSL_CERT_DIR", "CURL_CA_BUNDLE")


def check_spec(spec) -> None:
    """Modal's rules for CloudBucketMount, checked again on the server."""
    if not spec.bucket_name or "/" in spec.bucket_name or "\x00" in spec.bucket_name:
        raise InvalidError(f"invalid bucket_name {spec.bucket_name!r}")
    if spec.key_prefix is not None:
        if not spec.key_prefix.endswith("/"):
            raise InvalidError("key_prefix will be prefixed to all object paths, so it must end "
                               f"in a '/', got {spec.key_prefix!r}")
        if spec.key_prefix.startswith("/") or ".." in spec.key_prefix.split("/"):
            raise InvalidError(f"key_prefix {spec.key_prefix!r} must be relative, without '..'")
    if spec.bucket_endpoint_url is not None:
        u = urlsplit(spec.bucket_endpoint_url)
        if u.scheme not in ("http", "https") or not u.hostname or u.username or u.password:
            raise InvalidError("bucket_endpoint_url must be an http(s) URL without credentials, "
                               f"like https://s3.example.com, got {spec.bucket_endpoint_url!r}")
    if any(c in (spec.bucket_endpoint_url or "") for c in ",\n\x00"):
        raise InvalidError("bucket_endpoint_url must not contain ',' or control characters")


def _credentials(env: dict[str, str], spec) -> dict[str, str]:
    """The s3fs environment for these credentials (empty: a public bucket)."""
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if bool(key) != bool(secret):
        raise InvalidError("the bucket's secret needs both AWS_ACCESS_KEY_ID and "
                           "AWS_SECRET_ACCESS_KEY (or neither, for a public bucket)")
    if spec.requester_pays and not key:
        raise InvalidError("Credentials required in order to use Requester Pays.")
    if not key:
        return {}
    out = {"AWSACCESSKEYID": key, "AWSSECRETACCESSKEY": secret}
    if env.get("AWS_SESSION_TOKEN"):
        out["AWSSESSIONTOKEN"] = env["AWS_SESSION_TOKEN"]
    return out


def _path_style(spec) -> bool:
    if spec.force_path_style:
        return True
    host = urlsplit(spec.bucket_endpoint_url or "").hostname or ""
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
        return True  # virtual-host style cannot work with an address
    except ValueError:
        return False


def _scrub(text: str, secrets: list[str]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


def _mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def _alive_with(pid: int, marker: str) -> bool:
    """True if `pid` runs and its command line contains `marker` (guards against pid reuse)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return marker.encode() in f.read()
    except OSError:
        return False


class BucketMounts:
    """Mounts of sandboxes' buckets. Runs on the server's event loop; `self.procs` (the s3fs
    children this process started) is touched only there, so it needs no lock."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o700)
        self.procs: dict[Path, asyncio.subprocess.Process] = {}

    async def mount_all(self, sandbox_id: str, specs: list,
                        resolve: Callable[[list[str]], dict[str, str]]
                        ) -> list[tuple[str, str, bool]]:
        """Mount every bucket of a sandbox; (host path, sandbox path, read_only) of each, for the
        runtime to bind in. On any failure
        what was mounted is undone and the error raised (InvalidError for a bad argument,
        ExecutionError when the bucket cannot be reached or the credentials are refused)."""
        mounts = []
        try:
            for n, spec in enumerate(specs):
                check_spec(spec)
                env = dict(spec.secret_env or {})
                if spec.secret_id:
                    env = {**resolve([spec.secret_id]), **env}
                host = await self._mount_one(self.root / f"{sandbox_id}-{n}", spec,
                                             _credentials(env, spec), env.get("AWS_REGION"))
                mounts.append((str(host), os.path.normpath(spec.path), spec.read_only))
        except BaseException:
            await self.unmount_all(sandbox_id)
            raise
        return mounts

    async def _mount_one(self, d: Path, spec, creds: dict[str, str], region: str | None) -> Path:
        mnt, tmp = d / "mnt", d / "tmp"
        for p in (d, mnt, tmp):
            p.mkdir(mode=0o700, exist_ok=True)
        target = spec.bucket_name
        if spec.key_prefix:
            target += ":/" + spec.key_prefix.rstrip("/")
        # Every user of every sandbox may read and write (ro aside): s3fs judges access itself,
        # by the caller's host uid, and root of a runc sandbox is a host uid of its range (its
        # user namespace), not the mount's owner. uid/gid 0: objects show no host uid.
        opts = ["allow_other", "uid=0", "gid=0", "umask=0000", "mp_umask=0000",
                "complement_stat", f"tmpdir={tmp}",
                S3FS_TIMEOUTS, f"logfile={d / 'log'}", "dbglevel=err"]
        if spec.bucket_endpoint_url:
            opts.append(f"url={spec.bucket_endpoint_url.rstrip('/')}")
        if _path_style(spec):
            opts.append("use_path_request_style")
        if region:
            opts.append(f"endpoint={region}")
        if not creds:
            opts.append("public_bucket=1")
        if spec.requester_pays:
            opts.append("requester_pays")
        if spec.read_only:
            opts.append("ro")
        env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
        env.update(creds, HOME=str(d))
        log_fd = os.open(d / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            proc = await asyncio.create_subprocess_exec(
                S3FS, target, str(mnt), "-f", "-o", ",".join(opts), env=env,
                stdin=asyncio.subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                start_new_session=True)
        finally:
            os.close(log_fd)
        self.procs[d] = proc
        (d / "pid").write_text(str(proc.pid))
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not _mounted(mnt):
            if proc.returncode is not None or time.monotonic() > deadline:
                detail = _scrub((d / "log").read_text(errors="replace"), list(creds.values()))
                where = spec.bucket_endpoint_url or "AWS S3"
                raise ExecutionError(
                    f"cannot mount bucket {spec.bucket_name!r} at {spec.path} from {where}: "
                    + (_explain(detail) if proc.returncode is not None
                       else f"no answer within {MOUNT_TIMEOUT:.0f} s"))
            await asyncio.sleep(0.05)
        # s3fs mounts first in some versions: listing once proves the bucket answers.
        try:
            await asyncio.wait_for(asyncio.to_thread(os.listdir, mnt), COMMAND_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as e:
            detail = _scrub((d / "log").read_text(errors="replace"), list(creds.values()))
            where = spec.bucket_endpoint_url or "AWS S3"
            raise ExecutionError(f"cannot mount bucket {spec.bucket_name!r} at {spec.path} from "
                                 f"{where}: {_explain(detail) or e}") from None
        return mnt

    async def unmount_all(self, sandbox_id: str) -> None:
        for d in sorted(self.root.glob(f"{sandbox_id}-*")):
            await self._unmount(d)

    async def _unmount(self, d: Path) -> None:
        mnt = d / "mnt"
        if _mounted(mnt):
            await _run(FUSERMOUNT, "-u", "-z", str(mnt))
        if _mounted(mnt):
            await _run("umount", "-l", str(mnt))
        proc = self.procs.pop(d, None)
        pid = proc.pid if proc else None
        if pid is None:
            with contextlib.suppress(OSError, ValueError):
                pid = int((d / "pid").read_text())
        if pid and _alive_with(pid, str(mnt)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE
            while _alive_with(pid, str(mnt)) and time.monotonic() < deadline:
                if proc and proc.returncode is not None:
                    break
                await asyncio.sleep(0.05)
            if _alive_with(pid, str(mnt)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if proc is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), STOP_GRACE)
        if _mounted(mnt):
            log.error("bucket mount %s is still mounted; leaving its directory", mnt)
            return
        # Only now, with nothing mounted there, is removing the directory safe (an rmtree through
        # a live mount would delete the bucket's objects).
        shutil.rmtree(d, ignore_errors=True)

    async def reconcile(self, running: set[str]) -> None:
        """After a restart: unmount what belongs to sandboxes that are not running."""
        for d in sorted(self.root.iterdir()):
            if d.name.rsplit("-", 1)[0] not in running:
                log.info("unmounting bucket mount %s left by an earlier server", d.name)
                await self._unmount(d)


def _explain(log_text: str) -> str:
    """The useful line of s3fs's output."""
    codes = re.findall(r"<Code>([A-Za-z]+)</Code>", log_text)
    status = re.findall(r"HTTP response code (\d+)", log_text)
    if codes:
        hint = {"InvalidAccessKeyId": "the access key is not known: check the secret's "
                                      "AWS_ACCESS_KEY_ID",
                "SignatureDoesNotMatch": "the credentials were refused: check the secret's "
                                         "AWS_SECRET_ACCESS_KEY",
                "AccessDenied": "access denied for these credentials",
                "NoSuchBucket": "no such bucket"}.get(codes[-1], "")
        return f"{codes[-1]}{' (HTTP ' + status[-1] + ')' if status else ''}" + \
            (f": {hint}" if hint else "")
    lines = [re.sub(r"^\S+Z \[\w+\] \S+ ", "", ln.strip())
             for ln in log_text.splitlines() if ln.strip()]
    for key in ("credentials", "Forbidden", "403", "AccessDenied", "InvalidAccessKeyId",
                "SignatureDoesNotMatch", "NoSuchBucket", "404", "Could not connect",
                "Couldn't connect", "unable to connect", "Timeout", "resolve"):
        for ln in lines:
            if key.lower() in ln.lower():
                return ln[-300:]
    return (lines[-1] if lines else "s3fs exited")[-300:]


async def _run(*args: str) -> int:
    proc = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL)
    try:
        return await asyncio.wait_for(proc.wait(), COMMAND_TIMEOUT)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return -1
