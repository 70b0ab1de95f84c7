"""Named secrets: environment variables stored by the server under a name (Modal's
`Secret.from_name`), resolved when a sandbox, an exec or an image build names them.

Where values may go: into the state store (a file only the server's user can read: the store's
files are made 0600 here, in a home that is 0700), into the environment of the sandbox, exec or
build step that names the secret, and into the credentials of a bucket mount's FUSE process. Never
into a log line, an error message, a listing (which returns key names only) or an image layer.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from shoal.exception import AlreadyExistsError, InvalidError, NotFoundError
from shoal.server.control.volumes import check_name, new_id
from shoal.server.storage.state import SecretRecord, StateStore

ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_SECRET_BYTES = 1 << 20


def make_private(db_path: Path) -> None:
    """The state store holds secret values: make its files (and SQLite's WAL/shm beside it)
    readable by the server's user only."""
    for suffix in ("", "-wal", "-shm"):
        p = Path(f"{db_path}{suffix}")
        if p.exists():
            os.chmod(p, 0o600)


def check_env(env: dict[str, str]) -> dict[str, str]:
    if not isinstance(env, dict) or not env:
        raise InvalidError("a secret needs at least one KEY=VALUE")
    size = 0
    for k, v in env.items():
        if not isinstance(k, str) or not ENV_KEY_RE.match(k):
            raise InvalidError(f"invalid secret key {k!r}: use letters, digits and '_', not "
                               "starting with a digit")
        if not isinstance(v, str) or "\x00" in v:
            # The value is not repeated: it is a secret.
            raise InvalidError(f"the value of {k} must be a str without NUL bytes")
        size += len(k) + len(v)
    if size > MAX_SECRET_BYTES:
        raise InvalidError(f"a secret holds at most {MAX_SECRET_BYTES} bytes")
    return dict(env)


class SecretService:
    def __init__(self, store: StateStore, db_path: Path | None = None):
        self.store = store
        if db_path is not None:
            make_private(db_path)

    def create(self, name: str, env: dict[str, str], force: bool = False) -> SecretRecord:
        """Store `env` under `name`. AlreadyExistsError if the name is taken, unless `force`
        (then the values are replaced)."""
        check_name(name, "secret")
        env = check_env(env)
        now = time.time()
        rec = SecretRecord(new_id("st"), name, now, now, env)
        if not self.store.secret_put(rec, replace=force):
            raise AlreadyExistsError(f"secret {name!r} already exists; use force=True (CLI: "
                                     "--force) to replace its values")
        return self.store.secret_by_name(name)

    def lookup(self, name: str, required_keys: list[str] = ()) -> SecretRecord:
        """NotFoundError for an unknown name; InvalidError naming the missing keys."""
        check_name(name, "secret")
        rec = self.store.secret_by_name(name)
        if rec is None:
            raise NotFoundError(f"secret {name!r} not found; create it with "
                                f"`shoal secret create {name} KEY=VALUE ...`")
        missing = [k for k in required_keys if k not in rec.env]
        if missing:
            raise InvalidError(f"secret {name!r} is missing the required key(s) "
                               f"{', '.join(sorted(missing))}")
        return rec

    def list(self) -> list[SecretRecord]:
        return self.store.secret_list()

    def delete(self, name: str, allow_missing: bool = False) -> None:
        check_name(name, "secret")
        if not self.store.secret_remove(name) and not allow_missing:
            raise NotFoundError(f"secret {name!r} not found")

    def resolve(self, secret_ids: list[str] | None) -> dict[str, str]:
        """The merged values of these secrets, later ones winning. NotFoundError if one was
        deleted since the client looked it up."""
        env: dict[str, str] = {}
        for sid in secret_ids or ():
            rec = self.store.secret_get(sid)
            if rec is None:
                raise NotFoundError(f"secret {sid} not found (deleted since it was looked up?)")
            env.update(rec.env)
        return env
