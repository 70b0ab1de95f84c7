"""Checked by mypy in tests/test_stubs.py: what the stubs must let a program say."""

import asyncio

import shoal


def blocking(app: shoal.App) -> int:
    sb: shoal.Sandbox = shoal.Sandbox.create(app=app, timeout=60, cpu=(0.5, 1))
    p: shoal.ContainerProcess = sb.exec("echo", "hi")
    out = p.stdout.read()
    rc: int = p.wait()
    for other in shoal.Sandbox.list(app_id=app.app_id):
        print(other.object_id)
    sb.terminate()
    return rc + len(out)


async def concurrent(app: shoal.App) -> None:
    sb = await shoal.Sandbox.create.aio(app=app)
    p = await sb.exec.aio("true")
    rc: int = await p.wait.aio()
    async for other in shoal.Sandbox.list.aio():
        print(other.object_id, rc)
    await sb.terminate.aio()


asyncio.run(concurrent(shoal.App.lookup("x", create_if_missing=True)))
