"""Every public method of the SDK's blocking classes says what it does, what it raises, and shows
a short example (an indented code line), so `help(shoal.Sandbox)` and IDEs are useful."""

from __future__ import annotations

import inspect
import re

import shoal  # noqa: F401  (registers every blocking class)
from shoal._sync import _IMPL_TO_PUBLIC


def _methods():
    for impl, pub in _IMPL_TO_PUBLIC.items():
        if not pub.__module__.startswith("shoal."):
            continue  # a test's own class (tests/test_sync.py)
        for name in vars(pub):
            if name.startswith("_") or isinstance(vars(pub)[name], property):
                continue
            attr = inspect.getattr_static(impl, name)
            fn = attr.__func__ if isinstance(attr, (classmethod, staticmethod)) else attr
            if callable(fn):
                yield f"{pub.__name__}.{name}", fn


def _has_example(raw: str) -> bool:
    """An example: after a blank line, a line indented 4 more than the docstring's text (whose
    indentation the closing quotes' line shows, or else the least-indented later line)."""
    lines = raw.split("\n")
    tail = lines[-1] if len(lines) > 1 and not lines[-1].strip() else None
    rest = [ln for ln in lines[1:] if ln.strip()]
    if tail is not None:
        base = len(tail)
    elif rest:
        base = min(len(ln) - len(ln.lstrip()) for ln in rest)
    else:
        return False
    return ">>>" in raw or any(
        not lines[i - 1].strip() and ln.strip() and len(ln) - len(ln.lstrip()) >= base + 4
        for i, ln in enumerate(lines) if i > 0)


def problems(raw: str) -> list[str]:
    out = []
    doc = inspect.cleandoc(raw) if raw else ""
    first = doc.strip().splitlines()[0] if doc.strip() else ""
    if len(first) < 10:
        out.append("no summary")
    if not re.search(r"\bRaises?\b|\braises?\b", doc):
        out.append("no 'Raises'")
    if not _has_example(raw or ""):
        out.append("no example (an indented code line after a blank line)")
    return out


def test_every_public_method_has_summary_raises_and_example():
    bad = {}
    for name, fn in _methods():
        issues = problems(inspect.unwrap(fn).__doc__ or "")
        if issues:
            bad[name] = issues
    assert not bad, "\n".join(f"{k}: {', '.join(v)}" for k, v in sorted(bad.items()))


def test_the_blocking_face_carries_the_docstrings():
    assert "Start a sandbox" in shoal.Sandbox.create.__doc__
    assert "Run a command" in shoal.Sandbox.__dict__["exec"].attr.__doc__
    assert problems("Do a thing.\n\n        Raises X.\n\n            f()\n        ") == []
    assert problems("Do a thing. Raises X.\n\n            f()\n        ") == []
    assert problems("Do a thing.\n\n        Raises X.\n        f()\n        ") != []
