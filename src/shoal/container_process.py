"""A process started with `Sandbox.exec` (Modal's `modal.container_process.ContainerProcess`)."""

from __future__ import annotations


from shoal._client import get_client
from shoal._sync import synchronize_api
from shoal.io_streams import _StreamReader, _StreamWriter


class _ContainerProcess:
    """Handle to a running command: `stdout`, `stderr`, `stdin`, `wait()`, `poll()`,
    `returncode`. Exit codes follow the shell: 124 after the exec's `timeout`, 137 when killed."""

    def __init__(self, exec_id: str, text: bool = True):
        self._exec_id = exec_id
        self._returncode: int | None = None
        base = f"/execs/{exec_id}"
        self._stdout = _StreamReader(f"{base}/output/stdout", text=text)
        self._stderr = _StreamReader(f"{base}/output/stderr", text=text)
        self._stdin = _StreamWriter(f"{base}/stdin")

    @property
    def object_id(self) -> str:
        return self._exec_id

    @property
    def stdout(self) -> _StreamReader:
        return self._stdout

    @property
    def stderr(self) -> _StreamReader:
        return self._stderr

    @property
    def stdin(self) -> _StreamWriter:
        return self._stdin

    @property
    def returncode(self) -> int | None:
        """The exit code once `wait()` or `poll()` has seen the process end, else None."""
        return self._returncode

    async def _wait(self, timeout: float) -> int | None:
        client = await get_client()
        r = await client.call("GET", f"/execs/{self._exec_id}/wait", params={"timeout": timeout})
        if r["done"]:
            self._returncode = r["returncode"]
        return self._returncode

    async def poll(self) -> int | None:
        """The exit code if the process has ended, else None (does not block)."""
        if self._returncode is None:
            await self._wait(0)
        return self._returncode

    async def wait(self) -> int:
        """Wait for the process to end; returns its exit code."""
        while self._returncode is None:
            await self._wait(60)
        return self._returncode

    def __repr__(self) -> str:
        return f"ContainerProcess({self._exec_id}, returncode={self._returncode})"


ContainerProcess = synchronize_api(_ContainerProcess)
