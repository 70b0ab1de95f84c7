"""The image store's staging and its sweep (server/images/store.py), with real processes, flocks
and mounts but no server: the sweep removes exactly what dead processes left — never a live
process's scratch, even one that shares the store — and a snapshot's layer whose manifest never
came; staged files are invisible until whole."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from shoal.server import linux
from shoal.server.images import store as store_module
from shoal.server.images.store import PENDING, ImageConfig, ImageStore, Manifest

HOLDER = """
import sys, time
from pathlib import Path
from shoal.server.images.store import ImageStore
d = ImageStore(Path(sys.argv[1])).scratch("step")
(d / "half-a-layer").write_text("x")
print(d.name, flush=True)
time.sleep(600)
"""


def _holder(root):
    """Another process that owns a scratch directory of the store (as a second server would)."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], stdout=subprocess.PIPE,
                         text=True)
    return p, p.stdout.readline().strip()


def _die(store: ImageStore) -> None:
    """This process stops being the owner it was (as if it had died): its flock is released;
    the next scratch it makes has a new owner name."""
    _, _, lock = store_module._owners.pop(str(store.root.resolve()))
    lock.close()


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_sweep_keeps_a_live_processs_scratch_and_removes_a_dead_ones(tmp_path):
    store = ImageStore(tmp_path)
    proc, name = _holder(tmp_path)
    try:
        assert name.startswith(f"{proc.pid}-") and "-step-" in name
        assert store.clean_scratch() == []  # its owner lives: kept, whatever pids say
        assert (tmp_path / ".work" / name / "half-a-layer").exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert store.clean_scratch() == [name]
    assert list((tmp_path / ".work").iterdir()) == []
    assert not list((tmp_path / ".locks").glob(f"work-{name.rsplit('-', 2)[0]}"))


def test_sweep_judges_names_without_an_owner_lock_by_their_pid(tmp_path):
    """Scratch of servers from before the owner lock (`<pid>-<hex>`, `<pid>-commit-<hex>`)."""
    store = ImageStore(tmp_path)
    live = tmp_path / ".work" / f"{os.getppid()}-0123456789abcdef"
    dead = tmp_path / ".work" / f"{_dead_pid()}-commit-0123456789ab"
    for d in (live, dead):
        d.mkdir()
    assert store.clean_scratch() == [dead.name]
    assert live.exists() and not dead.exists()


def test_sweep_never_touches_its_own_scratch(tmp_path):
    store = ImageStore(tmp_path)
    mine = store.scratch("snap")
    assert store.clean_scratch() == [] and mine.exists()
    store.discard(mine)
    assert not mine.exists()


def test_sweep_unmounts_what_a_killed_build_left_mounted(tmp_path):
    other = ImageStore(tmp_path)
    d = other.scratch("step")
    (d / "rootfs").mkdir()
    linux.mount("tmpfs", str(d / "rootfs"), "tmpfs", 0, "size=1m")
    (d / "rootfs" / "f").write_text("in the mount")
    _die(other)
    try:
        assert ImageStore(tmp_path).clean_scratch() == [d.name]
        assert not d.exists() and not linux.mounts_under(str(d))
    finally:
        for point in linux.mounts_under(str(tmp_path)):
            linux.umount(point, linux.MNT_DETACH)


def _manifest_of(layer: str) -> Manifest:
    return Manifest(Manifest.image_id([layer], ImageConfig()), [layer], ImageConfig(), time.time())


def test_a_snapshot_killed_between_layer_and_manifest_leaves_no_layer(tmp_path):
    dead = ImageStore(tmp_path)
    work = dead.scratch("snap")
    (work / "rootfs").mkdir()
    (work / PENDING).write_text("layers/snap-a")
    dead.commit_layer("layers/snap-a", work / "rootfs", {})  # ... and killed before the manifest
    done = dead.scratch("snap")  # this one got its manifest, then was killed before discard
    (done / "rootfs").mkdir()
    m = dead.commit_image(done, "layers/snap-b", {}, _manifest_of)
    _die(dead)
    swept = ImageStore(tmp_path).clean_scratch()
    assert sorted(swept) == sorted([work.name, done.name])
    assert not (tmp_path / "layers" / "snap-a").exists()
    assert (tmp_path / "layers" / "snap-b" / "rootfs").is_dir()
    assert ImageStore(tmp_path).manifest(m.id).layers == ["layers/snap-b"]


def test_a_failed_manifest_write_removes_the_snapshots_layer(tmp_path):
    store = ImageStore(tmp_path)
    work = store.scratch("snap")
    (work / "rootfs").mkdir()

    def boom(layer):
        raise OSError("disk full")

    with pytest.raises(OSError):
        store.commit_image(work, "layers/snap-c", {}, boom)
    assert not store.has_layer("layers/snap-c")
    assert [p.name for p in (tmp_path / "layers").iterdir()] == []


def test_staged_files_are_invisible_until_whole(tmp_path):
    store = ImageStore(tmp_path)
    final = tmp_path / "blobs" / "sha256" / ("a" * 64)
    with store.staged_file(final) as f:
        f.write(b"half")
        assert os.listdir(final.parent) == []  # nothing to list while it is written
        f.write(b" and the rest")
    assert final.read_bytes() == b"half and the rest"
    with pytest.raises(ValueError):
        with store.staged_file(final.with_name("b" * 64)) as f:
            f.write(b"wrong")
            raise ValueError("digest mismatch")
    assert os.listdir(final.parent) == ["a" * 64]
    with store.staged_file(final) as f:  # a name that exists stays (content-addressed)
        f.write(b"other")
    assert final.read_bytes() == b"half and the rest"
    assert list((tmp_path / ".work").iterdir()) == []
