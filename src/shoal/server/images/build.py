"""Building images step by step, each step's result a cached layer.

A recipe is a base (the default Debian image, a registry image, or an existing image) and steps.
Each step that changes files runs in a build sandbox — the same runtime and isolation as user
sandboxes: its own network namespace with NAT'd outbound access (shoal.server.network, the default
policy, no CAP_NET_RAW) so it can reach the package registries, never the host's network; shoal's
resolv.conf and the host's CA bundle are bind-mounted read-only (so they never land in the layer) —
and its overlay upper directory becomes the layer. Steps that only change configuration (env, workdir,
entrypoint, user) make no layer.

A step's cache key hashes its parent's key and its full definition (the content digest of files
it adds, a digest of secret values), so an unchanged recipe is all cache hits and a changed line
rebuilds from there on. Two builds of one layer wait on one lock and build it once.
"""

from __future__ import annotations

import asyncio
import os
import posixpath
import re
import secrets
import shlex
import stat
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from shoal.server import linux as _linux
from shoal.server.images.store import ImageConfig, ImageStore, Manifest, digest
from shoal.server.images.unpack import unpack
from shoal.server.host import tools
from shoal.server.host.oci import ContainerSpec, Limits, Mount
from shoal.server.host.users import resolve_user
from shoal.server.host.rootfs import Rootfs
from shoal.server.network import NetworkManager, Policy

Log = Callable[[str], None]
STEP_TIMEOUT = float(os.environ.get("SHOAL_BUILD_TIMEOUT", "1800"))
CA_BUNDLE = os.environ.get("SHOAL_BUILD_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
BUILD_MOUNT = "/.shoal-build"
BUILD_PREFIX = "bd-"  # build containers' ids: a server ends the ones an earlier server left
PACKAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9+._\-]*([<>=!~]=?[A-Za-z0-9.*+!_\-,:]+)?$")
# A PEP 508 requirement (extras, markers, `name @ url`): anything that is not an option. Every
# argument is shell-quoted, so this only keeps a requirement from being read as a pip option.
REQUIREMENT_RE = re.compile(r"^[A-Za-z0-9][^\x00\n\r]*$")
APT_RE = re.compile(r"^[a-z0-9][a-z0-9+.\-]*(:[a-z0-9]+)?(=[A-Za-z0-9.+:~\-]+)?$")


class BuildError(Exception):
    """A step failed; the message has the tool's own output and exit code."""


class RecipeError(ValueError):
    """The recipe itself is wrong (a bad package name, an unknown step)."""


CONFIG_OPS = {"env", "workdir", "entrypoint", "user"}
LAYER_OPS = {"apt_install", "pip_install", "uv_pip_install", "run_commands", "add_local",
             "copy_from"}
FROM_MOUNT = f"{BUILD_MOUNT}/from"  # copy_from: the source image's files, read-only
OWNER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*(:([A-Za-z0-9_][A-Za-z0-9_.\-]*)?)?$")


def step_command(step: dict) -> str:
    """The shell command a file-changing step runs (validated: no injection through names)."""
    op = step["op"]
    if op == "apt_install":
        pkgs = step.get("packages") or []
        bad = [p for p in pkgs if not APT_RE.match(p)]
        if not pkgs or bad:
            raise RecipeError(f"apt_install: invalid package name(s) {bad or pkgs!r}")
        return ("apt-get update -q && apt-get install -y -q --no-install-recommends "
                + " ".join(shlex.quote(p) for p in pkgs)
                + " && apt-get clean && rm -rf /var/lib/apt/lists/*")
    if op in ("pip_install", "uv_pip_install"):
        pkgs = step.get("packages") or []
        reqs = step.get("requirements") or []
        bad = [p for p in pkgs if not REQUIREMENT_RE.match(p)]
        if not (pkgs or reqs) or bad:
            raise RecipeError(f"{op}: invalid requirement(s) {bad or pkgs!r}")
        opts = []
        if step.get("index_url"):
            opts += ["--index-url", step["index_url"]]
        if step.get("extra_index_url"):
            opts += ["--extra-index-url", step["extra_index_url"]]
        if step.get("find_links"):
            opts += ["--find-links", step["find_links"]]
        if step.get("pre"):
            opts.append("--pre")
        extra = step.get("extra_options") or []
        if not all(isinstance(o, str) and o for o in extra):
            raise RecipeError(f"{op}: extra_options must be non-empty strings")
        opts += extra
        # Requirements files travel as their contents: written aside for the one command (with
        # shell-quoted contents, so they cannot inject anything) and removed after it.
        prep, cleanup = "", ""
        for i, text in enumerate(reqs):
            path = f"/tmp/.shoal-requirements-{i}.txt"
            prep += f"printf '%s' {shlex.quote(text)} > {path} && "
            cleanup += f" && rm -f {path}"
            opts += ["-r", path]
        args = " ".join(shlex.quote(a) for a in [*opts, *pkgs])
        if op == "pip_install":
            return f"{prep}python3 -m pip install --no-cache-dir {args}{cleanup}"
        uv = "uv" + (f"=={step['uv_version']}" if step.get("uv_version") else "")
        if not PACKAGE_RE.match(uv):
            raise RecipeError(f"uv_version: invalid version {step.get('uv_version')!r}")
        return (f"{prep}python3 -m pip install --no-cache-dir {shlex.quote(uv)} && "
                f"uv pip install --system --break-system-packages --no-cache {args}{cleanup}")
    if op == "copy_from":
        return _copy_from_command(step)
    if op == "run_commands":
        cmds = step.get("commands") or []
        if not cmds or not all(isinstance(c, str) for c in cmds):
            raise RecipeError("run_commands needs at least one command string")
        # Each command in its own subshell, on its own lines (a trailing comment stays inside).
        return " && ".join(f"(\n{c}\n)" for c in cmds)
    raise RecipeError(f"unknown image step {op!r}")


def _copy_from_command(step: dict) -> str:
    """A Dockerfile's `COPY --from=SOURCE SRC... DEST [--chown=U[:G]]`, run by busybox in the build
    sandbox, where SOURCE's files are mounted read-only at FROM_MOUNT. As Docker: a directory's
    contents are copied (not the directory), several sources or a DEST ending in `/` make DEST a
    directory, and the copies belong to root unless --chown says otherwise. Symlinks in SRC are
    followed inside the sandbox, never on the host."""
    srcs, dest, owner = step.get("srcs") or [], step.get("dest") or "", step.get("chown")
    if not srcs or not all(isinstance(x, str) and x and "\x00" not in x for x in srcs):
        raise RecipeError("copy_from needs source paths")
    if not isinstance(dest, str) or not dest.startswith("/") or "\x00" in dest:
        raise RecipeError("copy_from needs an absolute destination")
    if owner is not None and not (isinstance(owner, str) and OWNER_RE.match(owner)):
        raise RecipeError(f"copy_from: invalid --chown {owner!r}")
    bb = shlex.quote(tools.BUSYBOX)
    into_dir = dest.endswith("/") or len(srcs) > 1
    target = dest.rstrip("/") or "/"
    lines = ["set -e", f"{bb} mkdir -p {shlex.quote(target if into_dir else posixpath.dirname(target))}"]
    for src in srcs:
        path = shlex.quote(FROM_MOUNT + posixpath.normpath("/" + src.lstrip("/")))
        own = f"{bb} chown -hR {shlex.quote(owner)}" if owner else ""
        file_target = f"{shlex.quote(target)}/\"$({bb} basename \"$s\")\"" if into_dir \
            else shlex.quote(target)
        lines += [
            f"s={path}",
            "if [ ! -e \"$s\" ] && [ ! -L \"$s\" ]; then",
            f"  echo {shlex.quote(f'COPY --from: {src} is not in the source image')} >&2; exit 1",
            "fi",
            "if [ -d \"$s\" ]; then",  # its contents, merged into the target directory
            f"  d={shlex.quote(target)}; {bb} mkdir -p \"$d\"; {bb} cp -a \"$s/.\" \"$d/\"",
            *(["  for p in \"$s\"/* \"$s\"/.[!.]* \"$s\"/..?*; do",
               "    { [ -e \"$p\" ] || [ -L \"$p\" ]; } || continue",
               f"    {own} \"$d/$({bb} basename \"$p\")\"",
               "  done"] if owner else []),
            "else",
            f"  t={file_target}; {bb} cp -a \"$s\" \"$t\"",
            *([f"  {own} \"$t\""] if owner else []),
            "fi",
        ]
    return "\n".join(lines)


class Builder:
    def __init__(self, store: ImageStore, runtime, tools_dir: Path, base_store: Path,
                 network: NetworkManager | None = None):
        self.network = network  # None: build steps have only loopback
        self.store = store
        self.runtime = runtime
        self.tools_dir = tools_dir
        self.base_store = base_store
        self.mu: dict[str, asyncio.Lock] = {}  # per layer id, within this process

    async def build(self, recipe: dict, log: Log, resolve_base) -> Manifest:
        """Build (or find) every layer of `recipe`; returns its manifest. `resolve_base(base,
        log)` gives (layer ids, config, chain key) for the recipe's base."""
        started = time.monotonic()
        layers, config, key = await resolve_base(recipe["base"], log)
        config = replace(config, env=dict(config.env))
        for n, step in enumerate(recipe.get("steps") or [], 1):
            op = step.get("op")
            key = digest({"parent": key, "step": _cache_view(step)})
            label = f"[{n}] {describe(step)}"
            if op in CONFIG_OPS:
                _apply_config(config, step)
                log(f"{label}")
                continue
            if op not in LAYER_OPS:
                raise RecipeError(f"unknown image step {op!r}")
            layer_id = f"layers/{key[:32]}"
            if self.store.has_layer(layer_id):
                log(f"{label}: cached")
            else:
                await self._build_layer(layer_id, layers, config, step, f"{label}", log)
            layers = [*layers, layer_id]
        manifest = Manifest(Manifest.image_id(layers, config), layers, config, time.time(),
                            describe_recipe(recipe))
        self.store.save_manifest(manifest)
        log(f"image {manifest.id} ready ({len(layers)} layers, "
            f"{time.monotonic() - started:.1f} s)")
        return self.store.manifest(manifest.id) or manifest

    async def _build_layer(self, layer_id: str, parents: list[str], config: ImageConfig,
                           step: dict, label: str, log: Log) -> None:
        lock = self.mu.setdefault(layer_id, asyncio.Lock())
        async with lock:
            if self.store.has_layer(layer_id):
                log(f"{label}: cached (built concurrently)")
                return
            # Another process may build the same layer: wait for it on the store's file lock.
            handle = await asyncio.to_thread(self.store.acquire, layer_id.replace("/", "-"))
            try:
                if self.store.has_layer(layer_id):
                    log(f"{label}: cached (built by another process)")
                    return
                log(f"{label}: building")
                t = time.monotonic()
                if step["op"] == "add_local":
                    await asyncio.to_thread(self._add_local, layer_id, parents, step)
                elif step["op"] == "copy_from":
                    await self._copy_from(layer_id, parents, config, step, log)
                else:
                    await self._run_step(layer_id, parents, config, step, log)
                log(f"{label}: done in {time.monotonic() - t:.1f} s")
            finally:
                self.store.release(handle)

    def _add_local(self, layer_id: str, parents: list[str], step: dict) -> None:
        blob = self.store.root / "blobs" / "sha256" / step["blob"]
        if not blob.exists():
            raise BuildError(f"add_local: the uploaded files ({step['blob'][:12]}) are missing; "
                             "upload them again")
        work = self.store.scratch("add")
        try:
            (work / "rootfs").mkdir()
            dest = (step.get("path") or "/").strip("/")
            _copy_parent_dirs(self.store.mount_layers(parents), work / "rootfs", dest)
            with open(blob, "rb") as f:
                unpack(f, str(work / "rootfs"), prefix=dest)
            self.store.commit_layer(layer_id, work / "rootfs", {"step": _cache_view(step)})
        finally:
            self.store.discard(work)

    async def _copy_from(self, layer_id: str, parents: list[str], config: ImageConfig,
                         step: dict, log: Log) -> None:
        """COPY --from: the source image's layers, merged read-only on the host, are mounted into
        a build sandbox of this image, which copies from them (as root, with busybox)."""
        source = self.store.manifest(str(step.get("image_id")))
        if source is None:
            raise RecipeError(f"copy_from: no image {step.get('image_id')!r} on this server")
        lowers = await asyncio.to_thread(self.store.mount_layers, source.layers)
        view = self.store.scratch()
        try:
            if len(lowers) > 1:
                (view / "m").mkdir()
                await asyncio.to_thread(
                    _linux.mount, "overlay", str(view / "m"), "overlay", 1,  # MS_RDONLY
                    "lowerdir=" + ":".join(str(p) for p in lowers))
                files = view / "m"
            else:
                files = lowers[0]
            try:
                await self._run_step(layer_id, parents, replace(config, user=None), step, log,
                                     extra=[Mount(str(files), FROM_MOUNT, read_only=True)],
                                     shell=[tools.BUSYBOX, "sh"])
            finally:
                if files != lowers[0]:
                    await asyncio.to_thread(_linux.umount, str(files), _linux.MNT_DETACH)
        finally:
            import shutil

            await asyncio.to_thread(shutil.rmtree, view, True)

    async def _run_step(self, layer_id: str, parents: list[str], config: ImageConfig,
                        step: dict, log: Log, extra: list[Mount] = (),
                        shell: list[str] = ["/bin/sh"]) -> None:  # noqa: B006 - not mutated
        command = step_command(step)
        work = await asyncio.to_thread(self.store.scratch, "step")
        rootfs = Rootfs(work)
        cid = f"{BUILD_PREFIX}{secrets.token_hex(11)}"
        try:
            merged = rootfs.mount(self.store.mount_layers(parents))
            try:
                # A step may name its own user (a Dockerfile's COPY --chown runs as root).
                user = resolve_user(merged, step.get("user") or config.user)
            except ValueError as e:
                raise RecipeError(str(e)) from None
            env = {**config.env,
                   "DEBIAN_FRONTEND": "noninteractive", "PIP_ROOT_USER_ACTION": "ignore",
                   "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_BREAK_SYSTEM_PACKAGES": "1",
                   **(step.get("secret_env") or {})}
            mounts = list(extra)
            netns = None
            if self.network is not None:
                att = await self.network.attach(cid, Policy())
                netns = att.netns_path
                mounts.append(Mount(str(att.resolv_conf), "/etc/resolv.conf", read_only=True))
            if Path(CA_BUNDLE).exists():
                ca = f"{BUILD_MOUNT}/ca.crt"
                mounts.append(Mount(CA_BUNDLE, ca, read_only=True))
                env.update({"PIP_CERT": ca, "SSL_CERT_FILE": ca, "REQUESTS_CA_BUNDLE": ca,
                            "CURL_CA_BUNDLE": ca})
            spec = ContainerSpec(id=cid, rootfs=str(merged), args=[*shell, "-c", command],
                                 env=env, cwd=config.workdir or "/", mounts=mounts,
                                 limits=Limits(memory_mib=8192, pids=8192),
                                 tools_dir=str(self.tools_dir), netns_path=netns, net_raw=False,
                                 user=user)
            log(f"  $ {command}")
            proc = await self.runtime.run(spec, work / "bundle", asyncio.subprocess.PIPE,
                                          asyncio.subprocess.STDOUT)
            tail: list[str] = []
            try:
                async with asyncio.timeout(STEP_TIMEOUT):
                    while line := await proc.stdout.readline():
                        text = line.decode(errors="replace").rstrip()
                        tail = (tail + [text])[-30:]
                        log(f"  {text}")
                    rc = await proc.wait()
            except TimeoutError:
                await self.runtime.kill(cid, 9)
                await proc.wait()
                raise BuildError(f"step timed out after {STEP_TIMEOUT:.0f} s: {describe(step)}")
            finally:
                await self.runtime.delete(cid)
            if rc != 0:
                raise BuildError(f"{describe(step)} failed with exit code {rc}:\n"
                                 + "\n".join(tail[-15:]))
            rootfs.unmount()
            _strip_build_traces(rootfs.upper)
            self.store.commit_layer(layer_id, rootfs.upper, {"step": _cache_view(step)})
        finally:
            if self.network is not None:
                await self.network.detach(cid)
            await asyncio.to_thread(self.store.discard, work)


def _copy_parent_dirs(lowers: list[Path], layer: Path, rel: str) -> None:
    """Create the directories leading to `rel` in a new layer with the owner and mode they have in
    the image below: a directory in an upper layer hides the lower one's attributes, so a plain
    mkdir would turn /root (0700) into 0755."""
    parts = [p for p in rel.split("/") if p]
    for i in range(len(parts)):
        sub = "/".join(parts[:i + 1])
        st = None
        for lower in lowers:  # top first
            try:
                st = os.lstat(lower / sub)
                break
            except FileNotFoundError:
                continue
        if st is None or not stat.S_ISDIR(st.st_mode):
            return  # below here the tar (or unpack) creates what is missing
        target = layer / sub
        target.mkdir(exist_ok=True)
        os.chown(target, st.st_uid, st.st_gid)
        os.chmod(target, stat.S_IMODE(st.st_mode))


def _strip_build_traces(upper: Path) -> None:
    """What the build sandbox's mounts left in the layer: their empty mount points."""
    import shutil

    for name in (tools.MOUNT_POINT, BUILD_MOUNT):
        shutil.rmtree(upper / name.lstrip("/"), ignore_errors=True)
    resolv = upper / "etc" / "resolv.conf"
    if resolv.is_file() and not resolv.is_symlink() and resolv.stat().st_size == 0:
        resolv.unlink()


def _apply_config(config: ImageConfig, step: dict) -> None:
    op = step["op"]
    if op == "env":
        config.env.update(step.get("env") or {})
    elif op == "workdir":
        config.workdir = step["path"]
    elif op == "entrypoint":
        config.entrypoint = list(step.get("args") or [])
    elif op == "user":
        config.user = step.get("user")


def _cache_view(step: dict) -> dict:
    """The step as its cache key sees it: secrets only by a digest of their values."""
    view = {k: v for k, v in step.items() if v not in (None, [], {}, False)}
    if "secret_env" in view:
        view["secret_env"] = digest(view["secret_env"])
    return view


def describe(step: dict) -> str:
    op = step.get("op")
    if op in ("apt_install", "pip_install", "uv_pip_install"):
        return f"{op} {' '.join(step.get('packages') or [])}"
    if op == "run_commands":
        return "run " + " && ".join(step.get("commands") or [])
    if op == "add_local":
        return f"add_local -> {step.get('path')}"
    if op == "copy_from":
        return f"copy_from {str(step.get('image_id'))[:15]} {' '.join(step.get('srcs') or [])} " \
               f"-> {step.get('dest')}"
    if op == "env":
        return "env " + " ".join(f"{k}=..." for k in (step.get("env") or {}))
    if op == "workdir":
        return f"workdir {step.get('path')}"
    if op == "entrypoint":
        return f"entrypoint {step.get('args')}"
    return str(op)


def describe_recipe(recipe: dict) -> str:
    b = recipe["base"]
    base = {"debian_slim": "debian_slim", "registry": f"registry {b.get('tag')}",
            "image": f"image {b.get('image_id')}"}.get(b.get("kind"), str(b.get("kind")))
    steps = recipe.get("steps") or []
    return base + "".join(f" | {describe(s)}" for s in steps)
