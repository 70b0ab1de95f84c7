"""The server's state: apps, sandboxes, volumes and which sandbox mounts which volume.

`StateStore` is the seam (PostgreSQL can stand beside SQLite later); `SqliteStore` is the default,
one file under SHOAL_HOME in WAL mode. Every method is one short transaction; callers hold no
transaction across an await.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from shoal.exception import AlreadyExistsError


@dataclass
class AppRecord:
    id: str
    name: str
    created_at: float


@dataclass
class SandboxRecord:
    id: str
    app_id: str
    name: str | None
    state: str  # "running" | "terminated"
    spec: dict[str, Any]
    created_at: float
    deadline: float | None
    pid: int = 0
    tags: dict[str, str] = field(default_factory=dict)
    returncode: int | None = None
    ended_at: float | None = None
    end_reason: str | None = None  # "exited" | "terminated" | "timeout" | "server-restart" | ...
    runtime: str = "runc"  # which SandboxHost runs it
    node: str = ""  # which machine (the server's hostname today)
    idempotency_key: str | None = None  # the create request's Idempotency-Key, if it had one


@dataclass
class VolumeRecord:
    id: str
    kind: str  # "volume" | "nfs"
    name: str | None  # None for ephemeral
    state: str  # "ready" | "deleting"
    created_at: float
    lease_expires: float | None = None  # ephemeral only


@dataclass
class MountRecord:
    sandbox_id: str
    volume_id: str
    path: str
    read_only: bool


@dataclass
class MemorySnapshotRecord:
    """A memory snapshot of a sandbox (Modal's SandboxSnapshot): what a restore needs besides
    the files the host saved under `<home>/memory-snapshots/<id>/`."""
    id: str  # "sn-..."
    sandbox_id: str  # the sandbox it was taken of
    app_id: str
    spec: dict[str, Any]  # the sandbox's spec: a restored sandbox gets the same
    created_at: float
    expires_at: float  # removed after this (upkeep)


@dataclass
class SecretRecord:
    id: str
    name: str
    created_at: float
    updated_at: float
    env: dict[str, str]  # the values: never logged, never returned by the list routes


class StateStore(Protocol):
    def app_lookup(self, name: str) -> AppRecord | None: ...
    def app_create(self, rec: AppRecord) -> AppRecord: ...
    def app_get(self, app_id: str) -> AppRecord | None: ...
    def sandbox_insert(self, rec: SandboxRecord, mounts: list[MountRecord]) -> None: ...
    def sandbox_get(self, sandbox_id: str) -> SandboxRecord | None: ...
    def sandbox_list(self, app_id: str | None = None, state: str | None = None) -> list[SandboxRecord]: ...
    def sandbox_update(self, sandbox_id: str, **fields: Any) -> None: ...
    def sandbox_running_by_name(self, app_id: str, name: str) -> SandboxRecord | None: ...
    def sandbox_by_idempotency_key(self, key: str) -> SandboxRecord | None: ...
    def idempotent_get(self, key: str) -> tuple[str, str, int, bytes, str] | None: ...
    def idempotent_put(self, key: str, method: str, path: str, status: int, body: bytes,
                       content_type: str, now: float) -> None: ...
    def prune(self, idempotency_before: float, terminated_before: float) -> int: ...
    def volume_insert(self, rec: VolumeRecord) -> None: ...
    def volume_get(self, volume_id: str) -> VolumeRecord | None: ...
    def volume_by_name(self, kind: str, name: str) -> VolumeRecord | None: ...
    def volume_list(self, kind: str | None = None) -> list[VolumeRecord]: ...
    def volume_update(self, volume_id: str, **fields: Any) -> None: ...
    def volume_remove(self, volume_id: str) -> None: ...
    def volume_running_mounts(self, volume_id: str) -> list[MountRecord]: ...
    def mounts_of(self, sandbox_id: str) -> list[MountRecord]: ...
    # secrets (see control/secrets.py): the store's file must be private to the server's user
    def secret_put(self, rec: SecretRecord, replace: bool) -> bool: ...
    def secret_by_name(self, name: str) -> SecretRecord | None: ...
    def secret_get(self, secret_id: str) -> SecretRecord | None: ...
    def secret_list(self) -> list[SecretRecord]: ...
    def secret_remove(self, name: str) -> bool: ...
    def app_list(self) -> list[AppRecord]: ...
    def sandbox_state_counts(self) -> dict[str, int]: ...
    def sandbox_runtime_counts(self) -> dict[tuple[str, str], int]: ...
    def memory_snapshot_insert(self, rec: MemorySnapshotRecord) -> None: ...
    def memory_snapshot_get(self, snapshot_id: str) -> MemorySnapshotRecord | None: ...
    def memory_snapshot_list(self) -> list[MemorySnapshotRecord]: ...
    def memory_snapshot_remove(self, snapshot_id: str) -> None: ...


# Migrations: numbered steps, each applied once in its own transaction and recorded in
# schema_version. Never edit a released step; add the next one. Step 1 is the schema before
# versioning (IF NOT EXISTS, so databases made before schema_version existed pass through it).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS apps (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY, app_id TEXT NOT NULL REFERENCES apps(id), name TEXT,
    state TEXT NOT NULL, spec TEXT NOT NULL, created_at REAL NOT NULL, deadline REAL,
    pid INTEGER NOT NULL DEFAULT 0, tags TEXT NOT NULL DEFAULT '{}', returncode INTEGER,
    ended_at REAL, end_reason TEXT);
CREATE INDEX IF NOT EXISTS sandboxes_state ON sandboxes(state);
CREATE TABLE IF NOT EXISTS volumes (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT, state TEXT NOT NULL,
    created_at REAL NOT NULL, lease_expires REAL, UNIQUE(kind, name));
CREATE TABLE IF NOT EXISTS mounts (
    sandbox_id TEXT NOT NULL REFERENCES sandboxes(id), volume_id TEXT NOT NULL,
    path TEXT NOT NULL, read_only INTEGER NOT NULL, PRIMARY KEY (sandbox_id, path));
CREATE INDEX IF NOT EXISTS mounts_volume ON mounts(volume_id);
CREATE TABLE IF NOT EXISTS secrets (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, created_at REAL NOT NULL,
    updated_at REAL NOT NULL, env TEXT NOT NULL);
"""

MIGRATIONS: list[tuple[int, str]] = [
    (1, _SCHEMA),
    # Conditional writes: at most one running sandbox per (app, name), enforced by the database
    # instead of check-then-insert. Older databases could hold duplicates (that race): keep the
    # newest running one of each name, end the rest.
    (2, """
UPDATE sandboxes SET state = 'terminated', end_reason = 'duplicate-name'
 WHERE state = 'running' AND name IS NOT NULL AND EXISTS (
   SELECT 1 FROM sandboxes o WHERE o.app_id = sandboxes.app_id AND o.name = sandboxes.name
      AND o.state = 'running' AND o.created_at > sandboxes.created_at);
CREATE UNIQUE INDEX sandboxes_running_name ON sandboxes(app_id, name)
 WHERE state = 'running' AND name IS NOT NULL;
"""),
    # Which runtime (SandboxHost) and node own each sandbox.
    (3, """
ALTER TABLE sandboxes ADD COLUMN runtime TEXT NOT NULL DEFAULT 'runc';
ALTER TABLE sandboxes ADD COLUMN node TEXT NOT NULL DEFAULT '';
"""),
    # Idempotency keys: a create's key sits in its sandbox row (one transaction with the
    # effect); other requests' responses are kept in `idempotency` (see server/idempotency.py).
    (4, """
ALTER TABLE sandboxes ADD COLUMN idempotency_key TEXT;
CREATE UNIQUE INDEX sandboxes_idempotency_key ON sandboxes(idempotency_key)
 WHERE idempotency_key IS NOT NULL;
CREATE TABLE idempotency (
    key TEXT PRIMARY KEY, method TEXT NOT NULL, path TEXT NOT NULL, status INTEGER NOT NULL,
    body BLOB NOT NULL, content_type TEXT NOT NULL, created_at REAL NOT NULL);
CREATE INDEX idempotency_created ON idempotency(created_at);
"""),
    # Memory snapshots (Modal's SandboxSnapshot): the files live under <home>/memory-snapshots.
    (5, """
CREATE TABLE memory_snapshots (
    id TEXT PRIMARY KEY, sandbox_id TEXT NOT NULL, app_id TEXT NOT NULL, spec TEXT NOT NULL,
    created_at REAL NOT NULL, expires_at REAL NOT NULL);
CREATE INDEX memory_snapshots_expires ON memory_snapshots(expires_at);
"""),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


class WriteConflict(AlreadyExistsError):
    """A conditional write lost: a uniqueness rule holds another row. `constraint` says which
    ("name": a running sandbox of that name; "idempotency_key": a create with that key)."""

    def __init__(self, message: str, constraint: str):
        super().__init__(message)
        self.constraint = constraint


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the steps this database lacks; returns its schema version. Preconditions: no
    transaction open on `conn` (isolation_level=None)."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    current = row[0] or 0
    if current > SCHEMA_VERSION:
        raise RuntimeError(f"the state database is at schema version {current}, newer than this "
                           f"shoal's {SCHEMA_VERSION}: upgrade shoal")
    for version, script in MIGRATIONS:
        if version <= current:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in (x.strip() for x in script.split(";")):
                if stmt:
                    conn.execute(stmt)
            conn.execute("INSERT INTO schema_version VALUES (?)", (version,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return SCHEMA_VERSION


_JSON_FIELDS = {"spec", "tags"}


class _Connection:
    """One SQLite connection (autocommit, WAL, foreign keys) shared by the event loop and worker
    threads; the stores below each hold one."""

    def __init__(self, path: Path):
        # mu guards conn: sqlite3 connections must not be used from two threads at once, and the
        # server calls in from the event loop and from worker threads.
        self.mu = threading.Lock()
        self.conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        with self.mu:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA foreign_keys=ON")

    def close(self) -> None:
        with self.mu:
            self.conn.close()

    def _all(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self.mu:
            return self.conn.execute(sql, args).fetchall()

    def _exec(self, sql: str, args: tuple = ()) -> int:
        """Run one statement; the number of rows it changed."""
        with self.mu:
            return self.conn.execute(sql, args).rowcount


class SqliteStore(_Connection):
    def __init__(self, path: Path):
        super().__init__(path)
        with self.mu:
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute("PRAGMA busy_timeout=10000")
            self.schema_version = migrate(self.conn)

    # --- apps
    def app_lookup(self, name: str) -> AppRecord | None:
        rows = self._all("SELECT * FROM apps WHERE name = ?", (name,))
        return AppRecord(**dict(rows[0])) if rows else None

    def app_get(self, app_id: str) -> AppRecord | None:
        rows = self._all("SELECT * FROM apps WHERE id = ?", (app_id,))
        return AppRecord(**dict(rows[0])) if rows else None

    def app_create(self, rec: AppRecord) -> AppRecord:
        """Insert, or return the app a concurrent caller created under the same name."""
        with self.mu:
            self.conn.execute("INSERT OR IGNORE INTO apps VALUES (?, ?, ?)",
                              (rec.id, rec.name, rec.created_at))
            row = self.conn.execute("SELECT * FROM apps WHERE name = ?", (rec.name,)).fetchone()
        return AppRecord(**dict(row))

    def app_list(self) -> list[AppRecord]:
        return [AppRecord(**dict(r)) for r in self._all("SELECT * FROM apps ORDER BY created_at")]

    def sandbox_state_counts(self) -> dict[str, int]:
        rows = self._all("SELECT state, COUNT(*) AS n FROM sandboxes GROUP BY state")
        return {r["state"]: r["n"] for r in rows}

    def sandbox_runtime_counts(self) -> dict[tuple[str, str], int]:
        """{(state, runtime): count}"""
        rows = self._all("SELECT state, runtime, COUNT(*) AS n FROM sandboxes "
                         "GROUP BY state, runtime")
        return {(r["state"], r["runtime"]): r["n"] for r in rows}

    # --- sandboxes
    @staticmethod
    def _sandbox(row: sqlite3.Row) -> SandboxRecord:
        d = dict(row)
        d["spec"] = json.loads(d["spec"])
        d["tags"] = json.loads(d["tags"])
        return SandboxRecord(**d)

    def sandbox_insert(self, rec: SandboxRecord, mounts: list[MountRecord]) -> None:
        with self.mu:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                self.conn.execute(
                    "INSERT INTO sandboxes (id, app_id, name, state, spec, created_at, deadline, pid,"
                    " tags, runtime, node, idempotency_key)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (rec.id, rec.app_id, rec.name, rec.state, json.dumps(rec.spec),
                     rec.created_at, rec.deadline, rec.pid, json.dumps(rec.tags), rec.runtime,
                     rec.node, rec.idempotency_key))
                self.conn.executemany(
                    "INSERT INTO mounts VALUES (?, ?, ?, ?)",
                    [(m.sandbox_id, m.volume_id, m.path, int(m.read_only)) for m in mounts])
                self.conn.execute("COMMIT")
            except sqlite3.IntegrityError as e:
                self.conn.execute("ROLLBACK")
                if "idempotency_key" in str(e):
                    raise WriteConflict(f"a sandbox was created with idempotency key "
                                        f"{rec.idempotency_key!r}", "idempotency_key") from None
                if "sandboxes.name" in str(e) or "sandboxes_running_name" in str(e):
                    raise WriteConflict(f"a running sandbox named {rec.name!r} already exists in "
                                        "this app", "name") from None
                raise
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise

    # --- memory snapshots
    @staticmethod
    def _memory_snapshot(row: sqlite3.Row) -> MemorySnapshotRecord:
        d = dict(row)
        d["spec"] = json.loads(d["spec"])
        return MemorySnapshotRecord(**d)

    def memory_snapshot_insert(self, rec: MemorySnapshotRecord) -> None:
        self._exec("INSERT INTO memory_snapshots (id, sandbox_id, app_id, spec, created_at,"
                   " expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                   (rec.id, rec.sandbox_id, rec.app_id, json.dumps(rec.spec), rec.created_at,
                    rec.expires_at))

    def memory_snapshot_get(self, snapshot_id: str) -> MemorySnapshotRecord | None:
        rows = self._all("SELECT * FROM memory_snapshots WHERE id = ?", (snapshot_id,))
        return self._memory_snapshot(rows[0]) if rows else None

    def memory_snapshot_list(self) -> list[MemorySnapshotRecord]:
        return [self._memory_snapshot(r) for r in
                self._all("SELECT * FROM memory_snapshots ORDER BY created_at")]

    def memory_snapshot_remove(self, snapshot_id: str) -> None:
        self._exec("DELETE FROM memory_snapshots WHERE id = ?", (snapshot_id,))

    def sandbox_by_idempotency_key(self, key: str) -> SandboxRecord | None:
        rows = self._all("SELECT * FROM sandboxes WHERE idempotency_key = ?", (key,))
        return self._sandbox(rows[0]) if rows else None

    # --- idempotency keys of other requests: the stored response, replayed on a retry
    def idempotent_get(self, key: str) -> tuple[str, str, int, bytes, str] | None:
        rows = self._all("SELECT method, path, status, body, content_type FROM idempotency "
                         "WHERE key = ?", (key,))
        return tuple(rows[0]) if rows else None

    def idempotent_put(self, key: str, method: str, path: str, status: int, body: bytes,
                       content_type: str, now: float) -> None:
        self._exec("INSERT OR IGNORE INTO idempotency VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (key, method, path, status, body, content_type, now))

    def prune(self, idempotency_before: float, terminated_before: float) -> int:
        """Forget idempotency keys older than the first bound, and terminated sandboxes (with
        their mounts) that ended before the second. Returns the rows removed."""
        with self.mu:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                n = self.conn.execute("DELETE FROM idempotency WHERE created_at < ?",
                                      (idempotency_before,)).rowcount
                old = "SELECT id FROM sandboxes WHERE state = 'terminated' AND ended_at < ?"
                self.conn.execute(f"DELETE FROM mounts WHERE sandbox_id IN ({old})",
                                  (terminated_before,))
                n += self.conn.execute("DELETE FROM sandboxes WHERE state = 'terminated' AND "
                                       "ended_at < ?", (terminated_before,)).rowcount
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
        return n

    def sandbox_get(self, sandbox_id: str) -> SandboxRecord | None:
        rows = self._all("SELECT * FROM sandboxes WHERE id = ?", (sandbox_id,))
        return self._sandbox(rows[0]) if rows else None

    def sandbox_list(self, app_id: str | None = None, state: str | None = None) -> list[SandboxRecord]:
        sql, args = "SELECT * FROM sandboxes WHERE 1=1", []
        if app_id:
            sql += " AND app_id = ?"
            args.append(app_id)
        if state:
            sql += " AND state = ?"
            args.append(state)
        return [self._sandbox(r) for r in self._all(sql + " ORDER BY created_at", tuple(args))]

    def sandbox_running_by_name(self, app_id: str, name: str) -> SandboxRecord | None:
        rows = self._all("SELECT * FROM sandboxes WHERE app_id = ? AND name = ? AND state = 'running'",
                         (app_id, name))
        return self._sandbox(rows[0]) if rows else None

    def sandbox_update(self, sandbox_id: str, **fields: Any) -> None:
        cols = ", ".join(f"{k} = ?" for k in fields)
        vals = [json.dumps(v) if k in _JSON_FIELDS else v for k, v in fields.items()]
        self._exec(f"UPDATE sandboxes SET {cols} WHERE id = ?", (*vals, sandbox_id))

    def mounts_of(self, sandbox_id: str) -> list[MountRecord]:
        return [MountRecord(r["sandbox_id"], r["volume_id"], r["path"], bool(r["read_only"]))
                for r in self._all("SELECT * FROM mounts WHERE sandbox_id = ?", (sandbox_id,))]

    # --- volumes
    def volume_insert(self, rec: VolumeRecord) -> None:
        self._exec("INSERT INTO volumes VALUES (?, ?, ?, ?, ?, ?)",
                   (rec.id, rec.kind, rec.name, rec.state, rec.created_at, rec.lease_expires))

    def volume_get(self, volume_id: str) -> VolumeRecord | None:
        rows = self._all("SELECT * FROM volumes WHERE id = ?", (volume_id,))
        return VolumeRecord(**dict(rows[0])) if rows else None

    def volume_by_name(self, kind: str, name: str) -> VolumeRecord | None:
        rows = self._all("SELECT * FROM volumes WHERE kind = ? AND name = ?", (kind, name))
        return VolumeRecord(**dict(rows[0])) if rows else None

    def volume_list(self, kind: str | None = None) -> list[VolumeRecord]:
        if kind:
            rows = self._all("SELECT * FROM volumes WHERE kind = ? ORDER BY created_at", (kind,))
        else:
            rows = self._all("SELECT * FROM volumes ORDER BY created_at")
        return [VolumeRecord(**dict(r)) for r in rows]

    def volume_update(self, volume_id: str, **fields: Any) -> None:
        cols = ", ".join(f"{k} = ?" for k in fields)
        self._exec(f"UPDATE volumes SET {cols} WHERE id = ?", (*fields.values(), volume_id))

    def volume_remove(self, volume_id: str) -> None:
        with self.mu:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("DELETE FROM volumes WHERE id = ?", (volume_id,))
            self.conn.execute("COMMIT")

    def volume_running_mounts(self, volume_id: str) -> list[MountRecord]:
        rows = self._all(
            "SELECT m.* FROM mounts m JOIN sandboxes s ON s.id = m.sandbox_id "
            "WHERE m.volume_id = ? AND s.state = 'running'", (volume_id,))
        return [MountRecord(r["sandbox_id"], r["volume_id"], r["path"], bool(r["read_only"]))
                for r in rows]

    # --- secrets
    @staticmethod
    def _secret(row: sqlite3.Row) -> SecretRecord:
        d = dict(row)
        d["env"] = json.loads(d["env"])
        return SecretRecord(**d)

    def secret_put(self, rec: SecretRecord, replace: bool) -> bool:
        """Insert; with `replace`, overwrite the values of an existing secret of that name (keeping
        its id and creation time). False if the name exists and `replace` is false."""
        with self.mu:
            if replace:
                self.conn.execute(
                    "INSERT INTO secrets VALUES (?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                    "env = excluded.env, updated_at = excluded.updated_at",
                    (rec.id, rec.name, rec.created_at, rec.updated_at, json.dumps(rec.env)))
                return True
            cur = self.conn.execute("INSERT OR IGNORE INTO secrets VALUES (?, ?, ?, ?, ?)",
                                    (rec.id, rec.name, rec.created_at, rec.updated_at,
                                     json.dumps(rec.env)))
            return cur.rowcount == 1

    def secret_by_name(self, name: str) -> SecretRecord | None:
        rows = self._all("SELECT * FROM secrets WHERE name = ?", (name,))
        return self._secret(rows[0]) if rows else None

    def secret_get(self, secret_id: str) -> SecretRecord | None:
        rows = self._all("SELECT * FROM secrets WHERE id = ?", (secret_id,))
        return self._secret(rows[0]) if rows else None

    def secret_list(self) -> list[SecretRecord]:
        return [self._secret(r) for r in self._all("SELECT * FROM secrets ORDER BY name")]

    def secret_remove(self, name: str) -> bool:
        with self.mu:
            return self.conn.execute("DELETE FROM secrets WHERE name = ?", (name,)).rowcount == 1

# --- Dicts and Queues (modal.Dict, modal.Queue) ------------------------------------------------
# Kept apart from the tables above so the stores can be read (and merged) on their own. Keys and
# values are opaque bytes (the client pickles them); the service bounds their sizes.

@dataclass
class KvRecord:
    id: str
    kind: str  # "dict" | "queue"
    name: str | None  # None for ephemeral
    created_at: float
    lease_expires: float | None = None


_KV_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv_objects (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT, created_at REAL NOT NULL,
    lease_expires REAL, UNIQUE(kind, name));
CREATE TABLE IF NOT EXISTS dict_entries (
    dict_id TEXT NOT NULL REFERENCES kv_objects(id) ON DELETE CASCADE, key BLOB NOT NULL,
    value BLOB NOT NULL, PRIMARY KEY (dict_id, key));
CREATE TABLE IF NOT EXISTS queue_items (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    queue_id TEXT NOT NULL REFERENCES kv_objects(id) ON DELETE CASCADE,
    partition TEXT NOT NULL, value BLOB NOT NULL, expires REAL);
CREATE INDEX IF NOT EXISTS queue_items_part ON queue_items(queue_id, partition, seq);
"""


class KvStore(_Connection):
    """Dict entries and queue items in the server's SQLite database (a second connection to the
    same file; WAL lets it and SqliteStore work side by side). Each method is one transaction."""

    def __init__(self, path: Path):
        super().__init__(path)
        with self.mu:
            self.conn.executescript(_KV_SCHEMA)

    # objects
    def insert(self, rec: KvRecord) -> KvRecord:
        with self.mu:
            self.conn.execute("INSERT OR IGNORE INTO kv_objects VALUES (?, ?, ?, ?, ?)",
                              (rec.id, rec.kind, rec.name, rec.created_at, rec.lease_expires))
        return self.by_name(rec.kind, rec.name) if rec.name else rec

    def get(self, kind: str, obj_id: str) -> KvRecord | None:
        rows = self._all("SELECT * FROM kv_objects WHERE kind = ? AND id = ?", (kind, obj_id))
        return KvRecord(**dict(rows[0])) if rows else None

    def by_name(self, kind: str, name: str) -> KvRecord | None:
        rows = self._all("SELECT * FROM kv_objects WHERE kind = ? AND name = ?", (kind, name))
        return KvRecord(**dict(rows[0])) if rows else None

    def list(self, kind: str) -> list[KvRecord]:
        return [KvRecord(**dict(r)) for r in self._all(
            "SELECT * FROM kv_objects WHERE kind = ? AND name IS NOT NULL ORDER BY created_at",
            (kind,))]

    def remove(self, obj_id: str) -> None:
        self._exec("DELETE FROM kv_objects WHERE id = ?", (obj_id,))

    def renew(self, obj_id: str, lease_expires: float) -> None:
        self._exec("UPDATE kv_objects SET lease_expires = ? WHERE id = ?", (lease_expires, obj_id))

    def expired(self, now: float) -> list[str]:
        return [r["id"] for r in self._all(
            "SELECT id FROM kv_objects WHERE lease_expires IS NOT NULL AND lease_expires < ?",
            (now,))]

    # dicts
    def dict_get(self, dict_id: str, key: bytes) -> bytes | None:
        rows = self._all("SELECT value FROM dict_entries WHERE dict_id = ? AND key = ?",
                         (dict_id, key))
        return rows[0]["value"] if rows else None

    def dict_put(self, dict_id: str, items: list[tuple[bytes, bytes]],
                 skip_if_exists: bool = False) -> int:
        verb = "INSERT OR IGNORE" if skip_if_exists else "INSERT OR REPLACE"
        with self.mu:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                n = sum(self.conn.execute(f"{verb} INTO dict_entries VALUES (?, ?, ?)",
                                          (dict_id, k, v)).rowcount for k, v in items)
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
        return n

    def dict_pop(self, dict_id: str, key: bytes) -> bytes | None:
        with self.mu:
            self.conn.execute("BEGIN IMMEDIATE")
            row = self.conn.execute("SELECT value FROM dict_entries WHERE dict_id = ? AND key = ?",
                                    (dict_id, key)).fetchone()
            self.conn.execute("DELETE FROM dict_entries WHERE dict_id = ? AND key = ?",
                              (dict_id, key))
            self.conn.execute("COMMIT")
        return row["value"] if row else None

    def dict_len(self, dict_id: str) -> int:
        return self._all("SELECT count(*) n FROM dict_entries WHERE dict_id = ?",
                         (dict_id,))[0]["n"]

    def dict_items(self, dict_id: str) -> list[tuple[bytes, bytes]]:
        return [(r["key"], r["value"]) for r in self._all(
            "SELECT key, value FROM dict_entries WHERE dict_id = ? ORDER BY rowid", (dict_id,))]

    def dict_clear(self, dict_id: str) -> None:
        self._exec("DELETE FROM dict_entries WHERE dict_id = ?", (dict_id,))

    # queues
    def queue_put(self, queue_id: str, partition: str, values: list[bytes],
                  expires: float | None) -> None:
        with self.mu:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany("INSERT INTO queue_items (queue_id, partition, value, expires) "
                                  "VALUES (?, ?, ?, ?)",
                                  [(queue_id, partition, v, expires) for v in values])
            self.conn.execute("COMMIT")

    def queue_take(self, queue_id: str, partition: str, n: int, now: float) -> list[bytes]:
        with self.mu:
            self.conn.execute("BEGIN IMMEDIATE")
            rows = self.conn.execute(
                "SELECT seq, value FROM queue_items WHERE queue_id = ? AND partition = ? AND "
                "(expires IS NULL OR expires > ?) ORDER BY seq LIMIT ?",
                (queue_id, partition, now, n)).fetchall()
            self.conn.executemany("DELETE FROM queue_items WHERE seq = ?",
                                  [(r["seq"],) for r in rows])
            self.conn.execute("COMMIT")
        return [r["value"] for r in rows]

    def queue_peek(self, queue_id: str, partition: str, now: float) -> list[bytes]:
        return [r["value"] for r in self._all(
            "SELECT value FROM queue_items WHERE queue_id = ? AND partition = ? AND "
            "(expires IS NULL OR expires > ?) ORDER BY seq", (queue_id, partition, now))]

    def queue_len(self, queue_id: str, partition: str | None, now: float) -> int:
        sql = ("SELECT count(*) n FROM queue_items WHERE queue_id = ? AND "
               "(expires IS NULL OR expires > ?)")
        args: tuple = (queue_id, now)
        if partition is not None:
            sql += " AND partition = ?"
            args += (partition,)
        return self._all(sql, args)[0]["n"]

    def queue_clear(self, queue_id: str, partition: str | None) -> None:
        if partition is None:
            self._exec("DELETE FROM queue_items WHERE queue_id = ?", (queue_id,))
        else:
            self._exec("DELETE FROM queue_items WHERE queue_id = ? AND partition = ?",
                       (queue_id, partition))

    def queue_expire(self, now: float) -> None:
        self._exec("DELETE FROM queue_items WHERE expires IS NOT NULL AND expires <= ?", (now,))
