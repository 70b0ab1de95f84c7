"""The three programs of Modal's sandbox file-access guide, run as users run them."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True,
                          text=True, timeout=120, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_ephemeral_volume_example(server):
    assert run_example("ephemeral_volume.py").strip() == "b'foo\\n'"


def test_network_file_system_example(server):
    assert run_example("network_file_system.py").strip() == "b'foo\\n'"


def test_named_volume_example_survives_a_server_restart(server):
    session = uuid.uuid4().hex[:8]
    run_example("named_volume.py", "write", session)
    server.restart()
    out = run_example("named_volume.py", "read", session)
    assert "sandbox sees: 'foo\\n'" in out
    assert "client reads: b'foo\\n'" in out


def test_named_volume_example_as_documented(server):
    out = run_example("named_volume.py")
    assert "client reads: b'foo\\n'" in out
