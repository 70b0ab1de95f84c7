"""The pure parts of user namespaces (host/idmap.py, oci.build_config, the file API's owners)."""

from __future__ import annotations

import os

import pytest

from shoal.server.host import idmap, oci
from shoal.server.host.runc_files import file_info


def test_ranges_follow_the_loop_device_and_never_overlap():
    assert idmap.range_of("/dev/loop0") == 0x80000
    assert idmap.range_of("/dev/loop7") - idmap.range_of("/dev/loop6") == idmap.RANGE_SIZE
    top = idmap.range_of(f"/dev/loop{idmap.MAX_SLOTS - 1}") + idmap.RANGE_SIZE
    assert top <= 0x70000000  # below systemd's dynamic range and far from (uid_t)-1
    with pytest.raises(OSError):
        idmap.range_of(f"/dev/loop{idmap.MAX_SLOTS}")


def spec(**kw) -> oci.ContainerSpec:
    return oci.ContainerSpec(id="sb-x", rootfs="/r", args=["true"], tools_dir="/t", **kw)


def test_config_without_user_namespace_is_unchanged():
    cfg = oci.build_config(spec(netns_path="/run/netns/n"), "/shoal/sb-x")
    assert cfg["root"]["path"] == "/r"
    assert {"type": "network", "path": "/run/netns/n"} in cfg["linux"]["namespaces"]
    assert "uidMappings" not in cfg["linux"]
    assert any(m["type"] == "sysfs" for m in cfg["mounts"])
    assert cfg["process"]["rlimits"]


def test_config_with_user_namespace_joins_it_and_leaves_runc_the_rest():
    s = spec(netns_path="/run/netns/n", userns=("/proc/9/ns/user", 0x90000, 65536))
    cfg = oci.build_config(s, "/shoal/sb-x")
    ns = cfg["linux"]["namespaces"]
    assert ns[0] == {"type": "user", "path": "/proc/9/ns/user"}  # first, as runc joins it
    assert not [n for n in ns if n["type"] == "network"]  # runc runs inside it instead
    assert oci.runc_netns(s) == "/run/netns/n"
    assert cfg["linux"]["uidMappings"] == cfg["linux"]["gidMappings"] == [
        {"containerID": 0, "hostID": 0x90000, "size": 65536}]
    assert cfg["root"]["path"] == oci.USERNS_ROOTFS
    assert not [m for m in cfg["mounts"] if m["type"] == "sysfs"]  # host root mounts it
    assert cfg["process"]["rlimits"] == []  # set on runc itself


def test_config_with_user_namespace_and_no_network_gets_its_own_netns_and_sysfs():
    s = spec(userns=("/proc/9/ns/user", 0x90000, 65536))
    cfg = oci.build_config(s, "/shoal/sb-x")
    assert {"type": "network"} in cfg["linux"]["namespaces"]
    assert oci.runc_netns(s) is None
    assert any(m["type"] == "sysfs" for m in cfg["mounts"])


def test_owners_are_reported_as_the_sandbox_sees_them():
    st = os.stat_result((0o100644, 1, 1, 1, 0x90000 + 1000, 0x90000, 0, 0, 0, 0))
    info = file_info("/f", st, None, 0x90000)
    assert (info["owner"], info["group"]) == ("1000", "root")
    outside = os.stat_result((0o100644, 1, 1, 1, 0, 5, 0, 0, 0, 0))
    info = file_info("/f", outside, None, 0x90000)
    assert (info["owner"], info["group"]) == ("65534", "65534")  # unmapped: overflow, as ls
    assert file_info("/f", outside, None)["owner"] == "root"  # no user namespace
