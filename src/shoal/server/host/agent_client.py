"""Host-side client of the in-sandbox agent (asyncio).

The wire contract is `shoal/server/agent/PROTOCOL.md`; every number (types, tags, enums,
limits) comes from `protocol.json` through `load_protocol()`. The agent runs next to untrusted
code, so everything read from it is validated: a frame over the limits, a field of the wrong
shape or a bad handshake ends the connection with `AgentConnectionError`.

    client = await connect(run_dir)
    pid = await client.exec("e1", ["echo", "hi"], env={"PATH": "/bin:/usr/bin"})
    data, eof = await client.read("e1", "stdout", 0)
    code, timed_out = await client.wait("e1")
    await client.close()
"""

from __future__ import annotations

import asyncio
import errno as errno_mod
import os
import socket
import stat as stat_mod
import struct
import time
from pathlib import Path
from typing import Any, AsyncIterator

from shoal.server.agent import load_protocol

_P = load_protocol()
VERSION: int = _P["version"]
MAX_PAYLOAD: int = _P["frame"]["max_payload"]
MAX_FIELDS: int = _P["frame"]["max_fields"]
LIMITS: dict[str, int] = dict(_P["limits"])
MAX_DATA: int = LIMITS["max_data"]
TYPES: dict[str, int] = dict(_P["types"])
TAGS: dict[str, int] = dict(_P["tags"])
ENUMS: dict[str, dict[str, int]] = {k: dict(v) for k, v in _P["enums"].items()}
TAG_TYPES: dict[str, str] = {k: v for k, v in _P["tag_types"].items() if not k.startswith("_")}
REPEATED: frozenset[str] = frozenset(_P["repeated"])
OPEN_FLAGS: dict[str, int] = ENUMS["FLAGS"]
# Signals the host sends the agent from outside (`runsc kill ID N`): RELISTEN after QUIESCE.
SIGNALS: dict[str, int] = {k: v for k, v in _P["signals"].items() if not k.startswith("_")}

_TYPE_NAMES = {v: k for k, v in TYPES.items()}
_TAG_NAMES = {v: k for k, v in TAGS.items()}
_FILE_TYPES = {v: k for k, v in ENUMS["TYPE"].items()}
_KIND_NAMES = {v: k.capitalize() for k, v in ENUMS["KIND"].items()}  # 1 -> "Create"
_STREAMS = ENUMS["STREAM"]
_HEADER = struct.Struct("<IBI")
_FIELD = struct.Struct("<HI")
_INT = struct.Struct("<q")
_WATCH_QUEUE_MAX = 10000
# EXEC sends the first READ of each piped stream and the WAIT in the same write (see `exec`).
# Their replies wait here until claimed: at most EARLY_MAX entries a connection, each at most
# EARLY_READ bytes, so output nobody claims holds bounded memory until FORGET or the close.
EARLY_MAX = 256
EARLY_READ = 64 << 10
ENDS_MAX = 4096  # exec sessions whose final stream lengths a connection remembers


class AgentConnectionError(ConnectionError):
    """The agent connection was refused or lost, the agent sent a bad frame, the protocol
    versions differ, or connecting timed out."""


class _ProtocolError(Exception):
    pass


# ---------------------------------------------------------------- encoding


def _encode_value(tag: str, value: object) -> bytes:
    if isinstance(value, bool):
        return _INT.pack(int(value))
    if isinstance(value, int):
        return _INT.pack(value)
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"field {tag}: cannot encode {type(value).__name__}")


def encode_frame(type_name: str, req_id: int, fields: list[tuple[str, object]]) -> bytes:
    """One frame: header plus fields (ints as 8-byte LE, str as UTF-8, bytes raw)."""
    parts = []
    for tag, value in fields:
        raw = _encode_value(tag, value)
        parts.append(_FIELD.pack(TAGS[tag], len(raw)))
        parts.append(raw)
    payload = b"".join(parts)
    if len(payload) > MAX_PAYLOAD or len(fields) > MAX_FIELDS:
        raise ValueError(f"{type_name} request too large: {len(payload)} bytes, "
                         f"{len(fields)} fields (max {MAX_PAYLOAD}, {MAX_FIELDS})")
    return _HEADER.pack(5 + len(payload), TYPES[type_name], req_id) + payload


def _decode_fields(buf: bytes | memoryview, depth: int = 0) -> dict[str, Any]:
    """Fields to {tag name: value}; repeated tags give lists. Unknown tags are skipped."""
    out: dict[str, Any] = {}
    at, n, count = 0, len(buf), 0
    while at < n:
        count += 1
        if count > MAX_FIELDS or n - at < 6:
            raise _ProtocolError("malformed field list")
        tag, length = _FIELD.unpack_from(buf, at)
        at += 6
        if length > n - at:
            raise _ProtocolError("field overruns its frame")
        raw = bytes(buf[at:at + length])
        at += length
        name = _TAG_NAMES.get(tag)
        if name is None:
            continue
        kind = TAG_TYPES[name]
        if kind == "int":
            if length != 8:
                raise _ProtocolError(f"field {name} is not an 8-byte integer")
            value: Any = _INT.unpack(raw)[0]
        elif kind == "str":
            if b"\0" in raw:
                raise _ProtocolError(f"field {name} holds a NUL")
            value = raw.decode("utf-8", "surrogateescape")
        elif kind == "fields":
            if depth > 0:
                raise _ProtocolError("nested fields too deep")
            value = _decode_fields(raw, depth + 1)
        else:
            value = raw
        if name in REPEATED:
            out.setdefault(name, []).append(value)
        elif name not in out:
            out[name] = value
    return out


async def _gather_first_error(futs: list[asyncio.Future]) -> list:
    """Awaits every future (so none is left unretrieved); raises the first error."""
    results = await asyncio.gather(*futs, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def _retrieve(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


def _check(reply: dict, **kinds: type) -> dict:
    """Validates the presence and type of reply fields the caller relies on."""
    for name, kind in kinds.items():
        if not isinstance(reply.get(name), kind):
            raise AgentConnectionError(f"agent reply lacks a valid {name} field")
    return reply


# ---------------------------------------------------------------- connecting


def _open_socket_fd(run_dir: Path, socket_name: str) -> int:
    """An O_PATH descriptor of the socket, never following a symlink the sandbox planted."""
    if "/" in socket_name or socket_name in ("", ".", ".."):
        raise ValueError(f"socket_name must be a plain file name, not {socket_name!r}")
    dfd = os.open(run_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = os.open(socket_name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    finally:
        os.close(dfd)
    if not stat_mod.S_ISSOCK(os.fstat(fd).st_mode):
        os.close(fd)
        raise AgentConnectionError(f"{run_dir}/{socket_name} is not a socket")
    return fd


async def _connect_socket(run_dir: Path, socket_name: str) -> socket.socket:
    """Connects through /proc/self/fd/N of the O_PATH descriptor: the kernel resolves that
    magic link to exactly the inode checked above, so a path swapped since is never used."""
    fd = _open_socket_fd(run_dir, socket_name)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, f"/proc/self/fd/{fd}")
        return sock
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(fd)


async def connect(run_dir: Path, socket_name: str = "agent.sock", timeout: float = 10.0) -> AgentClient:
    """Connect to the agent whose socket is `run_dir/socket_name` and shake hands.

    `run_dir` is writable by the sandbox, so the socket is opened without following symlinks
    and must be a socket. Retries (2 ms, backing off to 50 ms) until `timeout`; raises
    AgentConnectionError when it cannot connect in time or the handshake fails.
    """
    deadline = time.monotonic() + timeout
    delay = 0.002
    last: BaseException | None = None
    while True:
        try:
            sock = await _connect_socket(Path(run_dir), socket_name)
            break
        except (OSError, AgentConnectionError) as e:  # missing yet, stale, planted, refused
            last = e
        if time.monotonic() + delay > deadline:
            raise AgentConnectionError(
                f"cannot connect to the agent at {run_dir}/{socket_name}: {last}") from last
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.05)
    client = AgentClient(sock)
    try:
        left = max(deadline - time.monotonic(), 0.5)
        kind, reply = await client.request("HELLO", [("VERSION", VERSION)], timeout=left)
        if kind != "HELLO" or reply.get("VERSION") != VERSION:
            raise AgentConnectionError(
                f"agent protocol version {reply.get('VERSION')!r}, this host speaks {VERSION}")
        _check(reply, PID=int, AGENT=str)
        client.pid, client.version, client.agent = reply["PID"], reply["VERSION"], reply["AGENT"]
    except OSError as e:
        await client.close()
        if isinstance(e, AgentConnectionError):
            raise
        raise AgentConnectionError(f"agent refused the handshake: {e}") from e
    except BaseException:
        await client.close()
        raise
    return client


# ---------------------------------------------------------------- the client


class AgentWatch:
    """A WATCH: `async with client.watch(path) as w: async for path, kind in w: ...`."""

    def __init__(self, client: AgentClient, path: str, recursive: bool):
        self._client = client
        self._path = path
        self._recursive = recursive
        self._id: int | None = None
        self._queue: asyncio.Queue = asyncio.Queue()
        self._reply: asyncio.Future | None = None
        self._overflowed = False

    async def __aenter__(self) -> AgentWatch:
        fields: list[tuple[str, object]] = [("PATH", self._path)]
        if self._recursive:
            fields.append(("RECURSIVE", 1))
        self._id, self._reply = await self._client._send("WATCH", fields, watch=self)
        try:
            await self._reply
        except BaseException:
            self._client._watches.pop(self._id, None)
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._id is None or self._client._closed_flag:
            return
        watch_id, self._id = self._id, None
        fut = asyncio.get_running_loop().create_future()
        self._client._pending[watch_id] = fut  # the OK to UNWATCH carries the WATCH's id
        self._client._watches.pop(watch_id, None)
        try:
            await self._client._write(encode_frame("UNWATCH", watch_id, []))
            await asyncio.wait_for(fut, 10)
        except (OSError, asyncio.TimeoutError):
            pass  # the watch ends with the connection anyway
        finally:
            self._client._pending.pop(watch_id, None)

    def _event(self, kind: str, reply: dict) -> None:
        if kind != "EVENT":
            return
        path, k = reply.get("PATH"), reply.get("KIND")
        if not isinstance(path, str) or not isinstance(k, int) or k not in _KIND_NAMES:
            return
        if self._queue.qsize() >= _WATCH_QUEUE_MAX:
            if not self._overflowed:  # the consumer is behind: say so once, drop the rest
                self._overflowed = True
                self._queue.put_nowait((path, "Overflow"))
            return
        self._overflowed = False
        self._queue.put_nowait((path, _KIND_NAMES[k]))

    def _lost(self) -> None:
        self._queue.put_nowait(None)

    def __aiter__(self) -> AsyncIterator[tuple[str, str]]:
        return self

    async def __anext__(self) -> tuple[str, str]:
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)
            raise AgentConnectionError("agent connection lost")
        return item


class AgentClient:
    """One connection to an agent. Requests may be pipelined from many tasks at once."""

    def __init__(self, sock: socket.socket):
        self.pid = 0
        self.version = 0
        self.agent = ""
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self.closed: asyncio.Future = self._loop.create_future()
        self._closed_flag = False
        self._pending: dict[int, asyncio.Future] = {}
        self._watches: dict[int, AgentWatch] = {}
        # (exec id, "stdout"|"stderr"|"wait") -> (request id, offset, reply future): requests
        # sent with an EXEC whose replies `read`/`wait` claim (see `exec`).
        self._early: dict[tuple[str, str], tuple[int, int, asyncio.Future]] = {}
        # exec id -> {"stdout": end, "stderr": end}: the streams' final lengths from EXITED, so a
        # READ at a stream's end is answered EOF here (dict order: oldest first, ENDS_MAX kept).
        self._ends: dict[str, dict[str, int]] = {}
        self._next_id = 1
        self._write_lock = asyncio.Lock()  # guards self._writer: frames never interleave
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ready = asyncio.Event()
        self._task = self._loop.create_task(self._run(), name="shoal-agent-reader")

    # -- connection plumbing

    async def _run(self) -> None:
        error: BaseException = AgentConnectionError("agent connection closed")
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(
                sock=self._sock, limit=2 * MAX_PAYLOAD)
            self._ready.set()
            while True:
                head = await self._reader.readexactly(4)
                (length,) = struct.unpack("<I", head)
                if length < 5 or length - 5 > MAX_PAYLOAD:
                    raise _ProtocolError(f"frame length {length} out of bounds")
                body = await self._reader.readexactly(length)
                kind, req_id = body[0], int.from_bytes(body[1:5], "little")
                self._dispatch(kind, req_id, memoryview(body)[5:])
        except asyncio.CancelledError:
            error = AgentConnectionError("agent connection closed by this host")
        except _ProtocolError as e:
            error = AgentConnectionError(f"bad frame from the agent: {e}")
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            error = AgentConnectionError(f"agent connection lost: {e or type(e).__name__}")
        finally:
            self._shutdown(error)

    def _dispatch(self, kind: int, req_id: int, payload: memoryview) -> None:
        fields = _decode_fields(payload)
        name = _TYPE_NAMES.get(kind)
        if name is None:
            return  # unknown types are ignored
        if name == "EVENT":  # only ever for a live WATCH; late ones after UNWATCH are dropped
            watch = self._watches.get(req_id)
            if watch is not None:
                watch._event(name, fields)
            return
        fut = self._pending.pop(req_id, None)
        if fut is None or fut.done():
            return  # a reply nobody waits for (timed out): dropped
        if name == "ERROR":
            code, msg = fields.get("ERRNO"), fields.get("MESSAGE", "")
            if not isinstance(code, int) or not isinstance(msg, str):
                raise _ProtocolError("ERROR without a valid ERRNO/MESSAGE")
            fut.set_exception(OSError(code, msg or os.strerror(code)))
        else:
            fut.set_result((name, fields))

    def _shutdown(self, error: BaseException) -> None:
        if self._closed_flag:
            return
        self._closed_flag = True
        self._ready.set()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(error)
        self._pending.clear()
        self._early.clear()
        self._ends.clear()
        for w in self._watches.values():
            w._lost()
        self._watches.clear()
        if self._writer is not None:
            self._writer.close()
        else:
            self._sock.close()
        if not self.closed.done():
            self.closed.set_result(None)

    async def close(self) -> None:
        """Close the connection; requests in flight fail with AgentConnectionError."""
        if not self._task.done():
            self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            if not self._task.cancelled():
                raise
        if self._writer is not None:
            try:
                await self._writer.wait_closed()
            except OSError:
                pass

    async def _write(self, frame: bytes) -> None:
        await self._ready.wait()
        if self._closed_flag or self._writer is None:
            raise AgentConnectionError("agent connection closed")
        async with self._write_lock:
            self._writer.write(frame)
            try:
                await self._writer.drain()
            except (ConnectionError, OSError) as e:
                raise AgentConnectionError(f"agent connection lost: {e}") from e

    def _new_id(self) -> int:
        while True:
            req_id = self._next_id
            self._next_id = self._next_id + 1 if self._next_id < 0xFFFFFFFF else 1
            if req_id not in self._pending and req_id not in self._watches:
                return req_id

    async def _send(self, type_name: str, fields: list[tuple[str, object]],
                    watch: AgentWatch | None = None) -> tuple[int, asyncio.Future]:
        """Queues one request; returns its id and the future of its reply."""
        if self._closed_flag:
            raise AgentConnectionError("agent connection closed")
        req_id = self._new_id()
        frame = encode_frame(type_name, req_id, fields)
        fut = self._loop.create_future()
        self._pending[req_id] = fut
        if watch is not None:
            self._watches[req_id] = watch
        try:
            await self._write(frame)
        except BaseException:
            self._pending.pop(req_id, None)
            self._watches.pop(req_id, None)
            if fut.done():
                fut.exception()  # the connection failed it; this error is the one reported
            else:
                fut.cancel()
            raise
        return req_id, fut

    async def _send_batch(self, requests: list[tuple[str, list[tuple[str, object]]]]
                          ) -> list[tuple[int, asyncio.Future]]:
        """Queues several requests in one write (one wake-up of the agent, which handles them
        in order); returns the id and reply future of each."""
        if self._closed_flag:
            raise AgentConnectionError("agent connection closed")
        sent: list[tuple[int, asyncio.Future]] = []
        frames = []
        for type_name, fields in requests:
            req_id = self._new_id()
            frames.append(encode_frame(type_name, req_id, fields))
            fut = self._loop.create_future()
            self._pending[req_id] = fut
            sent.append((req_id, fut))
        try:
            await self._write(b"".join(frames))
        except BaseException:
            for req_id, fut in sent:
                self._pending.pop(req_id, None)
                if fut.done():
                    fut.exception()
                else:
                    fut.cancel()
            raise
        return sent

    async def _claimed(self, req_id: int, fut: asyncio.Future) -> tuple[str, dict]:
        try:
            return await fut
        finally:
            if not fut.done():
                self._pending.pop(req_id, None)
                fut.cancel()

    def _drop_early_one(self, entry: tuple[int, int, asyncio.Future]) -> None:
        if not entry[2].done():
            self._pending.pop(entry[0], None)
            entry[2].cancel()

    def _drop_early(self, exec_id: str, *which: str) -> None:
        for what in which or ("stdout", "stderr", "wait"):
            entry = self._early.pop((exec_id, what), None)
            if entry is not None:
                self._drop_early_one(entry)

    async def request(self, type_name: str, fields: list[tuple[str, object]],
                      timeout: float | None = None) -> tuple[str, dict]:
        """Send one request and return (reply type name, {tag name: value}).

        ERROR replies raise OSError(errno, message) (so ENOENT is FileNotFoundError, ...);
        a lost connection raises AgentConnectionError; `timeout` raises TimeoutError.
        """
        req_id, fut = await self._send(type_name, fields)
        try:
            if timeout is None:
                return await fut
            return await asyncio.wait_for(fut, timeout)
        finally:
            if not fut.done():
                self._pending.pop(req_id, None)
                fut.cancel()

    async def _ok(self, type_name: str, fields: list[tuple[str, object]],
                  timeout: float | None = None) -> dict:
        _, reply = await self.request(type_name, fields, timeout)
        return reply

    # -- exec

    async def exec(self, exec_id: str, argv: list[str], env: dict[str, str], cwd: str | None = None,
                   uid: int = 0, gid: int = 0, stdin: str = "pipe", stdout: str = "pipe",
                   stderr: str = "pipe", timeout_ms: int | None = None,
                   pty: tuple[int, int] | None = None) -> int:
        """Start argv[0] with exactly `env` as exec session `exec_id`; returns its pid.

        Modes are "pipe" or "null" (stderr also "stdout"). A command that cannot run still
        starts (exit 127/126 with the shell's message on stderr). Raises FileExistsError for an
        id in use, OSError(EMFILE) past max_sessions, ValueError for a bad mode.
        """
        if not argv:
            raise ValueError("argv must not be empty")
        fields: list[tuple[str, object]] = [("EXEC_ID", exec_id)]
        fields += [("ARG", a) for a in argv]
        fields += [("ENV", f"{k}={v}") for k, v in env.items()]
        if cwd is not None:
            fields.append(("CWD", cwd))
        fields += [("UID", uid), ("GID", gid)]
        for tag, value in (("STDIN_MODE", stdin), ("STDOUT_MODE", stdout), ("STDERR_MODE", stderr)):
            modes = ENUMS[tag]
            if value.upper() not in modes:
                raise ValueError(f"{tag.lower()} must be one of {sorted(m.lower() for m in modes)}, "
                                 f"not {value!r}")
            fields.append((tag, modes[value.upper()]))
        if timeout_ms is not None:
            fields.append(("TIMEOUT_MS", int(timeout_ms)))
        if pty is not None:
            fields += [("PTY_ROWS", int(pty[0])), ("PTY_COLS", int(pty[1]))]
        # Everyone who starts a command waits for it and reads its piped streams from offset 0:
        # those requests go in the EXEC's write. The agent handles a connection's requests in
        # order, so they find the session, and their answers come as soon as the process has
        # output (a round trip to the agent sooner; under gVisor each wake-up of the sandbox
        # costs ~1-4 ms). `read` and `wait` claim them.
        early: list[tuple[str, str, list[tuple[str, object]]]] = []
        if len(self._early) + 3 <= EARLY_MAX and exec_id not in {k[0] for k in self._early}:
            for name, mode in (("stdout", stdout), ("stderr", stderr)):
                if mode.upper() == "PIPE" and not (pty is not None and name == "stderr"):
                    early.append((name, "READ", [("EXEC_ID", exec_id),
                                                 ("STREAM", _STREAMS[name.upper()]),
                                                 ("OFFSET", 0), ("MAX", EARLY_READ)]))
            early.append(("wait", "WAIT", [("EXEC_ID", exec_id)]))
        sent = await self._send_batch([("EXEC", fields)] + [(t, f) for _, t, f in early])
        for (req_id, fut), (what, _, _) in zip(sent[1:], early):
            fut.add_done_callback(_retrieve)  # an unclaimed failure is not logged as unretrieved
            self._early[(exec_id, what)] = (req_id, 0, fut)
        try:
            _, reply = await self._claimed(*sent[0])
        except BaseException:
            self._drop_early(exec_id)  # (an EEXIST's would read the other session)
            raise
        return _check(reply, PID=int)["PID"]

    async def read(self, exec_id: str, stream: str, offset: int, max: int | None = None) -> tuple[bytes, bool]:
        """Bytes of `stream` ("stdout"/"stderr") from `offset`, waiting until some exist.

        Returns (data, eof). Reading at `offset` lets the agent drop what lies before it
        (beyond its retain window); raises OSError(ERANGE) for an offset no longer held.
        """
        if stream.upper() not in _STREAMS:
            raise ValueError(f"stream must be 'stdout' or 'stderr', not {stream!r}")
        fields: list[tuple[str, object]] = [("EXEC_ID", exec_id), ("STREAM", _STREAMS[stream.upper()]),
                                            ("OFFSET", offset)]
        if max is not None:
            fields.append(("MAX", max))
        end = self._ends.get(exec_id, {}).get(stream.lower())
        if end == offset:  # the process has exited and every byte of this stream was read
            self._drop_early(exec_id, stream.lower())
            return b"", True
        early = self._early.pop((exec_id, stream.lower()), None)
        if early is not None and early[1] == offset and (max is None or max >= EARLY_READ):
            _, reply = await self._claimed(early[0], early[2])
        else:
            if early is not None:
                self._drop_early_one(early)
            _, reply = await self.request("READ", fields)
        reply = _check(reply, DATA=bytes)
        eof = reply.get("EOF", 0)
        if not isinstance(eof, int):
            raise AgentConnectionError("agent reply lacks a valid EOF field")
        return reply["DATA"], bool(eof)

    async def wait(self, exec_id: str) -> tuple[int, bool]:
        """Wait until the process exited and its output is fully readable: (code, timed_out).

        The agent's answer says how long each stream ended up; after it, a `read` at a stream's
        end returns (b"", True) without asking the agent."""
        early = self._early.pop((exec_id, "wait"), None)
        if early is not None:
            _, reply = await self._claimed(early[0], early[2])
        else:
            reply = await self._ok("WAIT", [("EXEC_ID", exec_id)])
        reply = _check(reply, CODE=int)
        out_end, err_end = reply.get("STDOUT_END"), reply.get("STDERR_END")
        if isinstance(out_end, int) and isinstance(err_end, int) and out_end >= 0 \
                and err_end >= 0:  # (an older agent does not send them)
            self._ends.pop(exec_id, None)
            self._ends[exec_id] = {"stdout": out_end, "stderr": err_end}
            while len(self._ends) > ENDS_MAX:
                del self._ends[next(iter(self._ends))]
        return reply["CODE"], bool(reply.get("TIMED_OUT", 0))

    async def exit(self, exec_id: str) -> tuple[int, bool]:
        """(code, timed_out) as soon as the process has exited, even while a process it started
        holds its output open (WAIT EXIT_ONLY; an older agent answers when the output ends)."""
        reply = _check(await self._ok("WAIT", [("EXEC_ID", exec_id), ("EXIT_ONLY", 1)]),
                       CODE=int)
        return reply["CODE"], bool(reply.get("TIMED_OUT", 0))

    async def stdin(self, exec_id: str, offset: int, data: bytes = b"", eof: bool = False) -> int:
        """Write `data` at stdin position `offset` (repeats are not written twice); returns
        the number of stdin bytes the agent has accepted. `eof` closes stdin afterwards."""
        chunks = [data[i:i + MAX_DATA] for i in range(0, len(data), MAX_DATA)] or [b""]
        futs = []
        for i, chunk in enumerate(chunks):
            fields: list[tuple[str, object]] = [("EXEC_ID", exec_id), ("OFFSET", offset + i * MAX_DATA)]
            if chunk:
                fields.append(("DATA", chunk))
            if eof and i == len(chunks) - 1:
                fields.append(("EOF", 1))
            futs.append((await self._send("STDIN", fields))[1])
        accepted = 0
        for _, reply in await _gather_first_error(futs):
            accepted = _check(reply, OFFSET=int)["OFFSET"]
        return accepted

    async def signal(self, exec_id: str, signo: int) -> None:
        """Send `signo` to the session's process group (ProcessLookupError once it is gone)."""
        await self._ok("SIGNAL", [("EXEC_ID", exec_id), ("SIGNO", int(signo))])

    async def resize(self, exec_id: str, rows: int, cols: int) -> None:
        """Resize the session's pty (the process gets SIGWINCH)."""
        await self._ok("RESIZE", [("EXEC_ID", exec_id), ("PTY_ROWS", rows), ("PTY_COLS", cols)])

    async def resize_entry(self, rows: int, cols: int) -> None:
        """Resize the entry-point's pty (started with `--pty`; it gets SIGWINCH)."""
        await self._ok("RESIZE_ENTRY", [("PTY_ROWS", rows), ("PTY_COLS", cols)])

    async def forget(self, exec_id: str) -> None:
        """Kill the session's process group if it still runs and free the session."""
        self._drop_early(exec_id)
        self._ends.pop(exec_id, None)
        await self._ok("FORGET", [("EXEC_ID", exec_id)])

    async def list_execs(self) -> list[dict]:
        """[{"exec_id", "pid", "state" ("RUNNING"/"EXITED"), "code" (or None)}]."""
        states = {v: k for k, v in ENUMS["STATE"].items()}
        out = []
        for e in (await self._ok("LIST_EXECS", [])).get("ENTRY", []):
            _check(e, EXEC_ID=str, PID=int, STATE=int)
            out.append({"exec_id": e["EXEC_ID"], "pid": e["PID"],
                        "state": states.get(e["STATE"], "UNKNOWN"), "code": e.get("CODE")})
        return out

    # -- files

    @staticmethod
    def _stat_dict(f: dict) -> dict:
        _check(f, TYPE=int, SIZE=int, MODE=int, UID=int, GID=int, MTIME_NS=int)
        link = f.get("LINK")
        return {"type": _FILE_TYPES.get(f["TYPE"], "OTHER"), "size": f["SIZE"], "mode": f["MODE"],
                "uid": f["UID"], "gid": f["GID"], "mtime": f["MTIME_NS"] / 1e9,
                "link": link if isinstance(link, str) else None}

    async def stat(self, path: str) -> dict:
        """lstat of `path`: type ("FILE"/"DIRECTORY"/"SYMLINK"/"OTHER"), size, mode, uid, gid,
        mtime (seconds), link (a symlink's target, else None)."""
        return self._stat_dict(await self._ok("STAT", [("PATH", path)]))

    async def listdir(self, path: str) -> list[dict]:
        """Every entry of directory `path`, sorted by name, each a stat() dict plus "name"."""
        out: list[dict] = []
        while True:
            reply = await self._ok("LIST", [("PATH", path), ("START", len(out))])
            entries = reply.get("ENTRY", [])
            for e in entries:
                item = self._stat_dict(_check(e, NAME=str))
                item["name"] = e["NAME"]
                out.append(item)
            if not reply.get("MORE") or not entries:
                return out

    async def read_file(self, path: str, offset: int, length: int) -> tuple[bytes, bool, int]:
        """Up to `length` (at most max_data) bytes of a regular file: (data, eof, size)."""
        reply = await self._ok("READ_FILE", [("PATH", path), ("OFFSET", offset), ("LENGTH", length)])
        _check(reply, DATA=bytes, SIZE=int)
        return reply["DATA"], bool(reply.get("EOF", 0)), reply["SIZE"]

    async def write_begin(self, path: str, parents: bool = False, mode: int | None = None) -> int:
        """Start an atomic whole-file write of `path`; returns the handle."""
        fields: list[tuple[str, object]] = [("PATH", path)]
        if parents:
            fields.append(("PARENTS", 1))
        if mode is not None:
            fields.append(("MODE", mode))
        return _check(await self._ok("WRITE_BEGIN", fields), HANDLE=int)["HANDLE"]

    async def _pipelined(self, type_name: str, handle: int, data: bytes) -> None:
        chunks = [data[i:i + MAX_DATA] for i in range(0, len(data), MAX_DATA)] or [b""]
        # The agent handles a connection's requests in order, so pipelined chunks append in order.
        futs = [(await self._send(type_name, [("HANDLE", handle), ("DATA", c)]))[1] for c in chunks]
        await _gather_first_error(futs)

    async def write_chunk(self, handle: int, data: bytes) -> None:
        """Append `data` (split into max_data frames, pipelined) to a write_begin handle."""
        await self._pipelined("WRITE_CHUNK", handle, data)

    async def write_commit(self, handle: int) -> None:
        """Replace the target with the written file in one step."""
        await self._ok("WRITE_COMMIT", [("HANDLE", handle)])

    async def write_abort(self, handle: int) -> None:
        """Discard a write_begin handle."""
        await self._ok("WRITE_ABORT", [("HANDLE", handle)])

    async def mkdir(self, path: str, parents: bool = False, exist_ok: bool = False) -> None:
        fields: list[tuple[str, object]] = [("PATH", path)]
        if parents:
            fields.append(("PARENTS", 1))
        if exist_ok:
            fields.append(("EXIST_OK", 1))
        await self._ok("MKDIR", fields)

    async def remove(self, path: str, recursive: bool = False) -> None:
        """Remove a file, symlink or empty directory (any directory with `recursive`)."""
        await self._ok("REMOVE", [("PATH", path)] + ([("RECURSIVE", 1)] if recursive else []))

    async def rename(self, src: str, dst: str, overwrite: bool = False) -> None:
        """Rename; FileExistsError when `dst` exists unless `overwrite`."""
        await self._ok("RENAME", [("PATH", src), ("PATH2", dst)] + ([("OVERWRITE", 1)] if overwrite else []))

    async def h_open(self, path: str, flags: int) -> int:
        """Open a file handle; `flags` ORs OPEN_FLAGS values (READ, WRITE, CREATE, ...)."""
        return _check(await self._ok("H_OPEN", [("PATH", path), ("FLAGS", flags)]), HANDLE=int)["HANDLE"]

    async def h_read(self, handle: int, length: int, line: bool = False) -> tuple[bytes, bool]:
        """Read up to `length` bytes (with `line`, up to and including the first newline)."""
        fields: list[tuple[str, object]] = [("HANDLE", handle), ("LENGTH", length)]
        if line:
            fields.append(("LINE", 1))
        reply = _check(await self._ok("H_READ", fields), DATA=bytes)
        return reply["DATA"], bool(reply.get("EOF", 0))

    async def h_write(self, handle: int, data: bytes) -> None:
        await self._pipelined("H_WRITE", handle, data)

    async def h_seek(self, handle: int, offset: int, whence: int) -> int:
        return _check(await self._ok("H_SEEK", [("HANDLE", handle), ("OFFSET", offset),
                                                ("WHENCE", whence)]), OFFSET=int)["OFFSET"]

    async def h_flush(self, handle: int) -> None:
        await self._ok("H_FLUSH", [("HANDLE", handle)])

    async def h_close(self, handle: int) -> None:
        await self._ok("H_CLOSE", [("HANDLE", handle)])

    # -- watches and probes

    def watch(self, path: str, recursive: bool = False) -> AgentWatch:
        """Watch `path`: an async context manager yielding (path, kind) events, kind one of
        "Create", "Modify", "Remove", "Access", "Overflow". Errors raise on entering."""
        return AgentWatch(self, path, recursive)

    async def quiesce(self, timeout_ms: int = 30_000) -> None:
        """Ask the agent to close this and every connection and its listening socket (for a
        gVisor checkpoint); it listens again on signal RELISTEN or after `timeout_ms`."""
        await self._ok("QUIESCE", [("TIMEOUT_MS", timeout_ms)])

    async def probe_tcp(self, port: int, timeout_ms: int = 1000) -> bool:
        """True when a TCP connection to 127.0.0.1:port inside the sandbox succeeds."""
        try:
            await self._ok("PROBE_TCP", [("PORT", port), ("TIMEOUT_MS", timeout_ms)])
            return True
        except OSError as e:
            if isinstance(e, AgentConnectionError) or e.errno not in (
                    errno_mod.ECONNREFUSED, errno_mod.ETIMEDOUT):
                raise
            return False
