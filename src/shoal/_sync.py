"""One async implementation, two faces: the blocking API is derived from the async one.

Every SDK class is written once, async, with a leading underscore (`_Sandbox`). `synchronize_api`
derives the public class (`Sandbox`) from it: each async method becomes a blocking method that also
carries the async original as `.aio`, as in Modal:

    sb = Sandbox.create()                  # blocking
    sb = await Sandbox.create.aio()        # async

All coroutines run on one event loop in a daemon thread owned by the SDK, whichever face called
them, so the SDK's connections never cross event loops, with one exception: a method marked
`in_callers_thread` (a call that is only requests and answers, such as a file read or starting an
exec) runs, from the blocking face, in the caller's own thread with blocking socket I/O
(`run_direct`): no hop to the loop's thread and back (two thread wake-ups, ~0.4 ms after a pause
on a 2-core machine). Its coroutine never waits on the loop there; what needs the loop is sent
to it (`run_blocking`, `on_loop`). The wrappers translate at the boundary:
implementation objects going out become public objects, public objects coming in become
implementation objects; async iterators and async context managers become their blocking kin.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import os
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from shoal._transport import BLOCKING
from shoal.exception import is_typed

_IMPL_TO_PUBLIC: dict[type, type] = {}


class _Loop:
    """The SDK's event loop thread, started on first use (and again after a fork)."""

    def __init__(self) -> None:
        self.mu = threading.Lock()  # guards loop, thread and pid
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.pid = 0

    def get(self) -> asyncio.AbstractEventLoop:
        with self.mu:
            if self.loop is None or self.pid != os.getpid() or not self.thread.is_alive():
                self.loop = asyncio.new_event_loop()
                self.thread = threading.Thread(target=self.loop.run_forever, name="shoal-sdk-loop",
                                               daemon=True)
                self.thread.start()
                self.pid = os.getpid()
            return self.loop


_loop = _Loop()


def get_loop() -> asyncio.AbstractEventLoop:
    return _loop.get()


def run_blocking(coro) -> Any:
    loop = get_loop()
    if threading.current_thread() is _loop.thread:
        coro.close()
        raise RuntimeError("a blocking shoal call was made from inside the SDK's event loop; "
                           "use the .aio variant")
    task: list[asyncio.Task] = []

    async def runner():
        task.append(asyncio.current_task())
        BLOCKING.set(False)  # (its context is copied from a caller that may run_direct)
        return await coro

    fut = asyncio.run_coroutine_threadsafe(runner(), loop)
    try:
        return fut.result()
    except BaseException as err:
        # Ctrl-C in the caller cancels the work on the loop too: through the task, on the loop's
        # thread (cancelling `fut` from here races with its completion there).
        loop.call_soon_threadsafe(lambda: task and task[0].cancel())
        if is_typed(err):
            # A typed error says what was wrong with the call; the SDK's frames would only hide it.
            raise err.with_traceback(None) from None
        raise


def run_direct(coro) -> Any:
    """Run `coro` to its end in the calling thread, its socket I/O blocking (BLOCKING set in a
    copy of the caller's context, as a task would have). For `in_callers_thread` methods only:
    one that tried to wait on an event loop is a bug, reported as such."""
    ctx = contextvars.copy_context()
    ctx.run(BLOCKING.set, True)
    try:
        ctx.run(coro.send, None)
    except StopIteration as done:
        return done.value
    except BaseException as err:
        if is_typed(err):
            raise err.with_traceback(None) from None
        raise
    ctx.run(coro.close)
    raise RuntimeError("shoal: a call run in the caller's thread waited on an event loop")


def on_loop(fn: Callable[[], Any]) -> asyncio.AbstractEventLoop:
    """Call `fn()` soon on the SDK loop's thread (from any thread; in a fresh context, so it
    never sees BLOCKING set); returns the loop."""
    loop = get_loop()
    loop.call_soon_threadsafe(fn, context=contextvars.Context())
    return loop


async def run_async(coro) -> Any:
    loop = get_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        return await coro
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))


# --- translation at the boundary -----------------------------------------------------------


def to_impl(value: Any) -> Any:
    impl = getattr(value, "_impl", None)
    if impl is not None and type(value) in _IMPL_TO_PUBLIC.values():
        return impl
    if isinstance(value, dict):
        return {k: to_impl(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_impl(v) for v in value)
    return value


def to_public(value: Any) -> Any:
    public = _IMPL_TO_PUBLIC.get(type(value))
    if public is not None:
        return wrap(value)
    if isinstance(value, list):
        return [to_public(v) for v in value]
    if isinstance(value, tuple) and type(value) is tuple:
        return tuple(to_public(v) for v in value)
    if isinstance(value, dict):
        return {k: to_public(v) for k, v in value.items()}
    return value


def wrap(impl: Any) -> Any:
    """The public object for an implementation object (one per implementation object)."""
    existing = getattr(impl, "_public", None)
    if existing is not None:
        return existing
    public = object.__new__(_IMPL_TO_PUBLIC[type(impl)])
    object.__setattr__(public, "_impl", impl)
    try:
        object.__setattr__(impl, "_public", public)
    except AttributeError:
        pass
    return public


def _is_async_cm(value: Any) -> bool:
    return hasattr(value, "__aenter__") and type(value) not in _IMPL_TO_PUBLIC


def _blocking_iter(agen: AsyncIterator):
    done = False
    try:
        while True:
            try:
                item = run_blocking(agen.__anext__())
            except StopAsyncIteration:
                done = True
                return
            yield to_public(item)
    finally:
        if not done and hasattr(agen, "aclose"):
            run_blocking(agen.aclose())


async def _async_iter(agen: AsyncIterator):
    done = False
    try:
        while True:
            try:
                item = await run_async(agen.__anext__())
            except StopAsyncIteration:
                done = True
                return
            yield to_public(item)
    finally:
        if not done and hasattr(agen, "aclose"):
            await run_async(agen.aclose())


class _BlockingCM:
    """What a blocking call that makes a context manager returns. It also works with `async with`
    (`async with Volume.ephemeral() as vol:`), as Modal's do: entering and leaving then await the
    SDK loop instead of blocking the caller's."""

    def __init__(self, acm: Any):
        self._acm = acm

    def __enter__(self):
        return to_public(run_blocking(self._acm.__aenter__()))

    def __exit__(self, *exc_info):
        return run_blocking(self._acm.__aexit__(*exc_info))

    async def __aenter__(self):
        return to_public(await run_async(self._acm.__aenter__()))

    async def __aexit__(self, *exc_info):
        return await run_async(self._acm.__aexit__(*exc_info))


class _AsyncCM:
    def __init__(self, acm: Any):
        self._acm = acm

    async def __aenter__(self):
        return to_public(await run_async(self._acm.__aenter__()))

    async def __aexit__(self, *exc_info):
        return await run_async(self._acm.__aexit__(*exc_info))


def _blocking_next(self):
    try:
        return run_blocking(self._impl.__anext__())
    except StopAsyncIteration:
        raise StopIteration from None


def _translate_result(value: Any, iterate: Callable, manage: type) -> Any:
    if inspect.isasyncgen(value) or (hasattr(value, "__anext__") and
                                     type(value) not in _IMPL_TO_PUBLIC):
        return iterate(value)
    if _is_async_cm(value):
        return manage(value)
    return to_public(value)


def _blocking_result(value: Any) -> Any:
    return _translate_result(value, _blocking_iter, _BlockingCM)


def _async_result(value: Any) -> Any:
    return _translate_result(value, _async_iter, _AsyncCM)


def known_without_io(check: Callable[[Any], Any],
                     ready: Callable[[Any], threading.Event | None] | None = None) -> Callable:
    """Mark an async method whose answer may already be known in the caller's thread:
    `check(impl)` returns it, or None when it is not. The blocking face then returns it without
    the hop to the SDK loop's thread and back (~0.2 ms); the async face is unchanged. `check`
    may only read plain attributes that the loop sets once (it runs in the caller's thread).

    `ready(impl)`, if given, returns a threading.Event that the loop sets once `check` can
    answer (or None): the blocking face waits for it in the caller's thread, woken once by the
    loop, instead of sending the call there and waiting for its answer."""
    def mark(fn: Callable) -> Callable:
        fn._shoal_known = check
        fn._shoal_ready = ready
        return fn
    return mark


def in_callers_thread(when: Callable[..., bool] | None = None) -> Callable:
    """Mark an async method that the blocking face may run in the caller's thread (`run_direct`)
    when the SDK's client to the server is ready and `when(*args, **kwargs)` (if given) holds.
    Its coroutine may await only the client's requests and answers (client.call, client.send,
    client.stream and their bodies) and coroutines that never suspend; whatever must run on the
    loop goes there with `on_loop` (or `run_blocking`, which waits for it). The async face is
    unchanged."""
    def mark(fn: Callable) -> Callable:
        fn._shoal_direct = when or (lambda *a, **k: True)
        return fn
    return mark


def _direct_ready() -> bool:
    """Whether a blocking call may run in this thread: the SDK loop runs in this process, this
    is not its thread, and its client reaches the server through shoal's own transport."""
    from shoal._client import ready_client  # (that module's users import this one)

    loop, thread = _loop.loop, _loop.thread
    return (loop is not None and thread is not None and _loop.pid == os.getpid()
            and thread.is_alive() and threading.current_thread() is not thread
            and ready_client(loop) is not None)


def _call_blocking(fn: Callable, args: tuple, kwargs: dict) -> Any:
    """`fn(*args, **kwargs)` for the blocking face (public arguments in, the implementation's
    result out): in this thread if `fn` is marked `in_callers_thread` and may, else a coroutine
    goes to the SDK loop."""
    direct = getattr(fn, "_shoal_direct", None)
    if direct is not None and direct(*args, **kwargs) and _direct_ready():
        return run_direct(fn(*to_impl(args), **to_impl(kwargs)))
    result = fn(*to_impl(args), **to_impl(kwargs))
    return run_blocking(result) if inspect.iscoroutine(result) else result


def _wait_set(event: threading.Event) -> bool:
    """Wait for `event` (Ctrl-C interrupts); False if the SDK loop's thread is gone (a fork)."""
    while not event.wait(0.5):
        thread = _loop.thread
        if thread is None or not thread.is_alive() or _loop.pid != os.getpid():
            return False
    return True


class FunctionWithAio:
    """A blocking callable that carries its async twin as `.aio`."""

    def __init__(self, fn: Callable, name: str, doc: str | None):
        self._fn = fn
        self.__name__ = name
        self.__doc__ = doc
        functools.update_wrapper(self, fn, assigned=("__module__", "__qualname__"), updated=())

    def __call__(self, *args, **kwargs):
        check = getattr(self._fn, "_shoal_known", None)
        if check is not None and not args and not kwargs:
            impl = self._fn.__self__
            known = check(impl)
            if known is None and self._fn._shoal_ready is not None:
                event = self._fn._shoal_ready(impl)
                if event is not None and _wait_set(event):
                    known = check(impl)
            if known is not None:
                return to_public(known)
        return _blocking_result(_call_blocking(self._fn, args, kwargs))

    async def _aio_coro(self, args, kwargs):
        result = await run_async(self._fn(*args, **kwargs))
        return _async_result(result)

    def aio(self, *args, **kwargs):
        args, kwargs = to_impl(args), to_impl(kwargs)
        if inspect.iscoroutinefunction(self._fn):
            return self._aio_coro(args, kwargs)
        return _async_result(self._fn(*args, **kwargs))

    def __repr__(self) -> str:
        return f"<shoal function {self.__qualname__}>"


class _MethodDescriptor:
    def __init__(self, attr: Any, name: str):
        self.attr = attr
        self.name = name

    def __get__(self, obj, objtype=None):
        if isinstance(self.attr, (classmethod, staticmethod)):
            impl_cls = objtype._impl_cls if objtype else type(obj._impl)
            fn = self.attr.__get__(None, impl_cls)
        elif obj is None:
            return self
        else:
            fn = getattr(obj._impl, self.name)
        return FunctionWithAio(fn, self.name, getattr(self.attr, "__doc__", None))


def _wrap_property(prop: property) -> property:
    def fget(self):
        return _blocking_result(prop.fget(self._impl))

    def fset(self, value):
        prop.fset(self._impl, to_impl(value))

    return property(fget, fset if prop.fset else None, doc=prop.__doc__)


def exported(name: str) -> bool:
    """Whether an implementation attribute is on the public class: public names, and Modal's
    experimental API (`Sandbox._experimental_snapshot`, ...), which Modal names with a leading
    underscore."""
    return not name.startswith("_") or name.startswith("_experimental_")


def synchronize_api(impl_cls: type, name: str | None = None) -> type:
    """Derive the public class from the async implementation class `impl_cls`."""
    public_name = name or impl_cls.__name__.lstrip("_")
    ns: dict[str, Any] = {"__doc__": impl_cls.__doc__, "__module__": impl_cls.__module__,
                          "_impl_cls": impl_cls, "__slots__": ("_impl", "__weakref__")}
    for klass in reversed(impl_cls.__mro__[:-1]):
        for attr_name, attr in vars(klass).items():
            if not exported(attr_name):
                continue
            if type(attr) in _IMPL_TO_PUBLIC:  # e.g. Volume.objects, an implementation object
                ns[attr_name] = wrap(attr)
            elif isinstance(attr, property):
                ns[attr_name] = _wrap_property(attr)
            elif callable(attr) or isinstance(attr, (classmethod, staticmethod)):
                ns[attr_name] = _MethodDescriptor(attr, attr_name)
            else:
                ns[attr_name] = attr

    if hasattr(impl_cls, "__aiter__"):
        ns["__iter__"] = lambda self: _blocking_iter(self._impl.__aiter__())
        ns["__aiter__"] = lambda self: _async_iter(self._impl.__aiter__())
    if hasattr(impl_cls, "__anext__"):
        ns["__next__"] = _blocking_next
        ns["__anext__"] = lambda self: run_async(self._impl.__anext__())
    if hasattr(impl_cls, "__aenter__"):
        ns["__enter__"] = lambda self: (_call_blocking(self._impl.__aenter__, (), {}), self)[1]
        ns["__exit__"] = lambda self, *e: _call_blocking(self._impl.__aexit__, e, {})
        ns["__aenter__"] = _aenter
        ns["__aexit__"] = lambda self, *e: run_async(self._impl.__aexit__(*e))
    ns["__repr__"] = lambda self: repr(self._impl)
    ns["__eq__"] = lambda self, other: self._impl == to_impl(other)
    ns["__hash__"] = lambda self: hash(self._impl)

    if getattr(impl_cls, "_constructible", False):
        def _init(self, *a, **k):
            impl = impl_cls(*to_impl(a), **to_impl(k))
            object.__setattr__(self, "_impl", impl)
            impl._public = self

        ns["__init__"] = _init
    else:
        def _no_init(self, *a, **k):
            raise TypeError(f"{public_name} objects are not made directly: use "
                            f"{public_name}.from_name(...), .create(...) or similar")

        ns["__init__"] = _no_init
    public = type(public_name, (), ns)
    public.__qualname__ = public_name
    _IMPL_TO_PUBLIC[impl_cls] = public
    return public


async def _aenter(self):
    await run_async(self._impl.__aenter__())
    return self
