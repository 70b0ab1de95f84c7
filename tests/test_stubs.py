"""The `.pyi` stubs of the blocking classes are what scripts/gen_stubs.py makes from the code, and
they describe the real classes: every public method with its `.aio`, every property."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import gen_stubs  # noqa: E402


def test_stubs_are_current():
    stale = [str(p.relative_to(ROOT)) for p, text in gen_stubs.stubs().items()
             if not p.exists() or p.read_text() != text]
    assert not stale, f"run `.venv/bin/python scripts/gen_stubs.py`: stale {stale}"


def test_py_typed_ships():
    assert (ROOT / "src" / "shoal" / "py.typed").exists()


def test_stubs_cover_every_public_member_with_aio():
    from shoal._sync import _IMPL_TO_PUBLIC

    for impl, pub in _IMPL_TO_PUBLIC.items():
        if not pub.__module__.startswith("shoal."):
            continue  # a test's own class (tests/test_sync.py)
        tree = ast.parse((ROOT / "src" / (pub.__module__.replace(".", "/") + ".pyi")).read_text())
        classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
        assert pub.__name__ in classes, pub
        declared = set()
        for node in classes[pub.__name__].body:
            if isinstance(node, ast.AnnAssign):
                declared.add(node.target.id)
                if not isinstance(node.annotation, ast.Name):
                    continue  # a plain attribute (typing.Any)
                spec = classes[node.annotation.id]
                assert {f.name for f in spec.body if isinstance(
                    f, (ast.FunctionDef, ast.AsyncFunctionDef))} == {"__call__", "aio"}
            elif isinstance(node, ast.FunctionDef):
                declared.add(node.name)
        public = {n for n in vars(pub) if not n.startswith("_")}
        assert public <= declared, (pub.__name__, public - declared)
        # the blocking call and .aio exist at run time, as the stub says
        for name in public:
            if not isinstance(vars(pub)[name], property):
                member = getattr(pub, name, None) or vars(pub)[name]
                assert hasattr(member, "aio") or not callable(member), (pub.__name__, name)


def test_stubs_import_and_type_check():
    # Each stub is valid Python; with mypy installed, a program using the SDK type-checks and a
    # wrong call does not.
    for path in gen_stubs.stubs():
        compile(path.read_text(), str(path), "exec")
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy not installed")
    good = ROOT / "tests" / "data" / "typed_program.py"
    r = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--follow-imports=silent",
                        str(good)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    bad = ROOT / "tests" / "data" / "typed_wrong.py"
    r = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--follow-imports=silent",
                        str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and r.stdout.count("error:") == 3, r.stdout + r.stderr
