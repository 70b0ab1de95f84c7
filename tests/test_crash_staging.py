"""Nothing half-done is visible after a crash: the server is SIGKILLed at random points of
uploads into a sandbox's files; the target is always absent or whole (the old or the new
contents), and no temporary name is ever listed."""

from __future__ import annotations

import hashlib
import random
import signal
import threading
import time

import pytest

pytestmark = pytest.mark.slow

KILLS = 30
SIZE = 64 << 20


def test_sandbox_file_uploads_killed_at_random_points(server, app, tmp_path):
    import shoal

    sb = shoal.Sandbox.create(app=app, timeout=900)
    try:
        sb.filesystem.make_directory("/up")
        digests = set()
        raced = landed = 0
        rng = random.Random(9)
        for i in range(KILLS):
            local = tmp_path / f"src-{i}"
            block = hashlib.sha256(str(i).encode()).digest() * (1 << 15)  # 1 MiB
            local.write_bytes(block * (SIZE >> 20))
            digests.add(hashlib.sha256(local.read_bytes()).hexdigest())
            errors: list = []

            def upload():
                try:
                    sb.filesystem.copy_from_local(local, "/up/big.bin")
                except Exception as e:  # noqa: BLE001 - a failed upload is fine; half a file not
                    errors.append(e)

            t = threading.Thread(target=upload)
            t.start()
            time.sleep(rng.uniform(0.0, 0.5))
            if i % 5 == 4:
                t.join(timeout=120)  # every fifth lands first: the whole file must survive
            raced += t.is_alive()
            server.restart(signal.SIGKILL)
            t.join(timeout=120)
            assert not t.is_alive()
            names = [f.path.rsplit("/", 1)[-1] for f in sb.filesystem.list_files("/up")]
            assert set(names) <= {"big.bin"}, f"kill {i}: visible leftovers {names}"
            if names:
                got = sb.exec("sha256sum", "/up/big.bin").stdout.read().split()[0]
                assert got in digests, f"kill {i}: a partial file is visible"
                landed += 1
        # Preconditions: kills did hit uploads in flight, and files did land.
        assert raced >= KILLS // 4, f"only {raced} of {KILLS} kills hit an upload in flight"
        assert landed, "no upload ever landed"
    finally:
        sb.terminate()
