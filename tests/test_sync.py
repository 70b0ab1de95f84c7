"""The blocking API derived from the async one (no server needed)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from shoal._sync import in_callers_thread, known_without_io, synchronize_api


class _Counter:
    _constructible = True

    def __init__(self, start: int = 0):
        self.value = start

    async def add(self, n: int) -> int:
        await asyncio.sleep(0)
        self.value += n
        return self.value

    async def clone(self) -> "_Counter":
        return _Counter(self.value)

    async def same(self, other: "_Counter") -> bool:
        return other is self

    async def count_to(self, n: int):
        for i in range(n):
            yield i

    @classmethod
    @contextlib.asynccontextmanager
    async def scoped(cls):
        c = cls(100)
        yield c
        c.value = -1

    @property
    def doubled(self) -> int:
        return self.value * 2

    async def fail(self):
        raise KeyError("boom")


Counter = synchronize_api(_Counter)


def test_blocking_calls_and_aio_twins():
    c = Counter(1)
    assert c.add(2) == 3
    assert asyncio.run(c.add.aio(4)) == 7
    assert c.doubled == 14


def test_objects_are_wrapped_out_and_unwrapped_in():
    c = Counter(5)
    d = c.clone()
    assert type(d) is Counter and d.add(0) == 5
    assert c.same(c) is True and c.same(d) is False
    assert c.clone() is not c


def test_async_generators_become_iterators():
    c = Counter()
    assert list(c.count_to(3)) == [0, 1, 2]

    async def collect():
        return [i async for i in c.count_to.aio(3)]

    assert asyncio.run(collect()) == [0, 1, 2]


def test_async_context_managers_both_ways():
    with Counter.scoped() as c:
        assert type(c) is Counter and c.add(1) == 101

    async def use():
        async with Counter.scoped.aio() as c2:
            return await c2.add.aio(2)

    assert asyncio.run(use()) == 102


def test_errors_pass_through_unchanged():
    with pytest.raises(KeyError):
        Counter().fail()


def test_blocking_call_from_inside_a_running_loop_works():
    async def inner():
        return Counter(3).add(1)  # a blocking call from async code still completes

    assert asyncio.run(inner()) == 4


class _Box:
    """A value the SDK loop fills in later; `get` says whether it had to run on the loop."""

    _constructible = True

    def __init__(self):
        import threading

        self.value = None
        self.ready = threading.Event()
        self.hops = 0

    def _known(self):
        return self.value

    def _ready(self):
        return self.ready

    @known_without_io(_known, _ready)
    async def get(self):
        self.hops += 1
        while self.value is None:
            await asyncio.sleep(0.01)
        return self.value


Box = synchronize_api(_Box)


def test_a_known_answer_is_taken_in_the_callers_thread_once_the_loop_says_so():
    from shoal._sync import get_loop

    box = Box()
    impl = box._impl

    def fill(value):
        impl.value = value
        impl.ready.set()

    get_loop().call_soon_threadsafe(lambda: get_loop().call_later(0.2, fill, "done"))
    assert box.get() == "done" and impl.hops == 0  # waited for the event, no trip to the loop
    assert box.get() == "done" and impl.hops == 0  # known at once
    # Woken but still unknown (a full buffer, say): the call goes to the loop after all.
    other = Box()
    other._impl.ready.set()
    get_loop().call_soon_threadsafe(lambda: get_loop().call_later(0.1, setattr, other._impl,
                                                                  "value", "late"))
    assert other.get() == "late" and other._impl.hops == 1


class _Teller:
    """Says which thread ran its calls, and whether socket I/O there would block."""

    _constructible = True

    @in_callers_thread(lambda n, **k: n > 0)
    async def where(self, n: int) -> tuple[int, bool]:
        import threading

        from shoal._transport import BLOCKING

        return threading.get_ident(), BLOCKING.get()

    async def where_unmarked(self) -> int:
        import threading

        return threading.get_ident()


Teller = synchronize_api(_Teller)


def test_a_marked_call_runs_in_the_callers_thread_when_the_client_is_ready(monkeypatch):
    import threading

    from shoal import _sync
    from shoal._transport import BLOCKING

    t = Teller()
    me = threading.get_ident()
    monkeypatch.setattr(_sync, "_direct_ready", lambda: True)
    assert t.where(1) == (me, True)
    assert not BLOCKING.get()  # set only in the call's own context
    assert t.where(0)[0] != me  # its `when` said no: on the SDK loop, as every other call
    assert t.where_unmarked() != me
    assert asyncio.run(t.where.aio(1)) == (_sync._loop.thread.ident, False)  # the async face
    monkeypatch.setattr(_sync, "_direct_ready", lambda: False)  # no client yet, or a fork
    assert t.where(1) == (_sync._loop.thread.ident, False)


def test_run_direct_refuses_a_coroutine_that_waits_on_a_loop_and_keeps_typed_errors():
    from shoal import exception
    from shoal._sync import run_direct

    closed = []

    async def waits():
        try:
            await asyncio.sleep(0)
        finally:
            closed.append(True)

    with pytest.raises(RuntimeError, match="waited on an event loop"):
        run_direct(waits())
    assert closed == [True]  # the coroutine was closed, its finally blocks ran

    async def fails():
        raise exception.NotFoundError("nope")

    with pytest.raises(exception.NotFoundError) as info:
        run_direct(fails())
    import traceback

    frames = [f.f_code.co_name for f, _ in traceback.walk_tb(info.value.__traceback__)]
    assert "fails" not in frames  # the SDK's own frames are not shown

    async def ok():
        return 42

    assert run_direct(ok()) == 42
