"""Where shoal keeps things, read from the environment. Shared by the SDK, the server and the CLI.

SHOAL_HOME     everything of one installation: database, socket, volumes, sandboxes, logs
               (default ~/.shoal).
SHOAL_IMAGES   the image store (default $SHOAL_HOME/images); tests point it at the set-up's store
               so an isolated SHOAL_HOME does not rebuild the default image.
SHOAL_SERVER   where the SDK finds the server: a socket path, unix:PATH, or http://HOST:PORT.
               Unset: the default socket, and the SDK starts a server there if none answers.
SHOAL_TOKEN    bearer token for TCP mode.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    home: Path

    @property
    def socket(self) -> Path:
        return self.home / "shoal.sock"

    @property
    def db(self) -> Path:
        return self.home / "state.db"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def server_log(self) -> Path:
        return self.logs / "server.log"

    @property
    def server_lock(self) -> Path:
        return self.home / "server.lock"

    @property
    def server_pid(self) -> Path:
        return self.home / "server.pid"

    @property
    def stopped_marker(self) -> Path:
        """Written by `shoal stop`: clients that lost the server do not start it again."""
        return self.home / "stopped"

    @property
    def start_lock(self) -> Path:
        return self.home / "start.lock"

    @property
    def sandboxes(self) -> Path:
        return self.home / "sandboxes"

    @property
    def volumes(self) -> Path:
        return self.home / "volumes"

    @property
    def runc_root(self) -> Path:
        return self.home / "runc"

    @property
    def images(self) -> Path:
        env = os.environ.get("SHOAL_IMAGES")
        return Path(env) if env else self.home / "images"


NOT_ROOT = ("shoal needs root to run sandboxes (the server mounts overlay file systems and starts "
            "containers and cgroups with runc): run `shoal serve` as root, e.g. with sudo, or set "
            "SHOAL_SERVER to a server that runs as root.")


def home() -> Path:
    return Path(os.environ.get("SHOAL_HOME") or Path.home() / ".shoal").absolute()


def paths() -> Paths:
    return Paths(home())
