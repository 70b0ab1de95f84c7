"""What a watch's event stream leaves behind when its client goes: the agent's (agent_files.py,
against a fake agent) and runc's host-side inotify one (runc_files.Watch)."""

from __future__ import annotations

import asyncio

from shoal.server import linux as _linux
from shoal.server.host.agent_files import AgentFiles
from shoal.server.host.runc_files import Watch


async def _leave_while_waiting(events) -> None:
    """A client that goes while the stream waits for an event (its answer's task is cancelled);
    then no task of the stream's may be left. One left pending would be destroyed pending
    ("Task was destroyed but it is pending" in the server log)."""
    reader = asyncio.create_task(events.__anext__())
    await asyncio.sleep(0.05)
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    await asyncio.sleep(0)  # (a cancelled task ends at its next turn)
    left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert left == [], left


class _QuietWatch:
    """An agent watch that started and never has an event."""

    def __init__(self) -> None:
        self.closed = False

    async def __aenter__(self):
        return self

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.Event().wait()

    async def aclose(self) -> None:
        self.closed = True


class _Agent:
    def __init__(self) -> None:
        self.watches: list[_QuietWatch] = []

    def watch(self, path: str, recursive: bool) -> _QuietWatch:
        self.watches.append(_QuietWatch())
        return self.watches[-1]


def test_an_agent_watch_whose_client_leaves_leaves_no_task_waiting():
    async def main():
        agent = _Agent()
        await _leave_while_waiting(
            await AgentFiles(None).watch(agent, "/tmp", False, None, asyncio.Event()))
        assert agent.watches[0].closed  # the agent's watch was stopped too
    asyncio.run(main())


def test_a_runc_watch_whose_client_leaves_leaves_no_task_waiting():
    async def main():
        watch = Watch(_linux.inotify_init())
        await _leave_while_waiting(watch.stream(None, asyncio.Event()))
        assert watch.closed
    asyncio.run(main())


def test_an_agent_watch_that_times_out_ends_quietly():
    """A watch with a timeout and no events ends at it: no error, no task left, the agent's
    watch stopped."""
    async def main():
        agent = _Agent()
        events = await AgentFiles(None).watch(agent, "/tmp", False, 0.1, asyncio.Event())
        assert [e async for e in events] == []
        await asyncio.sleep(0)
        assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
        assert agent.watches[0].closed
    asyncio.run(main())
