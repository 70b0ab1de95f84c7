"""`pip install shoal` is the SDK and the CLI client; the server's HTTP stack is `shoal[server]`."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCK_SERVER_STACK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("fastapi", "uvicorn", "starlette"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
"""


def test_dependencies_are_split():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = " ".join(project["dependencies"])
    assert "fastapi" not in deps and "uvicorn" not in deps
    server = " ".join(project["optional-dependencies"]["server"])
    assert "fastapi" in server and "uvicorn" in server
    assert "'.[server,test]'" in (ROOT / "scripts" / "install.sh").read_text()


def test_the_venv_is_made_from_debians_python():
    """scripts/install.sh makes .venv from /usr/bin/python3 (Debian's optimised build), not from
    whichever python3 is first on PATH."""
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve() or os.environ.get("SHOAL_PYTHON"):
        pytest.skip("runs in the .venv that scripts/install.sh made, with its default interpreter")
    assert os.path.dirname(sys._base_executable) == "/usr/bin", sys._base_executable


def test_sdk_and_cli_import_without_the_server_stack():
    code = BLOCK_SERVER_STACK + """
import shoal, shoal.exception, shoal.client, shoal.cli.main
import pkgutil
for m in pkgutil.iter_modules(shoal.__path__):
    if not m.ispkg and m.name != "__main__":
        __import__("shoal." + m.name)
assert not any(k.split(".")[0] in ("fastapi", "uvicorn") for k in sys.modules)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_serve_without_the_server_extra_says_what_to_install():
    code = BLOCK_SERVER_STACK + "from shoal.cli.main import main; main(['serve'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0 and "shoal[server]" in out.stderr, out.stderr
