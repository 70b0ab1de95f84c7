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


class StateStore(Protocol):
    def app_lookup(self, name: str) -> AppRecord | None: ...
    def app_create(self, rec: AppRecord) -> AppRecord: ...
    def app_get(self, app_id: str) -> AppRecord | None: ...
    def sandbox_insert(self, rec: SandboxRecord, mounts: list[MountRecord]) -> None: ...
    def sandbox_get(self, sandbox_id: str) -> SandboxRecord | None: ...
    def sandbox_list(self, app_id: str | None = None, state: str | None = None) -> list[SandboxRecord]: ...
    def sandbox_update(self, sandbox_id: str, **fields: Any) -> None: ...
    def sandbox_running_by_name(self, app_id: str, name: str) -> SandboxRecord | None: ...
    def volume_insert(self, rec: VolumeRecord) -> None: ...
    def volume_get(self, volume_id: str) -> VolumeRecord | None: ...
    def volume_by_name(self, kind: str, name: str) -> VolumeRecord | None: ...
    def volume_list(self, kind: str | None = None) -> list[VolumeRecord]: ...
    def volume_update(self, volume_id: str, **fields: Any) -> None: ...
    def volume_remove(self, volume_id: str) -> None: ...
    def volume_running_mounts(self, volume_id: str) -> list[MountRecord]: ...
    def mounts_of(self, sandbox_id: str) -> list[MountRecord]: ...
    def app_list(self) -> list[AppRecord]: ...
    def sandbox_state_counts(self) -> dict[str, int]: ...


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
"""

_JSON_FIELDS = {"spec", "tags"}


class SqliteStore:
    def __init__(self, path: Path):
        # mu guards conn: sqlite3 connections must not be used from two threads at once, and the
        # server calls in from the event loop and from worker threads.
        self.mu = threading.Lock()
        self.conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        with self.mu:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self.conn.executescript(_SCHEMA)

    def close(self) -> None:
        with self.mu:
            self.conn.close()

    def _all(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self.mu:
            return self.conn.execute(sql, args).fetchall()

    def _exec(self, sql: str, args: tuple = ()) -> None:
        with self.mu:
            self.conn.execute(sql, args)

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
                    " tags) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (rec.id, rec.app_id, rec.name, rec.state, json.dumps(rec.spec),
                     rec.created_at, rec.deadline, rec.pid, json.dumps(rec.tags)))
                self.conn.executemany(
                    "INSERT INTO mounts VALUES (?, ?, ?, ?)",
                    [(m.sandbox_id, m.volume_id, m.path, int(m.read_only)) for m in mounts])
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise

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
