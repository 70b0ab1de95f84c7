"""Modal-parity behaviour: Dict, Queue, async context managers, App defaults, include_terminated,
FileInfo helpers, and refused arguments."""

from __future__ import annotations

import asyncio
import queue
import time

import pytest

import shoal
from shoal.exception import InvalidError, RequestSizeError


def test_dict(server):
    with shoal.Dict.ephemeral() as d:
        d["a"] = {"x": 1}
        assert d.put("b", 2) and not d.put("b", 3, skip_if_exists=True)
        d.update({"c": 3}, e=5)
        assert d["a"] == {"x": 1} and d.get("b") == 2 and d.get("zz", 0) == 0
        assert "c" in d and d.contains("e") and len(d) == 4 == d.len()
        assert list(d.keys()) == ["a", "b", "c", "e"] and list(d.values()) == [{"x": 1}, 2, 3, 5]
        assert d.pop("e") == 5 and d.pop("e", None) is None
        with pytest.raises(KeyError):
            d["nope"]
        with pytest.raises(RequestSizeError):
            d["big"] = b"x" * (17 << 20)
        d.clear()
        assert len(d) == 0
    named = shoal.Dict.from_name("parity-dict", create_if_missing=True)
    named["k"] = 1
    assert shoal.Dict.from_name("parity-dict")["k"] == 1
    shoal.Dict.objects.delete("parity-dict")


def test_queue_blocking_partitions_and_many(server):
    with shoal.Queue.ephemeral() as q:
        q.put_many([1, 2, 3])
        q.put("p", partition="worker-1")
        assert q.len() == 3 and q.len(total=True) == 4 and len(q) == 3
        assert list(q.iterate()) == [1, 2, 3]
        assert q.get() == 1 and q.get_many(5) == [2, 3]
        assert q.get(partition="worker-1") == "p"
        t = time.monotonic()
        with pytest.raises(queue.Empty):
            q.get(timeout=0.5)
        assert 0.4 < time.monotonic() - t < 5
        with pytest.raises(queue.Empty):
            q.get(block=False)
        assert q.get_many(3, timeout=0.2) == []

        async def later():
            await asyncio.sleep(0.5)
            await q.put.aio("late")

        async def waiter():
            return (await asyncio.gather(q.get.aio(timeout=10), later()))[0]

        assert asyncio.run(waiter()) == "late"
        q.put_many([1, 2], partition="a")
        q.clear(all=True)
        assert q.len(total=True) == 0


def test_async_with_on_blocking_context_managers(server):
    async def main():
        async with shoal.Volume.ephemeral() as vol:
            return vol.object_id

    assert asyncio.run(main())


def test_app_defaults_and_from_name_include_terminated(app):
    secret_app = shoal.App("tests", secrets=[shoal.Secret.from_dict({"FROM_APP": "yes"})])
    sb = shoal.Sandbox.create(app=secret_app, name="parity-named", timeout=60)
    try:
        p = sb.exec("sh", "-c", "echo $FROM_APP; mkdir -p /tmp/d")
        assert p.stdout.read() == "yes\n" and p.wait() == 0
        assert sb.filesystem.stat("/tmp/d").is_dir()
        assert sb.filesystem.stat("/tmp/d").permissions.startswith("rwx")
        assert shoal.Sandbox.from_name("tests", "parity-named").object_id == sb.object_id
        sb.reload_volumes()
    finally:
        sb.terminate()
    with pytest.raises(shoal.exception.NotFoundError):
        shoal.Sandbox.from_name("tests", "parity-named")
    again = shoal.Sandbox.from_name("tests", "parity-named", include_terminated=True)
    assert again.object_id == sb.object_id


def test_refused_arguments_name_themselves(server, tmp_path):
    img = shoal.Image.debian_slim()
    with pytest.raises(InvalidError, match="gpu"):
        img.pip_install("six", gpu="A100")
    with pytest.raises(InvalidError, match="volumes"):
        img.run_commands("true", volumes={"/x": shoal.Volume.from_name("v")})
    with pytest.raises(InvalidError, match="secrets"):
        shoal.Image.from_registry("python:3.11", secrets=[])
    with pytest.raises(InvalidError, match="gpu"):
        shoal.Sandbox.create(gpu="T4")
    with pytest.raises(InvalidError, match="environment_name"):
        shoal.Volume.from_name("v", environment_name="prod")
    with pytest.raises(InvalidError, match="client"):
        shoal.Volume.from_name("v", client=shoal.Client("http://elsewhere:1"))
    shoal.Client.from_env().hello()
    (tmp_path / "requirements.txt").write_text("six==1.16.0\n")
    step = img.pip_install_from_requirements(tmp_path / "requirements.txt",
                                             extra_options="--no-deps")._impl._spec["steps"][-1]
    assert step["requirements"] == ["six==1.16.0\n"] and step["extra_options"] == ["--no-deps"]
    step = img.run_commands("true", env={"A": "1"}, force_build=True)._impl._spec["steps"][-1]
    assert step["secret_env"] == {"A": "1"} and step["nonce"]


@pytest.mark.slow
def test_requirements_find_links_and_dockerfile_commands_build(app, tmp_path):
    (tmp_path / "requirements.txt").write_text("six==1.16.0\n")
    img = (shoal.Image.debian_slim()
           .pip_install_from_requirements(tmp_path / "requirements.txt", pre=True)
           .dockerfile_commands("FROM base", "ENV PARITY=1", "RUN echo $PARITY > /parity")
           .run_commands("echo $STEP_ONLY > /step", env={"STEP_ONLY": "s"}))
    sb = shoal.Sandbox.create(app=app, image=img, timeout=60)
    try:
        p = sb.exec("sh", "-c", "python -c 'import six; print(six.__version__)'; cat /parity "
                                "/step; echo ${STEP_ONLY:-unset}")
        assert p.stdout.read() == "1.16.0\n1\ns\nunset\n"
    finally:
        sb.terminate()
