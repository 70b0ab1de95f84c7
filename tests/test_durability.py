"""Nothing lost, nothing half-written: the server is killed in the middle of uploads."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import shoal
from shoal import config

UPLOAD = """
import io, sys, shoal
name, path, size, kind, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
block = (seed.encode() * 1024)[:1 << 20]
data = io.BytesIO(block * (size >> 20))
print("start", flush=True)
if kind == "volume":
    vol = shoal.Volume.from_name(name)
    with vol.batch_upload(force=True) as b:
        b.put_file(data, path)
else:
    shoal.NetworkFileSystem.from_name(name).write_file(path, data)
print("done", flush=True)
"""


def digest_of(seed: str, size: int) -> str:
    block = (seed.encode() * 1024)[:1 << 20]
    h = hashlib.sha256()
    for _ in range(size >> 20):
        h.update(block)
    return h.hexdigest()


def volume_dir(obj) -> Path:
    return config.paths().volumes / obj.hydrate().object_id


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["volume", "nfs"])
def test_kill_9_during_uploads_never_leaves_a_partial_file(server, kind):
    cls = shoal.Volume if kind == "volume" else shoal.NetworkFileSystem
    name = f"dur-{uuid.uuid4().hex[:8]}"
    obj = cls.from_name(name, create_if_missing=True)
    size = 256 << 20
    complete = {}
    raced = 0  # uploads still running when the server was killed
    for attempt, delay in enumerate((0.0, 0.02, 0.05, 0.1, 0.2, 0.8)):
        path = f"dir/file-{attempt}.bin"
        seed = f"seed{attempt}"
        # SHOAL_SERVER: the uploader never starts a server of its own (the test restarts it).
        env = {**os.environ, "SHOAL_SERVER": f"unix:{config.paths().socket}"}
        proc = subprocess.Popen([sys.executable, "-c", UPLOAD, name, path, str(size), kind, seed],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        assert proc.stdout.readline().strip() == "start"
        time.sleep(delay)
        raced += proc.poll() is None
        # Restarted at once: the uploader may ride through the restart (its retried requests
        # carry idempotency keys) or fail; either way no partial file may be visible.
        server.restart(signal.SIGKILL)
        proc.wait(timeout=90)
        try:
            got = hashlib.sha256(b"".join(obj.read_file(path))).hexdigest()
        except FileNotFoundError:
            continue  # not landed: fine, as long as nothing half-written is visible
        assert got == digest_of(seed, size), f"a partial file is visible after a kill at {delay}s"
        complete[path] = got
    print(kind, "landed:", sorted(complete), "raced the kill:", raced)
    # The test shows something only if uploads were in flight at a kill and some landed whole.
    assert raced >= 2, "the uploads finished before the kills: make them bigger"
    assert complete, "no upload ever landed: the check of whole files saw nothing"
    vdir = volume_dir(obj)
    names = {p.name for p in (vdir / "data" / "dir").iterdir()} if (vdir / "data" / "dir").exists() \
        else set()
    assert names == {Path(p).name for p in complete}, "stray files in the volume"
    assert list((vdir / "staging").iterdir()) == [], "staging was not cleaned at restart"
    cls.objects.delete(name)


def test_named_volume_survives_restarts_byte_for_byte(server, app):
    name = f"dur-{uuid.uuid4().hex[:8]}"
    vol = shoal.Volume.from_name(name, create_if_missing=True)
    files = {f"f{i}.bin": os.urandom(200_000 + i) for i in range(5)}
    import io

    with vol.batch_upload() as batch:
        for path, data in files.items():
            batch.put_file(io.BytesIO(data), path)
    sb = shoal.Sandbox.create(app=app, volumes={"/v": vol})
    sb.exec("bash", "-c", "head -c 3000000 /dev/urandom > /v/from-sandbox.bin; sync").wait()
    expected = sb.exec("sha256sum", "/v/from-sandbox.bin").stdout.read().split()[0]
    sb.terminate()
    for sig in (signal.SIGKILL, signal.SIGTERM):
        server.restart(sig)
        for path, data in files.items():
            assert b"".join(vol.read_file(path)) == data
        got = hashlib.sha256(b"".join(vol.read_file("from-sandbox.bin"))).hexdigest()
        assert got == expected
    shoal.Volume.objects.delete(name)
