"""The layering the architecture document promises, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "src" / "shoal"
SERVER_SIDE = ("shoal.server", "shoal.cli")
HTTP_SERVER = ("fastapi", "starlette", "uvicorn")

# Each server part, and what it must never import: the parts depend one way,
# control plane -> images -> host -> storage -> linux.
NEVER = {
    "storage": ("shoal.server.host", "shoal.server.images", "shoal.server.control",
                "shoal.server.routes", "shoal.server.app", "httpx") + HTTP_SERVER,
    "host": ("shoal.server.images", "shoal.server.control", "shoal.server.routes",
             "shoal.server.app", "shoal.server.models", "httpx") + HTTP_SERVER,
    "images": ("shoal.server.control", "shoal.server.routes", "shoal.server.app") + HTTP_SERVER,
    "control": ("shoal.server.routes", "shoal.server.app") + HTTP_SERVER,
    # Sandbox networking: a leaf that the control plane and image builds use.
    "network": ("shoal.server.host", "shoal.server.images", "shoal.server.control",
                "shoal.server.routes", "shoal.server.app", "shoal.server.models",
                "httpx") + HTTP_SERVER,
}


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def within(module: str, packages: tuple[str, ...]) -> bool:
    """`module` is one of `packages` or inside one (shoal.client is not inside shoal.cli)."""
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_sdk_never_imports_the_server_side():
    sdk = [p for p in PKG.glob("*.py") if p.name not in ("__main__.py",)]
    assert sdk
    for path in sdk:
        bad = {m for m in imports_of(path) if within(m, SERVER_SIDE)}
        assert not bad, f"{path.name} imports {bad}"


def test_server_parts_depend_one_way():
    for part, never in NEVER.items():
        files = list((PKG / "server" / part).rglob("*.py"))
        assert files, part
        for path in files:
            bad = {m for m in imports_of(path) if within(m, never)}
            assert not bad, f"server/{part}/{path.name} imports {bad}"


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
