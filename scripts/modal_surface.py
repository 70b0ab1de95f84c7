"""Introspect the public surface of Modal's client, or of shoal, for the parity test.

    /work/modal-venv/bin/python scripts/modal_surface.py > tests/data/modal_surface.json

Run with a Python that has `modal` installed (never connects anywhere: only imports and
`inspect`). `tests/test_modal_surface.py` loads this file to compute shoal's surface the same way
and compares the two against the goals of docs/modal-parity.md.

A surface is {"classes": {Name: {member: {"kind": ..., "params": [[name, kind], ...]}}},
"exceptions": {Name: [base names]}, "modal_version": ...}. Members are the public names (no
leading underscore) a user sees on the class; parameters are read from the async implementation
class (`_Sandbox`), which both Modal and shoal write once and wrap for the blocking face.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys

# Public class -> the module of Modal's implementation class (named "_" + class).
CLASSES = {
    "Sandbox": "modal.sandbox._sandbox",
    "Volume": "modal.volume",
    "Image": "modal._image",
    "Secret": "modal.secret",
    "App": "modal.app",
    "NetworkFileSystem": "modal.network_file_system",
    "ContainerProcess": "modal.container_process",
    "SandboxFilesystem": "modal.sandbox._filesystem",
    "Dict": "modal.dict",
    "Queue": "modal.queue",
    "Client": "modal.client",
}
# Classes Modal defines without an implementation twin (plain Python classes).
PLAIN = {"Probe": "modal.sandbox._sandbox"}


def _params(fn) -> list[list[str]] | None:
    fn = inspect.unwrap(fn) if callable(fn) else fn
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    out = []
    for i, p in enumerate(sig.parameters.values()):
        if i == 0 and p.name in ("self", "cls"):
            continue
        out.append([p.name, p.kind.name])
    return out


def _static(cls: type, name: str):
    for klass in cls.__mro__:
        if name in vars(klass):
            return vars(klass)[name]
    return None


def member_info(impl_cls: type, name: str) -> dict:
    attr = _static(impl_cls, name)
    if isinstance(attr, property):
        return {"kind": "property", "params": None}
    if isinstance(attr, (classmethod, staticmethod)):
        return {"kind": "classmethod", "params": _params(attr.__func__)}
    if inspect.isfunction(attr):
        return {"kind": "method", "params": _params(attr)}
    if isinstance(attr, type):
        return {"kind": "class", "params": None}
    if callable(attr):
        return {"kind": "method", "params": _params(attr)}
    return {"kind": "attribute", "params": None}


def class_surface(public_cls: type, impl_cls: type) -> dict:
    names = sorted(n for n in dir(public_cls) if not n.startswith("_"))
    return {n: member_info(impl_cls, n) for n in names}


def exception_surface(module) -> dict[str, list[str]]:
    out = {}
    for name, obj in vars(module).items():
        if (isinstance(obj, type) and issubclass(obj, BaseException) and not name.startswith("_")
                and obj.__module__ == module.__name__):
            out[name] = [b.__name__ for b in obj.__bases__]
    return dict(sorted(out.items()))


def modal_surface() -> dict:
    import modal
    import modal.exception

    classes = {}
    for name, mod in CLASSES.items():
        public = getattr(modal, name, None)
        if public is None:
            public_mod = {"ContainerProcess": "modal.container_process"}.get(
                name, "modal.sandbox.sandbox")
            public = getattr(importlib.import_module(public_mod), name)
        impl = getattr(importlib.import_module(mod), "_" + name)
        classes[name] = class_surface(public, impl)
    for name, mod in PLAIN.items():
        cls = getattr(importlib.import_module(mod), name)
        classes[name] = class_surface(cls, cls)
    return {"modal_version": modal.__version__, "classes": classes,
            "exceptions": exception_surface(modal.exception),
            "top_level": sorted(n for n in dir(modal) if not n.startswith("_"))}


def shoal_surface() -> dict:
    import shoal
    import shoal.exception

    classes = {}
    for name in [*CLASSES, *PLAIN]:
        public = getattr(shoal, name, None)
        if public is None:
            continue
        impl = getattr(public, "_impl_cls", public)
        classes[name] = class_surface(public, impl)
    return {"classes": classes, "exceptions": exception_surface(shoal.exception),
            "top_level": sorted(n for n in dir(shoal) if not n.startswith("_"))}




# --- comparing -------------------------------------------------------------------------------

# Modal members that are notions of Modal's cloud account or of Modal Functions, which a
# self-hosted sandbox server does not have. docs/modal-parity.md says why for each; the test
# checks that every one is listed there. Counted neither as present nor as missing.
EXCLUDED = {
    "*.get_dashboard_url": "Modal's web dashboard of a cloud account",
    "App.cls": "Modal Functions (serverless classes), not sandboxes",
    "App.function": "Modal Functions",
    "App.server": "Modal Functions (web servers)",
    "App.local_entrypoint": "Modal Functions (`modal run` entrypoints)",
    "App.include": "Modal Functions (merging the functions of apps)",
    "App.registered_classes": "Modal Functions",
    "App.registered_entrypoints": "Modal Functions",
    "App.registered_functions": "Modal Functions",
    "App.registered_web_endpoints": "Modal Functions",
    "Image.run_function": "Modal Functions (runs a Modal Function as a build step)",
    "Image.from_aws_ecr": "AWS account: minting an ECR token calls AWS's API",
    "Client.anonymous": "Modal's gRPC API: unauthenticated client of the cloud",
    "Client.from_oauth_credentials": "Modal's OAuth login",
    "Client.get_input_plane_metadata": "Modal's cloud regions (input plane)",
    "Client.get_stub": "Modal's gRPC stubs",
    "Client.stub": "Modal's gRPC stubs",
    "Client.verify": "Modal's gRPC credential check of a cloud account",
    "Secret.from_name": "Secrets stored in a Modal workspace; shoal keeps no secret store",
    "Secret.objects": "Secrets stored in a Modal workspace",
    "Secret.update": "Secrets stored in a Modal workspace",
    "Secret.info": "Secrets stored in a Modal workspace",
    "Secret.name": "Secrets stored in a Modal workspace",
    "Sandbox.create_connect_token": "Modal's HTTP ingress proxy (cloud networking)",
}

# The classes the goal is measured on; exceptions are counted as names too.
GOAL_CLASSES = ("Sandbox", "SandboxFilesystem", "ContainerProcess", "Probe", "Volume",
                "NetworkFileSystem", "Image", "Secret", "App", "Client", "Dict", "Queue")


def excluded(cls: str, member: str) -> bool:
    return f"{cls}.{member}" in EXCLUDED or f"*.{member}" in EXCLUDED


def same_params(ref: list | None, ours: list | None) -> bool:
    """Every parameter of Modal's can be passed to shoal's the same way: same positional
    parameters in the same order, and every named parameter accepted by that name (names with a
    leading underscore are private to Modal and not compared)."""
    if ref is None:
        return True
    if ours is None:
        return False
    kinds = {n: k for n, k in ours}
    pos = lambda ps: [n for n, k in ps if k in ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD")]
    ref_pos, our_pos = pos(ref), pos(ours)
    if our_pos[:len(ref_pos)] != ref_pos:
        return False
    if any(k == "VAR_POSITIONAL" for _, k in ref) and "VAR_POSITIONAL" not in kinds.values():
        return False
    for name, kind in ref:
        if kind in ("VAR_POSITIONAL", "VAR_KEYWORD") or name.startswith("_"):
            continue
        if kinds.get(name) not in ("POSITIONAL_OR_KEYWORD", "KEYWORD_ONLY"):
            return False
    return True


def compare(ref: dict, ours: dict) -> dict:
    """Per class and in total: Modal's names, how many shoal has, how many with the same
    parameters, and the lists of what is missing or differs."""
    rows = {}
    for cls in GOAL_CLASSES:
        theirs = ref["classes"][cls]
        mine = ours["classes"].get(cls, {})
        names = [m for m in theirs if not excluded(cls, m)]
        present = [m for m in names if m in mine]
        same = [m for m in present if same_params(theirs[m]["params"], mine[m]["params"])]
        rows[cls] = {"total": len(names), "present": len(present), "same": len(same),
                     "missing": [m for m in names if m not in mine],
                     "differ": [m for m in present if m not in same]}
    exc_names = list(ref["exceptions"])
    exc_present = [e for e in exc_names if e in ours["exceptions"]]
    exc_same = [e for e in exc_present
                if [b for b in ref["exceptions"][e] if not b.startswith("_")]
                == [b for b in ours["exceptions"][e] if not b.startswith("_")]]
    rows["exception"] = {"total": len(exc_names), "present": len(exc_present),
                         "same": len(exc_same),
                         "missing": [e for e in exc_names if e not in exc_present],
                         "differ": [e for e in exc_present if e not in exc_same]}
    total = sum(r["total"] for r in rows.values())
    return {"rows": rows, "total": total,
            "present": sum(r["present"] for r in rows.values()) / total,
            "same": sum(r["same"] for r in rows.values()) / total}


def table(result: dict) -> str:
    lines = ["| class | Modal names | present | same parameters |", "|---|---:|---:|---:|"]
    for cls, r in result["rows"].items():
        lines.append(f"| {cls} | {r['total']} | {r['present']} | {r['same']} |")
    lines.append(f"| **total** | {result['total']} | **{result['present']:.0%}** | "
                 f"**{result['same']:.0%}** |")
    return "\n".join(lines)


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "modal"
    if which == "table":  # shoal's coverage against the stored reference, as the README shows it
        from pathlib import Path

        ref = json.loads((Path(__file__).parent.parent / "tests" / "data" /
                          "modal_surface.json").read_text())
        result = compare(ref, shoal_surface())
        print(table(result))
        for cls, r in result["rows"].items():
            if r["missing"] or r["differ"]:
                print(f"{cls}: missing {r['missing']} differ {r['differ']}", file=sys.stderr)
    else:
        data = modal_surface() if which == "modal" else shoal_surface()
        json.dump(data, sys.stdout, indent=1, sort_keys=True)
        print()
