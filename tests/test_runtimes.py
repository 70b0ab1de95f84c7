"""Choosing the runtime (issue 10): runc and gVisor side by side on one server.

The session's server runs with SHOAL_RUNTIME=$SHOAL_TEST_RUNTIME (runc unless told); these tests
ask for the other runtime per sandbox with Modal's `experimental_options`.
"""

from __future__ import annotations

import pytest
from conftest import TEST_RUNTIME

import shoal
from shoal.exception import InvalidError

GVISOR = {"runtime": "gvisor"}


def _kernel(sb) -> str:
    p = sb.exec("sh", "-c", "dmesg 2>/dev/null | head -1; uname -r")
    out = p.stdout.read()
    assert p.wait() == 0
    return out


def test_experimental_options_give_a_gvisor_sandbox(app):
    sb = shoal.Sandbox.create(app=app, experimental_options=GVISOR, timeout=60)
    try:
        assert sb.runtime == "gvisor"
        assert "gVisor" in _kernel(sb)
        assert shoal.Sandbox.from_id(sb.object_id).runtime == "gvisor"
        assert any(s.object_id == sb.object_id and s.runtime == "gvisor"
                   for s in shoal.Sandbox.list(app_id=app.app_id))
        # exec, files and exit codes behave as under runc
        sb.filesystem.write_text("hi", "/tmp/r.txt")
        p = sb.exec("sh", "-c", "cat /tmp/r.txt; exit 5")
        assert p.stdout.read() == "hi" and p.wait() == 5
    finally:
        sb.terminate()
    assert sb.returncode == 137 or sb.poll() == 137


def test_the_default_runtime_is_the_servers(app):
    sb = shoal.Sandbox.create(app=app, timeout=60)
    try:
        assert sb.runtime == TEST_RUNTIME
        assert ("gVisor" in _kernel(sb)) == (TEST_RUNTIME == "gvisor")
    finally:
        sb.terminate()


def test_runc_chosen_on_any_server(app):
    sb = shoal.Sandbox.create(app=app, experimental_options={"runtime": "runc"}, timeout=60)
    try:
        assert sb.runtime == "runc"
        assert "gVisor" not in _kernel(sb)
    finally:
        sb.terminate()


@pytest.mark.parametrize("options, words", [
    ({"runtime": "kata"}, "'runc' or 'gvisor'"),
    ({"gpu_fallback": True}, "'gpu_fallback'"),
    ("gvisor", "must be a dict"),
])
def test_bad_experimental_options_are_refused(app, options, words):
    with pytest.raises(InvalidError, match=words):
        shoal.Sandbox.create(app=app, experimental_options=options)


def test_gvisor_snapshot_keeps_writes_and_deletions(app):
    sb = shoal.Sandbox.create(app=app, experimental_options=GVISOR, timeout=60)
    try:
        assert sb.exec("sh", "-c", "echo kept > /root/kept.txt && rm /etc/hostname").wait() == 0
        image = sb.snapshot_filesystem()
    finally:
        sb.terminate()
    sb2 = shoal.Sandbox.create(app=app, image=image, experimental_options=GVISOR, timeout=60)
    try:
        p = sb2.exec("sh", "-c", "cat /root/kept.txt; test -e /etc/hostname || echo gone")
        assert p.stdout.read().split() == ["kept", "gone"]
    finally:
        sb2.terminate()


def test_gvisor_memory_limit_ends_the_whole_sandbox(app):
    sb = shoal.Sandbox.create("python3", "-c", "x = bytearray(400 << 20)", app=app, memory=(128, 128),
                              experimental_options=GVISOR, timeout=60)
    sb.wait()
    assert sb.returncode == 137


def test_gvisor_pids_limit_is_rlimit_nproc(app):
    sb = shoal.Sandbox.create(app=app, experimental_options=GVISOR, timeout=60)
    try:
        p = sb.exec("python3", "-c", "import resource; print(resource.getrlimit(6)[0])")
        assert p.stdout.read().strip() == "4096"  # RLIMIT_NPROC
    finally:
        sb.terminate()
