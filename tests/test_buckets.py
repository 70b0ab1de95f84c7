"""CloudBucketMount against a real S3-protocol server on loopback (moto_server, IAM auth on):
s3fs mounts on the host, bound into the sandbox; credentials never reach it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

import shoal
from conftest import (TEST_RUNTIME, TEST_USERNS, _bucket_mount_processes, leftovers,
                      sandbox_host_pid)
from s3_util import start_s3
from shoal.exception import ExecutionError, InvalidError


@pytest.fixture(scope="module")
def s3(server):
    # Without IAM auth: moto's signature check rejects s3fs's listings (their empty `prefix=`
    # parameter); wrong credentials are tested against `s3_auth`.
    srv = start_s3(auth=False)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def s3_auth(server):
    srv = start_s3(auth=True)
    yield srv
    srv.stop()


@pytest.fixture
def bucket(s3):
    name = f"b-{uuid.uuid4().hex[:10]}"
    c = s3.client()
    c.create_bucket(Bucket=name)
    c.put_object(Bucket=name, Key="top.txt", Body=b"top\n")
    c.put_object(Bucket=name, Key="data/a.csv", Body=b"x,y\n1,2\n")
    c.put_object(Bucket=name, Key="data/sub/deep.txt", Body=b"deep\n")
    return name


def creds(s3) -> shoal.Secret:
    return shoal.Secret.from_dict({"AWS_ACCESS_KEY_ID": s3.key, "AWS_SECRET_ACCESS_KEY": s3.secret,
                                   "AWS_REGION": "us-east-1"})


def sh(sb, cmd: str, timeout: int = 120) -> tuple[int, str, str]:
    p = sb.exec("sh", "-c", cmd, timeout=timeout)
    out, err = p.stdout.read(), p.stderr.read()
    return p.wait(), out, err


def home() -> Path:
    return Path(os.environ["SHOAL_HOME"])


def test_argument_rules():
    with pytest.raises(InvalidError, match="must end in a '/'"):
        shoal.CloudBucketMount("b", key_prefix="data")
    with pytest.raises(InvalidError, match="Requester Pays"):
        shoal.CloudBucketMount("b", requester_pays=True)
    with pytest.raises(InvalidError, match="http"):
        shoal.CloudBucketMount("b", bucket_endpoint_url="ftp://x")
    with pytest.raises(InvalidError):
        shoal.CloudBucketMount("b", oidc_auth_role_arn="arn:aws:iam::1:role/x")
    with pytest.raises(InvalidError):
        shoal.CloudBucketMount("a/b")
    with pytest.raises(InvalidError):
        shoal.Sandbox.create(volumes={"/data": "not a mount"})


def test_read_write_list_rename_append(app, s3, bucket):
    m = shoal.CloudBucketMount(bucket, bucket_endpoint_url=s3.endpoint, secret=creds(s3))
    sb = shoal.Sandbox.create(app=app, volumes={"/data": m}, timeout=120)
    c = s3.client()
    try:
        assert sh(sb, "cat /data/top.txt /data/data/a.csv")[1] == "top\nx,y\n1,2\n"
        # prefixes are directories, also without marker objects
        assert sh(sb, "ls /data")[1].split() == ["data", "top.txt"]
        assert sh(sb, "ls /data/data")[1].split() == ["a.csv", "sub"]
        assert sh(sb, "test -d /data/data/sub && cat /data/data/sub/deep.txt")[1] == "deep\n"
        # a written file is in the bucket when close() has returned
        assert sh(sb, "echo new > /data/new.txt")[0] == 0
        assert c.get_object(Bucket=bucket, Key="new.txt")["Body"].read() == b"new\n"
        # objects written outside appear inside (after the stat cache)
        c.put_object(Bucket=bucket, Key="outside.txt", Body=b"out\n")
        assert sh(sb, "cat /data/outside.txt")[1] == "out\n"
        # append rewrites the object whole
        assert sh(sb, "echo more >> /data/new.txt")[0] == 0
        assert c.get_object(Bucket=bucket, Key="new.txt")["Body"].read() == b"new\nmore\n"
        # rename = copy + delete
        assert sh(sb, "mv /data/new.txt /data/data/renamed.txt")[0] == 0
        keys = {o["Key"] for o in c.list_objects_v2(Bucket=bucket)["Contents"]}
        assert "data/renamed.txt" in keys and "new.txt" not in keys
        assert sh(sb, "mkdir /data/made && echo z > /data/made/z && rm /data/top.txt")[0] == 0
        keys = {o["Key"] for o in c.list_objects_v2(Bucket=bucket)["Contents"]}
        assert "made/z" in keys and "top.txt" not in keys
        # the sandbox's view of the mount names no credentials
        mounts = sh(sb, "cat /proc/mounts")[1]
        # (gVisor shows its own 9p mount of the host's s3fs mount)
        assert (" /data fuse.s3fs " if TEST_RUNTIME == "runc" else " /data 9p ") in mounts
        assert s3.key not in mounts and s3.secret not in mounts
        env = sh(sb, "cat /proc/1/environ | tr '\\0' '\\n'; env")[1]
        assert s3.key not in env and s3.secret not in env
        # ... nor does any host process's command line
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    cmdline = (entry / "cmdline").read_bytes()
                except OSError:
                    continue
                assert s3.secret.encode() not in cmdline and s3.key.encode() not in cmdline, \
                    f"pid {entry.name}: {cmdline[:300]!r}"
        # the server keeps no copy of inline credentials in the sandbox's record
        db = (home() / "state.db").read_bytes() + (home() / "state.db-wal").read_bytes() \
            if (home() / "state.db-wal").exists() else (home() / "state.db").read_bytes()
        assert s3.secret.encode() not in db
    finally:
        sb.terminate()
    assert not [f for f in leftovers(home(), server_may_run=True) if "bucket" in f]
    assert not _bucket_mount_processes(home())
    for f in (home() / "logs").rglob("*"):
        if f.is_file():
            assert s3.secret not in f.read_text(errors="replace")


def _kernel(sb) -> str:
    return sh(sb, "dmesg 2>/dev/null | head -3; uname -r")[1]


@pytest.mark.parametrize("runtime", ["runc", "gvisor"])
def test_each_runtime_reads_writes_and_honours_read_only(app, s3, bucket, runtime):
    """The same host-side mount serves both runtimes (gVisor reaches it through its gofer):
    whatever the session's default runtime, each is asked for by name."""
    rw = shoal.CloudBucketMount(bucket, bucket_endpoint_url=s3.endpoint, secret=creds(s3))
    ro = shoal.CloudBucketMount(bucket, bucket_endpoint_url=s3.endpoint, key_prefix="data/",
                                secret=creds(s3), read_only=True)
    sb = shoal.Sandbox.create(app=app, volumes={"/rw": rw, "/ro": ro}, timeout=120,
                              experimental_options={"runtime": runtime})
    c = s3.client()
    try:
        assert sb.runtime == runtime
        assert ("gVisor" in _kernel(sb)) == (runtime == "gvisor")
        assert sh(sb, "cat /rw/top.txt /ro/a.csv")[1] == "top\nx,y\n1,2\n"
        assert sh(sb, "ls /ro")[1].split() == ["a.csv", "sub"]
        assert sh(sb, f"echo {runtime} > /rw/from-{runtime}.txt")[0] == 0
        assert c.get_object(Bucket=bucket, Key=f"from-{runtime}.txt")["Body"].read() \
            == f"{runtime}\n".encode()
        assert sh(sb, "echo more >> /rw/top.txt")[0] == 0  # append: uploaded at close too
        assert c.get_object(Bucket=bucket, Key="top.txt")["Body"].read() == b"top\nmore\n"
        c.put_object(Bucket=bucket, Key="data/later.txt", Body=b"later\n")
        assert sh(sb, "cat /ro/later.txt")[1] == "later\n"
        rc, _, err = sh(sb, "echo x > /ro/nope.txt")
        assert rc != 0 and "Read-only file system" in err, err
        rc, _, err = sh(sb, "rm /ro/a.csv")
        assert rc != 0 and "Read-only file system" in err, err
        assert "data/a.csv" in {o["Key"] for o in c.list_objects_v2(Bucket=bucket)["Contents"]}
        env = sh(sb, "cat /proc/1/environ | tr '\\0' '\\n'; env; cat /proc/mounts")[1]
        assert s3.key not in env and s3.secret not in env
    finally:
        sb.terminate()
    assert not _bucket_mount_processes(home())


@pytest.mark.skipif(not TEST_USERNS, reason="runc with user namespaces (SHOAL_USERNS=1)")
def test_a_bucket_mount_keeps_the_user_namespace(app, s3, bucket):
    """A bucket mount is no way out of the user namespace: root of a sandbox with one is still a
    host uid of its range (fails if bucket sandboxes run as host root), and root and another user
    of the sandbox both read and write the bucket (s3fs judges access by the caller's host uid:
    fails with the mount's old umask=0022, which left root inside read-only)."""
    m = shoal.CloudBucketMount(bucket, bucket_endpoint_url=s3.endpoint, secret=creds(s3))
    sb = shoal.Sandbox.create(app=app, volumes={"/data": m}, timeout=120)
    try:
        uid = [line for line in Path(f"/proc/{sandbox_host_pid(sb)}/status").read_text()
               .splitlines() if line.startswith("Uid:")][0].split()[1:]
        assert all(int(u) >= 65536 for u in uid), uid
        assert sh(sb, "echo root > /data/by-root.txt && cat /data/top.txt")[0:2] == (0, "top\n")
        rc, out, err = sh(sb, "setpriv --reuid=1000 --regid=1000 --clear-groups sh -c "
                              "'echo user > /data/by-user.txt && cat /data/by-root.txt'")
        assert (rc, out) == (0, "root\n"), err
        c = s3.client()
        assert c.get_object(Bucket=bucket, Key="by-user.txt")["Body"].read() == b"user\n"
    finally:
        sb.terminate()


def test_key_prefix_and_read_only_with_named_secret(app, s3, bucket):
    name = f"s3-{uuid.uuid4().hex[:6]}"
    shoal.Secret.objects.create(name, {"AWS_ACCESS_KEY_ID": s3.key,
                                       "AWS_SECRET_ACCESS_KEY": s3.secret})
    try:
        m = shoal.CloudBucketMount(bucket, bucket_endpoint_url=s3.endpoint, key_prefix="data/",
                                   secret=shoal.Secret.from_name(name), read_only=True)
        sb = shoal.Sandbox.create(app=app, volumes={"/in": m}, timeout=120)
        try:
            assert sh(sb, "ls /in")[1].split() == ["a.csv", "sub"]
            rc, _, err = sh(sb, "echo x > /in/nope.txt")
            assert rc != 0 and "Read-only file system" in err
            rc, _, err = sh(sb, "rm /in/a.csv")
            assert rc != 0 and "Read-only file system" in err
            assert sh(sb, "cat /in/a.csv")[1] == "x,y\n1,2\n"
        finally:
            sb.terminate()
    finally:
        shoal.Secret.objects.delete(name)


def test_bad_credentials_and_unreachable_endpoint_fail_create(app, s3, s3_auth, bucket):
    s3_auth.client().create_bucket(Bucket="authed")
    before = set(s.object_id for s in shoal.Sandbox.list())
    wrong = shoal.Secret.from_dict({"AWS_ACCESS_KEY_ID": "AKIAWRONGWRONG",
                                    "AWS_SECRET_ACCESS_KEY": "wrong-secret-value"})
    t = time.monotonic()
    with pytest.raises(ExecutionError, match="cannot mount bucket") as e:
        shoal.Sandbox.create(app=app, volumes={"/d": shoal.CloudBucketMount(
            "authed", bucket_endpoint_url=s3_auth.endpoint, secret=wrong)})
    assert "wrong-secret-value" not in str(e.value)
    with pytest.raises(ExecutionError, match="cannot mount bucket"):
        shoal.Sandbox.create(app=app, volumes={"/d": shoal.CloudBucketMount(
            bucket, bucket_endpoint_url="http://127.0.0.1:9", secret=creds(s3))})
    with pytest.raises(ExecutionError, match="cannot mount bucket"):
        shoal.Sandbox.create(app=app, volumes={"/d": shoal.CloudBucketMount(
            "no-such-bucket-here", bucket_endpoint_url=s3.endpoint, secret=creds(s3))})
    assert time.monotonic() - t < 90
    assert set(s.object_id for s in shoal.Sandbox.list()) == before
    assert not _bucket_mount_processes(home())
    assert not list((home() / "buckets").iterdir())


def test_endpoint_dying_gives_io_errors_and_terminate_cleans_up(app, bucket, s3):
    own = start_s3(auth=False)
    try:
        own.client().create_bucket(Bucket="dying")
        own.client().put_object(Bucket="dying", Key="f.txt", Body=b"f\n")
        m = shoal.CloudBucketMount("dying", bucket_endpoint_url=own.endpoint,
                                   secret=creds(own))
        sb = shoal.Sandbox.create(app=app, volumes={"/d": m}, timeout=900)
        try:
            assert sh(sb, "cat /d/f.txt")[1] == "f\n"
            own.stop()
            # s3fs gives up after its retries: ~30 s per operation here under runc, about twice
            # that under gVisor (one more lookup per operation); the exec timeouts leave room.
            rc, _, err = sh(sb, "cat /d/other.txt; echo x > /d/new.txt", timeout=400)
            assert rc != 0 and ("Input/output error" in err or "No such file" in err), err
            rc, _, err = sh(sb, "echo y > /d/new2.txt", timeout=400)
            assert rc != 0 and "Input/output error" in err, err
            assert sh(sb, "echo alive")[1] == "alive\n"
            # the server keeps serving others meanwhile
            assert shoal.App.lookup("tests").app_id
        finally:
            sb.terminate()
        assert not _bucket_mount_processes(home())
        assert not list((home() / "buckets").iterdir())
    finally:
        own.stop()


def test_restart_after_kill_9_unmounts_what_it_left(app, server, s3, bucket):
    m = shoal.CloudBucketMount(bucket, bucket_endpoint_url=s3.endpoint, secret=creds(s3))
    kept = shoal.Sandbox.create(app=app, volumes={"/d": m}, timeout=180)
    gone = shoal.Sandbox.create(app=app, volumes={"/d": m}, timeout=180)
    assert len(_bucket_mount_processes(home())) == 2
    runtime = "runc" if TEST_RUNTIME == "runc" else "runsc"
    gone_pid = int(subprocess.run([runtime, "--root", str(home() / runtime), "state",
                                   gone.object_id], capture_output=True, text=True, check=True,
                                  timeout=30).stdout.split('"pid": ')[1].split(",")[0])
    server.kill(signal.SIGKILL)
    os.kill(gone_pid, signal.SIGKILL)  # its sandbox dies while no server runs
    assert len(_bucket_mount_processes(home())) == 2  # mounts outlive a killed server
    server.start()
    try:
        assert len(_bucket_mount_processes(home())) == 1
        assert sh(kept, "cat /d/data/a.csv")[1] == "x,y\n1,2\n"  # adopted, mount kept
    finally:
        kept.terminate()
    assert not _bucket_mount_processes(home())
    assert not list((home() / "buckets").iterdir())


@pytest.mark.slow
def test_one_gib_file_is_streamed_not_buffered(app, s3, bucket):
    m = shoal.CloudBucketMount(bucket, bucket_endpoint_url=s3.endpoint, secret=creds(s3))
    sb = shoal.Sandbox.create(app=app, volumes={"/d": m}, timeout=600)
    try:
        (pid,) = _bucket_mount_processes(home())
        rc, _, err = sh(sb, "dd if=/dev/zero of=/d/big bs=4M count=256 2>&1 | tail -1")
        assert rc == 0, err
        head = s3.client().head_object(Bucket=bucket, Key="big")
        assert head["ContentLength"] == 1 << 30
        rc, out, _ = sh(sb, "wc -c < /d/big")
        assert out.strip() == str(1 << 30)
        peak_kib = int([ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
                        if ln.startswith("VmHWM")][0].split()[1])
        assert peak_kib < 256 * 1024, f"s3fs peaked at {peak_kib} KiB for a 1 GiB file"
        print(f"s3fs peak RSS for 1 GiB written and read: {peak_kib / 1024:.0f} MiB")
    finally:
        sb.terminate()
        s3.client().delete_object(Bucket=bucket, Key="big")
