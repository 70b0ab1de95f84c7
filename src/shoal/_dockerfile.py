"""`Image.from_dockerfile`: the common Dockerfile instructions, turned into Image steps.

Supported: FROM (a registry reference, `shoal/debian_slim` for shoal's default image, or an
earlier stage; `AS name` names a stage: multi-stage builds, the last stage is the image), RUN,
COPY and ADD of local files, `COPY --from=STAGE|INDEX|IMAGE` (files of another stage or image),
`--chown=USER[:GROUP]` on COPY/ADD, ENV, WORKDIR, ARG, USER, ENTRYPOINT, CMD (recorded, not run: a
sandbox's command comes from `Sandbox.create`), and LABEL / EXPOSE / MAINTAINER / `--link`
(accepted, no effect). Anything else is an InvalidError naming the instruction and its line.
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex
from pathlib import Path

from shoal.exception import InvalidError

IGNORED = {"LABEL", "EXPOSE", "MAINTAINER"}
VAR = re.compile(r"\$(?:\{(\w+)(?::-([^}]*))?\}|(\w+))")


def _logical_lines(text: str):
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        yield start, buf.strip()
        buf = ""
    if buf:
        yield start, buf.strip()


def _subst(value: str, env: dict[str, str]) -> str:
    return VAR.sub(lambda m: env.get(m.group(1) or m.group(3), m.group(2) or ""), value)


OWNER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*(:[A-Za-z0-9_][A-Za-z0-9_.\-]*)?$")


def _stage(ref: str, stages: list, names: dict[str, int], registry_secret, where: str):
    """What `--from=ref` names: an earlier stage (by name or index), else an image reference."""
    from shoal.image import _Image

    if ref.lower() in names:
        return stages[names[ref.lower()]]
    if ref.isdigit():
        if int(ref) >= len(stages):
            raise InvalidError(f"{where}: --from={ref}: there is no earlier stage {ref}")
        return stages[int(ref)]
    if not ref:
        raise InvalidError(f"{where}: --from needs a stage or an image")
    return _Image.from_registry(ref, registry_secret)


def _json_or_shell(rest: str) -> list[str]:
    if rest.startswith("["):
        try:
            args = json.loads(rest)
        except ValueError:
            raise InvalidError(f"invalid JSON array: {rest}") from None
        if not all(isinstance(a, str) for a in args):
            raise InvalidError(f"exec form must be an array of strings: {rest}")
        return args
    return ["/bin/sh", "-c", rest]


def parse_dockerfile(path: Path, context: Path | None, build_args: dict[str, str],
                     step_env: dict[str, str] | None, registry_secret=None,
                     force_build: bool = False):
    if not path.is_file():
        raise FileNotFoundError(f"no such Dockerfile: {path}")
    img = apply_dockerfile(path.read_text(), path.name, context or path.parent, build_args,
                           step_env, registry_secret=registry_secret, force_build=force_build)
    if img is None:
        raise InvalidError(f"{path}: no FROM instruction")
    return img


def apply_dockerfile(text: str, name: str, context: Path, build_args: dict[str, str],
                     step_env: dict[str, str] | None, image=None, registry_secret=None,
                     force_build: bool = False):
    """The image `text`'s instructions make. With `image` (Image.dockerfile_commands), they
    extend it, and `FROM base` names it; `step_env` is the environment of the RUN steps only."""
    from shoal.image import _Image

    img = image
    args: dict[str, str] = {}
    env: dict[str, str] = {}
    workdir = "/"
    stages: list = []  # finished stages, in order
    names: dict[str, int] = {}  # stage name (lower case) -> index
    for lineno, line in _logical_lines(text):
        word, _, rest = line.partition(" ")
        instr, rest = word.upper(), rest.strip()
        where = f"{name}:{lineno}"
        scope = {**args, **env}
        if instr == "ARG":
            name, _, default = rest.partition("=")
            args[name.strip()] = build_args.get(name.strip(), _subst(default.strip().strip('"'),
                                                                     scope))
            continue
        if instr == "FROM":
            words = [w for w in rest.split() if not w.startswith("--platform=")]
            ref = _subst(words[0], scope) if words else ""
            if image is not None and ref == "base" and img is image:
                continue  # Modal's dockerfile_commands convention: the image being extended
            if image is not None:
                raise InvalidError(f"{where}: dockerfile_commands extend an image; only "
                                   "`FROM base` may appear")
            if len(words) not in (1, 3) or (len(words) == 3 and words[1].upper() != "AS"):
                raise InvalidError(f"{where}: FROM takes an image and optionally `AS name`")
            if img is not None:
                stages.append(img)  # the stage before this FROM is complete
                env, workdir = {}, "/"
            if ref.lower() in names:
                img = stages[names[ref.lower()]]
            elif ref in ("shoal/debian_slim", "shoal:debian_slim"):
                img = _Image.debian_slim()
            elif ref == "scratch":
                raise InvalidError(f"{where}: FROM scratch is not supported")
            else:
                img = _Image.from_registry(ref, registry_secret)
            if len(words) == 3:
                names[words[2].lower()] = len(stages)
            continue
        if img is None:
            raise InvalidError(f"{where}: {instr} before FROM")
        if instr in IGNORED:
            continue
        if instr == "RUN":
            if rest.startswith("["):
                cmd = shlex.join(_json_or_shell(rest))
            else:
                cmd = rest
            exports = "".join(f"export {k}={shlex.quote(v)}; " for k, v in args.items())
            cd = f"cd {shlex.quote(workdir)} && " if workdir != "/" else ""
            img = img.run_commands(exports + cd + cmd, env=step_env, force_build=force_build)
        elif instr == "ENV":
            pairs = {}
            if "=" in rest.split()[0]:
                for tok in shlex.split(rest):
                    k, _, v = tok.partition("=")
                    pairs[k] = _subst(v, scope)
            else:
                k, _, v = rest.partition(" ")
                pairs[k] = _subst(v.strip(), scope)
            env.update(pairs)
            img = img.env(pairs)
        elif instr == "WORKDIR":
            target = _subst(rest, scope)
            workdir = target if target.startswith("/") else f"{workdir.rstrip('/')}/{target}"
            img = img.workdir(workdir)
        elif instr in ("COPY", "ADD"):
            toks = [t for t in shlex.split(_subst(rest, scope))]
            flags = dict(f[2:].partition("=")[::2] for f in toks if f.startswith("--"))
            unknown = set(flags) - {"from", "chown", "link"}
            if unknown:
                raise InvalidError(f"{where}: {instr} --{sorted(unknown)[0]} is not supported")
            toks = [t for t in toks if not t.startswith("--")]
            if len(toks) < 2:
                raise InvalidError(f"{where}: {instr} needs a source and a destination")
            *srcs, dest = toks
            as_dir = dest.endswith("/") or dest in (".", "..") or dest.endswith("/.")
            if not dest.startswith("/"):
                dest = f"{workdir.rstrip('/')}/{dest}"
            dest = posixpath.normpath(dest) + ("/" if as_dir else "")
            owner = flags.get("chown") or None
            if owner is not None and not OWNER.match(owner):
                raise InvalidError(f"{where}: --chown={owner} is not USER[:GROUP]")
            if owner is not None and ":" not in owner:
                owner += ":"  # as Docker: a user alone means its group too (chown's USER:)
            if "from" in flags:
                source = _stage(flags["from"], stages, names, registry_secret, where)
                if any(c in src for src in srcs for c in "*?["):
                    raise InvalidError(f"{where}: {instr} --from with a wildcard is not supported")
                img = img._copy_from(source, srcs, dest, owner)
                continue
            copied = []
            for src in srcs:
                if re.match(r"^[a-z]+://", src):
                    raise InvalidError(f"{where}: {instr} of a URL is not supported")
                matches = sorted(context.glob(src)) if any(c in src for c in "*?[") \
                    else [context / src]
                for local in matches:
                    if not local.resolve().is_relative_to(context.resolve()):
                        raise InvalidError(f"{where}: {src} is outside the build context")
                    if local.is_dir():
                        img = img.add_local_dir(local, dest)
                        copied += [posixpath.join(dest, p.name) for p in local.iterdir()]
                    elif local.is_file():
                        many = len(srcs) > 1 or len(matches) > 1 or dest.endswith("/")
                        img = img.add_local_file(local, dest.rstrip("/") + "/" if many else dest)
                        copied.append(posixpath.join(dest, local.name) if many else dest)
                    else:
                        raise InvalidError(f"{where}: {src} not found in {context}")
            if owner and copied:
                # What this COPY wrote (not what DEST held before) changes owner, as Docker's.
                # As root whatever USER says (the step's own `user`), as Docker's --chown.
                img = img._with({"op": "run_commands", "user": "root", "commands": [
                    "chown -hR " + shlex.quote(owner) + " -- "
                    + " ".join(shlex.quote(p) for p in copied)]})
        elif instr == "USER":
            img = img._with({"op": "user", "user": _subst(rest, scope)})
        elif instr == "ENTRYPOINT":
            img = img.entrypoint(_json_or_shell(rest))
        elif instr == "CMD":
            continue
        else:
            raise InvalidError(f"{where}: the {instr} instruction is not supported")
    return img
