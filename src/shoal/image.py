"""Images: the root filesystem a sandbox starts from (Modal's `modal.Image`).

    image = (shoal.Image.debian_slim()
             .apt_install("git")
             .pip_install("requests==2.32.3")
             .add_local_dir("./src", "/app/src")
             .env({"APP_MODE": "test"})
             .workdir("/app"))
    sb = shoal.Sandbox.create(image=image)

An image is a recipe; each method returns a new image with one more step. The server builds it on
first use, one cached layer per step (so a second build of the same recipe takes no time, and a
changed step rebuilds from there on). `with shoal.enable_output():` shows the build as it runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

from shoal import output
from shoal._client import get_client
from shoal._sync import synchronize_api
from shoal.exception import ExecutionError, InvalidError, from_wire


def _strs(values: Sequence, what: str) -> list[str]:
    flat: list[str] = []
    for v in values:
        if isinstance(v, (list, tuple)):
            flat += _strs(v, what)
        elif isinstance(v, str):
            flat.append(v)
        else:
            raise InvalidError(f"{what} must be strings, got {type(v).__name__} ({v!r})")
    return flat


def _abs(path: str | PurePosixPath, what: str) -> str:
    p = str(path)
    if not p.startswith("/") or "\x00" in p or ".." in p.split("/"):
        raise InvalidError(f"{what} must be an absolute path inside the image, got {p!r}")
    return p


_RESOLVED: dict[str, str] = {}  # recipe -> image id, for recipes without local files


class _LocalFiles:
    """Files to add from this machine: packed into a deterministic tar when the image is built,
    so its digest (and so the cache key) depends only on names, modes and contents."""

    def __init__(self, local: Path, is_dir: bool, ignore: Callable[[Path], bool] | None):
        self.local = local
        self.is_dir = is_dir
        self.ignore = ignore

    def _entries(self) -> list[tuple[str, Path]]:
        if not self.is_dir:
            return [(self.local.name, self.local)]
        out = []
        for p in sorted(self.local.rglob("*")):
            rel = p.relative_to(self.local)
            if self.ignore and self.ignore(rel):
                continue
            out.append((rel.as_posix(), p))
        return out

    def pack(self) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, path in self._entries():
                info = tar.gettarinfo(str(path), arcname=name)
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                info.mtime = 0
                if info.isreg():
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                elif info.isdir() or info.issym():
                    tar.addfile(info)
        return buf.getvalue()


class _Image:
    """A recipe for a sandbox's root filesystem, built by the server on first use and cached."""

    def __init__(self, spec: dict, local: dict[int, tuple[_LocalFiles, str]] | None = None):
        self._spec = spec  # {"base": {...}, "steps": [...]}
        self._local = local or {}  # step index -> files to upload for that add_local step
        self._image_id: str | None = None

    # --- bases
    @staticmethod
    def debian_slim(python_version: str | None = None, force_build: bool = False) -> "_Image":
        """Debian bookworm with Python 3 (`python`, `pip`, `bash` work), built from Debian's
        packages. `python_version` may be one the distribution provides ("3.11"); the server says
        which when another is asked for."""
        if python_version is not None and not isinstance(python_version, str):
            raise InvalidError("python_version must be a str like '3.11'")
        return _Image({"base": {"kind": "debian_slim", "python_version": python_version},
                       "steps": []})

    @staticmethod
    def from_registry(tag: str, *, secret=None, setup_dockerfile_commands: Sequence[str] = (),
                      add_python: str | None = None, **_ignored) -> "_Image":
        """An image pulled from an OCI/Docker registry (`host:port/name:tag`, or a Docker Hub
        name). Credentials, if needed, come from a Secret with REGISTRY_USERNAME and
        REGISTRY_PASSWORD."""
        if not isinstance(tag, str) or not tag:
            raise InvalidError("from_registry needs an image reference like 'python:3.11-slim'")
        if add_python:
            raise InvalidError("from_registry(add_python=...) is not supported: shoal does not "
                               "download interpreters; use an image that has Python")
        base = {"kind": "registry", "tag": tag}
        if secret is not None and secret._name is not None:
            base["_secret_name"] = [secret._name, secret._required_keys]  # resolved by the server
        elif secret is not None:
            env = secret._env_dict()
            base["username"] = env.get("REGISTRY_USERNAME")
            base["password"] = env.get("REGISTRY_PASSWORD")
        img = _Image({"base": base, "steps": []})
        return img.run_commands(*setup_dockerfile_commands) if setup_dockerfile_commands else img

    @staticmethod
    def from_id(image_id: str) -> "_Image":
        """An image by its id (e.g. one made by `Sandbox.snapshot_filesystem`)."""
        if not isinstance(image_id, str) or not image_id.startswith("im-"):
            raise InvalidError(f"invalid image id {image_id!r}")
        img = _Image({"base": {"kind": "image", "image_id": image_id}, "steps": []})
        img._image_id = image_id
        return img

    @staticmethod
    def from_dockerfile(path: str | Path, context_dir: str | Path | None = None,
                        build_args: dict[str, str] | None = None, secrets=None) -> "_Image":
        """An image from a Dockerfile: FROM, RUN, COPY, ADD (local files), ENV, WORKDIR, ARG,
        USER, ENTRYPOINT, CMD (LABEL and EXPOSE are accepted and ignored); anything else is an
        InvalidError naming the instruction."""
        from shoal._dockerfile import parse_dockerfile

        return parse_dockerfile(Path(path), Path(context_dir) if context_dir else None,
                                build_args or {}, secrets)

    # --- steps
    def _with(self, step: dict, local: tuple[_LocalFiles, str] | None = None) -> "_Image":
        spec = {"base": dict(self._spec["base"]), "steps": [*self._spec["steps"], step]}
        locals_ = dict(self._local)
        if local:
            locals_[len(spec["steps"]) - 1] = local
        return _Image(spec, locals_)

    def apt_install(self, *packages: str | list[str], force_build: bool = False,
                    secrets=None) -> "_Image":
        """Install Debian packages (apt-get install --no-install-recommends)."""
        pkgs = _strs(packages, "apt_install packages")
        if not pkgs:
            return self
        return self._with({"op": "apt_install", "packages": pkgs})

    def pip_install(self, *packages: str | list[str], index_url: str | None = None,
                    extra_index_url: str | None = None, pre: bool = False,
                    force_build: bool = False, secrets=None, **_ignored) -> "_Image":
        """Install Python packages with pip."""
        pkgs = _strs(packages, "pip_install packages")
        if not pkgs:
            return self
        return self._with({"op": "pip_install", "packages": pkgs, "index_url": index_url,
                           "extra_index_url": extra_index_url, "pre": pre})

    def uv_pip_install(self, *packages: str | list[str], index_url: str | None = None,
                       extra_index_url: str | None = None, pre: bool = False,
                       **_ignored) -> "_Image":
        """Install Python packages with uv (installed into the image first)."""
        pkgs = _strs(packages, "uv_pip_install packages")
        if not pkgs:
            return self
        return self._with({"op": "uv_pip_install", "packages": pkgs, "index_url": index_url,
                           "extra_index_url": extra_index_url, "pre": pre})

    def run_commands(self, *commands: str | list[str], secrets: Sequence = (),
                     force_build: bool = False, **_ignored) -> "_Image":
        """Run shell commands (with /bin/sh, one after the other). Secrets become environment
        variables of the commands; they are not stored in the image."""
        cmds = _strs(commands, "run_commands commands")
        if not cmds:
            return self
        from shoal.secret import merge_env

        secret_env = merge_env(None, secrets) if secrets else None
        step = {"op": "run_commands", "commands": cmds, "secret_env": secret_env}
        named = [s for s in secrets or () if getattr(s, "_name", None) is not None]
        if named:  # values stay on the server, which resolves them at build time; see _resolve
            step["_secret_names"] = [[s._name, s._required_keys] for s in named]
        return self._with(step)

    def env(self, vars: dict[str, str]) -> "_Image":
        """Set environment variables for later steps and for sandboxes."""
        if not isinstance(vars, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in vars.items()):
            raise InvalidError("env needs a dict of str to str")
        return self._with({"op": "env", "env": dict(vars)})

    def workdir(self, path: str | PurePosixPath) -> "_Image":
        """The working directory of later steps and of sandboxes."""
        return self._with({"op": "workdir", "path": _abs(path, "workdir")})

    def entrypoint(self, entrypoint_commands: list[str]) -> "_Image":
        """A command that a sandbox's arguments are appended to (like Docker's ENTRYPOINT)."""
        return self._with({"op": "entrypoint",
                           "args": _strs(entrypoint_commands, "entrypoint")})

    def add_local_file(self, local_path: str | Path, remote_path: str, *,
                       copy: bool = True) -> "_Image":
        """Add a file from this machine at `remote_path` (a directory if it ends with '/')."""
        local = Path(local_path)
        if not local.is_file():
            raise FileNotFoundError(f"no such local file: {local_path}")
        remote = str(remote_path)
        if remote.endswith("/"):
            remote += local.name
        remote = _abs(remote, "remote_path")
        parent, name = remote.rsplit("/", 1)
        if name in ("", ".", ".."):
            raise InvalidError(f"remote_path {remote_path!r} must name a file, or end with '/'")
        return self._with({"op": "add_local", "path": parent or "/"},
                          (_LocalFiles(local, False, None), name))

    def add_local_dir(self, local_path: str | Path, remote_path: str, *, copy: bool = True,
                      ignore: Sequence[str] | Callable[[Path], bool] = ()) -> "_Image":
        """Add a directory from this machine at `remote_path`. `ignore`: glob patterns (or a
        function of the relative path) for files to leave out."""
        local = Path(local_path)
        if not local.is_dir():
            raise NotADirectoryError(f"no such local directory: {local_path}")
        if callable(ignore):
            pred = ignore
        else:
            patterns = list(ignore)

            def pred(rel: Path) -> bool:
                return any(rel.match(p) or any(part == p for part in rel.parts)
                           for p in patterns)
        return self._with({"op": "add_local", "path": _abs(remote_path, "remote_path")},
                          (_LocalFiles(local, True, pred), ""))

    def add_local_python_source(self, *module_names: str, copy: bool = True,
                                ignore: Sequence[str] = ("__pycache__", "*.pyc")) -> "_Image":
        """Add the source of local Python packages or modules, importable in the sandbox: they are
        placed under /root/pysrc, which the image puts on PYTHONPATH."""
        import importlib.util

        img = self
        for name in module_names:
            spec = importlib.util.find_spec(name)
            if spec is None or not spec.origin:
                raise InvalidError(f"module {name!r} is not importable here")
            if spec.submodule_search_locations:
                src = Path(list(spec.submodule_search_locations)[0])
                img = img.add_local_dir(src, f"/root/pysrc/{name}", ignore=ignore)
            else:
                img = img.add_local_file(spec.origin, f"/root/pysrc/{Path(spec.origin).name}")
        return img.env({"PYTHONPATH": "/root/pysrc"})

    # --- building
    async def _resolve(self, fresh: bool = False) -> str:
        """Build the image on the server (cached layers are reused); returns its id. A recipe
        without local files that this process resolved before is not sent again (one round trip
        less per Sandbox.create) unless `fresh`."""
        # Registry tags can move, and local files can change: only those recipes are remembered.
        remember = not self._local and self._spec["base"].get("kind") != "registry" \
            and "_secret_name" not in json.dumps(self._spec)  # a named secret's values can change
        key = json.dumps(self._spec, sort_keys=True) if remember else None
        if fresh:
            _RESOLVED.pop(key, None)
            if self._spec["base"].get("kind") != "image":
                self._image_id = None
        if self._image_id:
            return self._image_id
        if key in _RESOLVED:
            self._image_id = _RESOLVED[key]
            return self._image_id
        client = await get_client()
        spec = json.loads(json.dumps(self._spec))
        await _secret_names_to_ids(spec)
        blobs: dict[str, bytes] = {}
        for idx, (files, name) in self._local.items():
            data = files.pack() if files.is_dir else _single(files, name)
            sha = hashlib.sha256(data).hexdigest()
            blobs[sha] = data
            spec["steps"][idx]["blob"] = sha
        if blobs:
            missing = (await client.call("POST", "/images/blobs/missing",
                                         json={"digests": list(blobs)}))["missing"]
            for sha in missing:
                await client.call("PUT", f"/images/blobs/{sha}", content=blobs[sha])
        async with client.stream("POST", "/images", json=spec) as resp:
            async for line in resp.aiter_lines():
                if not line:
                    continue
                item = json.loads(line)
                if "log" in item:
                    output.emit(item["log"])
                elif "image_id" in item:
                    self._image_id = item["image_id"]
                elif "error" in item:
                    err = from_wire(item["error"]["type"], item["error"]["message"])
                    raise err
        if not self._image_id:
            raise ExecutionError("the image build ended without a result; see the server log")
        if key is not None:
            _RESOLVED[key] = self._image_id
        return self._image_id

    async def build(self) -> "_Image":
        """Build now (otherwise the first sandbox that uses the image builds it); always asks the
        server, which answers from its cache when nothing changed."""
        await self._resolve(fresh=True)
        return self

    @property
    def object_id(self) -> str | None:
        return self._image_id

    def __repr__(self) -> str:
        return f"Image({self._image_id or self._spec['base'].get('kind')}, " \
               f"{len(self._spec['steps'])} steps)"


def _single(files: _LocalFiles, name: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tar.gettarinfo(str(files.local), arcname=name)
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = 0
        with open(files.local, "rb") as f:
            tar.addfile(info, f)
    return buf.getvalue()


Image = synchronize_api(_Image)
__all__ = ["Image"]


async def _secret_names_to_ids(spec: dict) -> None:
    """Named secrets of a recipe become ids, looked up now (NotFoundError, InvalidError for
    missing required keys); the server resolves their values."""
    from shoal.secret import _Secret

    async def ids(pairs):
        return [await _Secret(name=n, required_keys=keys)._id() for n, keys in pairs]

    for step in spec["steps"]:
        if "_secret_names" in step:
            step["secret_ids"] = await ids(step.pop("_secret_names"))
    if "_secret_name" in spec["base"]:
        spec["base"]["secret_id"] = (await ids([spec["base"].pop("_secret_name")]))[0]
