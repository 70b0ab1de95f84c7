"""The user an image says its processes run as (Dockerfile USER), resolved by the image's own
/etc/passwd and /etc/group."""

from __future__ import annotations

import os
from pathlib import Path

from shoal.server.storage.paths import open_checked


def resolve_user(rootfs: Path, user: str | None) -> tuple[int, int]:
    """uid and gid of `user` ("name", "uid", "name:group" or "uid:gid") by the image's own
    /etc/passwd and /etc/group, read inside the root (links cannot point out of it)."""
    if not user:
        return 0, 0
    name, _, group = user.partition(":")

    def lookup(db: str, key: str) -> list[str] | None:
        root = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = open_checked(root, f"etc/{db}", os.O_RDONLY)
        except OSError:
            return None
        finally:
            os.close(root)
        with open(fd) as f:
            for line in f:
                fields = line.strip().split(":")
                if fields and (fields[0] == key or (key.isdigit() and len(fields) > 2
                                                    and fields[2] == key)):
                    return fields
        return None

    entry = lookup("passwd", name)
    if entry:
        uid, gid = int(entry[2]), int(entry[3])
    elif name.isdigit():
        uid, gid = int(name), int(name)
    else:
        raise ValueError(f"user {name!r} is not in the image's /etc/passwd")
    if group:
        g = lookup("group", group)
        if g:
            gid = int(g[2])
        elif group.isdigit():
            gid = int(group)
        else:
            raise ValueError(f"group {group!r} is not in the image's /etc/group")
    return uid, gid
