"""The layering the architecture document promises, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "src" / "shoal"
SERVER_SIDE = ("shoal.server", "shoal.runtime", "shoal.storage", "shoal.images", "shoal.cli")


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_sdk_never_imports_the_server_side():
    sdk = [p for p in PKG.glob("*.py") if p.name not in ("__main__.py",)]
    assert sdk
    for path in sdk:
        bad = {m for m in imports_of(path) if m.startswith(SERVER_SIDE)}
        assert not bad, f"{path.name} imports {bad}"


def test_runtime_storage_images_do_not_import_the_server_or_http():
    # images/ may use an HTTP client (registry pulls), never the server's HTTP stack.
    server_http = ("shoal.server", "shoal.cli", "fastapi", "starlette", "uvicorn")
    for part, extra in (("runtime", ("httpx", "shoal.images", "shoal.storage")),
                        ("storage", ("httpx", "shoal.images", "shoal.runtime")),
                        ("images", ())):
        for path in (PKG / part).rglob("*.py"):
            bad = {m for m in imports_of(path) if m.startswith(server_http + extra)}
            assert not bad, f"{part}/{path.name} imports {bad}"


def test_modal_module_paths_exist():
    import shoal
    from shoal.container_process import ContainerProcess  # noqa: F401
    from shoal.exception import (AlreadyExistsError, InvalidError, NotFoundError,  # noqa: F401
                                 SandboxTerminatedError, SandboxTimeoutError)
    from shoal.file_io import FileWatchEvent, FileWatchEventType  # noqa: F401
    from shoal.io_streams import StreamReader, StreamWriter  # noqa: F401
    from shoal.stream_type import StreamType  # noqa: F401
    from shoal.volume import FileEntry, FileEntryType  # noqa: F401

    for name in ("App", "Sandbox", "Volume", "NetworkFileSystem", "Image", "Secret",
                 "enable_output", "exception"):
        assert hasattr(shoal, name)
