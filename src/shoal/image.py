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

import contextlib
import hashlib
import io
import json
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

from shoal import output
from shoal._client import checked_id, get_client
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


def _refuse(**given) -> None:
    """Modal parameters shoal cannot honour: an InvalidError naming them, if they were given."""
    bad = sorted(k for k, v in given.items() if v is not None)
    if bad:
        raise InvalidError(f"{', '.join(bad)} not supported by shoal's image builds "
                           "(see docs/modal-parity.md)")


def _no_kwargs(what: str, kwargs: dict, **hints: str) -> None:
    if kwargs:
        hint = "".join(f"; use {hints[k]} for {k}=" for k in kwargs if k in hints)
        raise InvalidError(f"{what}: unexpected argument(s) {', '.join(sorted(kwargs))}{hint}")


def _step_env(env, secrets) -> dict[str, str]:
    from shoal.secret import merge_env

    return merge_env(env, secrets) if (env or secrets) else {}


def _build_step(step: dict, env, secrets, force_build: bool) -> dict:
    """A build step with its step-only environment (env + secrets: digested in the cache key,
    never stored in the image) and, for force_build, a fresh nonce so it is built again."""
    secret_env = _step_env(env, secrets)
    if secret_env:
        step["secret_env"] = secret_env
    named = [s for s in secrets or () if getattr(s, "_name", None) is not None]
    if named:  # values stay on the server, which resolves them at build time; see _resolve
        step["_secret_names"] = [[s._name, s._required_keys] for s in named]
    if force_build:
        import secrets as _secrets

        step["nonce"] = _secrets.token_hex(8)
    return step


def _pip_step(op: str, pkgs: list[str], find_links, index_url, extra_index_url, pre,
              extra_options: str) -> dict:
    import shlex

    for name, value in (("find_links", find_links), ("index_url", index_url),
                        ("extra_index_url", extra_index_url)):
        if value is not None and not isinstance(value, str):
            raise InvalidError(f"{name} must be a str (a URL), got {type(value).__name__}")
    if not isinstance(extra_options, str):
        raise InvalidError("extra_options must be a str of pip arguments, e.g. "
                           "'--no-build-isolation'")
    return {"op": op, "packages": pkgs, "index_url": index_url,
            "extra_index_url": extra_index_url, "find_links": find_links, "pre": pre,
            "extra_options": shlex.split(extra_options) or None}


def _read_local(path: str | Path, what: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what}: no such local file: {path}")
    return p.read_text()


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

    def __init__(self, spec: dict, local: dict[int, tuple[_LocalFiles, str]] | None = None,
                 sources: dict[int, _Image] | None = None):
        self._spec = spec  # {"base": {...}, "steps": [...]}
        self._local = local or {}  # step index -> files to upload for that add_local step
        self._sources = sources or {}  # step index -> the image a copy_from step copies from
        self._image_id: str | None = None

    # --- bases
    @staticmethod
    def debian_slim(python_version: str | None = None, force_build: bool = False) -> "_Image":
        """Debian bookworm with Python 3 (`python`, `pip`, `bash` work), built from Debian's
        packages. `python_version` may be one the distribution provides ("3.11"); the server says
        which when another is asked for.

        Raises InvalidError for `force_build=True` or a Python version the server cannot provide
        (when the image is built).

            image = shoal.Image.debian_slim(python_version="3.11")
        """
        if python_version is not None and not isinstance(python_version, str):
            raise InvalidError("python_version must be a str like '3.11'")
        if force_build:
            raise InvalidError("debian_slim(force_build=True) is not supported: the default "
                               "image is built once per image store; pass force_build to the "
                               "steps that should be built again")
        return _Image({"base": {"kind": "debian_slim", "python_version": python_version},
                       "steps": []})

    @staticmethod
    def from_registry(tag: str, secret=None, *, setup_dockerfile_commands: Sequence[str] = (),
                      force_build: bool = False, add_python: str | None = None,
                      **kwargs) -> "_Image":
        """An image pulled from an OCI/Docker registry (`host:port/name:tag`, or a Docker Hub
        name). Credentials, if needed, come from `secret`, a Secret with REGISTRY_USERNAME and
        REGISTRY_PASSWORD. The tag is looked up again at every build; `force_build` rebuilds the
        `setup_dockerfile_commands` on top of it too.

        Raises InvalidError for a bad reference, `add_python`, or an unknown keyword.

            img = shoal.Image.from_registry("python:3.11-slim")
        """
        if not isinstance(tag, str) or not tag:
            raise InvalidError("from_registry needs an image reference like 'python:3.11-slim'")
        _no_kwargs("from_registry", kwargs, secrets="secret=")
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
        if setup_dockerfile_commands:
            return img.dockerfile_commands(*setup_dockerfile_commands, force_build=force_build)
        return img

    @staticmethod
    def from_gcp_artifact_registry(tag: str, secret=None, *,
                                   setup_dockerfile_commands: Sequence[str] = (),
                                   force_build: bool = False, add_python: str | None = None,
                                   **kwargs) -> "_Image":
        """An image from Google Artifact Registry; `secret` has SERVICE_ACCOUNT_JSON (the key of
        a service account allowed to read it), sent as the registry's `_json_key` login.

        Raises InvalidError without SERVICE_ACCOUNT_JSON in the secret.

            img = shoal.Image.from_gcp_artifact_registry(
                "us-docker.pkg.dev/proj/repo/img:1", secret=shoal.Secret.from_dict({...}))
        """
        from shoal.secret import _Secret

        key = secret._env_dict().get("SERVICE_ACCOUNT_JSON") if secret is not None else None
        if not key:
            raise InvalidError("from_gcp_artifact_registry needs a secret with "
                               "SERVICE_ACCOUNT_JSON")
        login = _Secret({"REGISTRY_USERNAME": "_json_key", "REGISTRY_PASSWORD": key})
        return _Image.from_registry(tag, login, setup_dockerfile_commands=setup_dockerfile_commands,
                                    force_build=force_build, add_python=add_python, **kwargs)

    @staticmethod
    def from_id(image_id: str) -> "_Image":
        """An image by its id (e.g. one made by `Sandbox.snapshot_filesystem`).

        Raises NotFoundError (when used) if there is no such image.

            image = shoal.Image.from_id("im-...")
        """
        checked_id(image_id, "image", "im-")
        img = _Image({"base": {"kind": "image", "image_id": image_id}, "steps": []})
        img._image_id = image_id
        return img

    @staticmethod
    def from_dockerfile(path: str | Path, *, force_build: bool = False,
                        context_dir: str | Path | None = None, ignore: Sequence[str] = (),
                        build_args: dict[str, str] | None = None, registry_secret=None,
                        secrets=None, env: dict[str, str | None] | None = None, gpu=None,
                        add_python: str | None = None) -> "_Image":
        """An image from a Dockerfile: FROM, RUN, COPY, ADD (local files), ENV, WORKDIR, ARG,
        USER, ENTRYPOINT, CMD (LABEL and EXPOSE are accepted and ignored). `secrets` and `env`
        are environment variables of the RUN steps only; `registry_secret` logs in to the FROM
        image's registry.

        Raises InvalidError naming an unsupported instruction and its line, or for `gpu`,
        `add_python`, `ignore`.

            img = shoal.Image.from_dockerfile("Dockerfile", context_dir=".")
        """
        from shoal._dockerfile import parse_dockerfile

        _refuse(gpu=gpu, add_python=add_python, ignore=tuple(ignore) or None)
        return parse_dockerfile(Path(path), Path(context_dir) if context_dir else None,
                                build_args or {}, _step_env(env, secrets) or None,
                                registry_secret=registry_secret, force_build=force_build)

    @staticmethod
    def from_scratch(force_build: bool = False) -> "_Image":
        """Refused: a sandbox needs a shell and its tools; start from `debian_slim()` or an
        image from a registry.

        Raises InvalidError always.

            shoal.Image.debian_slim()  # instead
        """
        raise InvalidError("Image.from_scratch() is not supported by shoal: start from "
                           "Image.debian_slim() or Image.from_registry(...)")

    # --- steps
    def _with(self, step: dict, local: tuple[_LocalFiles, str] | None = None,
              source: _Image | None = None) -> "_Image":
        spec = {"base": dict(self._spec["base"]), "steps": [*self._spec["steps"], step]}
        locals_, sources = dict(self._local), dict(self._sources)
        if local:
            locals_[len(spec["steps"]) - 1] = local
        if source is not None:
            sources[len(spec["steps"]) - 1] = source
        return _Image(spec, locals_, sources)

    def _copy_from(self, source: _Image, srcs: list[str], dest: str,
                   chown: str | None = None) -> "_Image":
        """A Dockerfile's `COPY --from=SOURCE SRC... DEST`: files of another image (built first)."""
        return self._with({"op": "copy_from", "srcs": list(srcs), "dest": dest, "chown": chown},
                          source=source)

    def apt_install(self, *packages: str | list[str], force_build: bool = False,
                    env: dict[str, str | None] | None = None, secrets=None,
                    gpu=None) -> "_Image":
        """Install Debian packages (apt-get install --no-install-recommends). `env` and `secrets`
        are environment variables of this step only; `force_build` rebuilds it.

        Raises InvalidError for a bad package name or `gpu`; ExecutionError (at build) if apt
        fails.

            img = shoal.Image.debian_slim().apt_install("git", "curl")
        """
        _refuse(gpu=gpu)
        pkgs = _strs(packages, "apt_install packages")
        if not pkgs:
            return self
        return self._with(_build_step({"op": "apt_install", "packages": pkgs}, env, secrets,
                                      force_build))

    def pip_install(self, *packages: str | list[str], find_links: str | None = None,
                    index_url: str | None = None, extra_index_url: str | None = None,
                    pre: bool = False, extra_options: str = "", force_build: bool = False,
                    env: dict[str, str | None] | None = None, secrets=None,
                    gpu=None) -> "_Image":
        """Install Python packages with pip. `find_links`, `index_url`, `extra_index_url`, `pre`
        are pip's options of those names; `extra_options` more pip arguments
        ("--no-build-isolation"); `env`/`secrets` are variables of this step only.

        Raises InvalidError for `gpu`; ExecutionError (at build) with pip's message if it fails.

            img = shoal.Image.debian_slim().pip_install("requests==2.32.3", pre=True)
        """
        _refuse(gpu=gpu)
        pkgs = _strs(packages, "pip_install packages")
        if not pkgs:
            return self
        return self._with(_build_step(_pip_step("pip_install", pkgs, find_links, index_url,
                                                extra_index_url, pre, extra_options),
                                      env, secrets, force_build))

    def uv_pip_install(self, *packages: str | list[str], requirements: list | None = None,
                       find_links: str | None = None, index_url: str | None = None,
                       extra_index_url: str | None = None, pre: bool = False,
                       extra_options: str = "", force_build: bool = False,
                       uv_version: str | None = None, env: dict[str, str | None] | None = None,
                       secrets=None, gpu=None) -> "_Image":
        """Install Python packages with uv (installed into the image first, `uv_version` if
        given); `requirements` are local requirements files whose contents are installed too.

        Raises InvalidError for `gpu`, FileNotFoundError for a missing requirements file;
        ExecutionError (at build) if uv fails.

            img = shoal.Image.debian_slim().uv_pip_install("numpy", requirements=["req.txt"])
        """
        _refuse(gpu=gpu)
        pkgs = _strs(packages, "uv_pip_install packages")
        reqs = [_read_local(r, "requirements") for r in (requirements or [])]
        if not pkgs and not reqs:
            return self
        step = _pip_step("uv_pip_install", pkgs, find_links, index_url, extra_index_url, pre,
                         extra_options)
        step.update({"requirements": reqs or None, "uv_version": uv_version})
        return self._with(_build_step(step, env, secrets, force_build))

    def pip_install_from_requirements(self, requirements_txt: str | Path,
                                      find_links: str | None = None, *,
                                      index_url: str | None = None,
                                      extra_index_url: str | None = None, pre: bool = False,
                                      extra_options: str = "", force_build: bool = False,
                                      env: dict[str, str | None] | None = None, secrets=None,
                                      gpu=None) -> "_Image":
        """Install the packages of a local requirements file with pip (`pip install -r`; the
        file's own options such as `--index-url` work).

        Raises FileNotFoundError if the file does not exist, InvalidError for `gpu`;
        ExecutionError (at build) if pip fails.

            img = shoal.Image.debian_slim().pip_install_from_requirements("requirements.txt")
        """
        _refuse(gpu=gpu)
        step = _pip_step("pip_install", [], find_links, index_url, extra_index_url, pre,
                         extra_options)
        step["requirements"] = [_read_local(requirements_txt, "requirements_txt")]
        return self._with(_build_step(step, env, secrets, force_build))

    def pip_install_from_pyproject(self, pyproject_toml: str | Path,
                                   optional_dependencies: list[str] = [], *,  # noqa: B006
                                   find_links: str | None = None, index_url: str | None = None,
                                   extra_index_url: str | None = None, pre: bool = False,
                                   extra_options: str = "", force_build: bool = False,
                                   env: dict[str, str | None] | None = None, secrets=None,
                                   gpu=None) -> "_Image":
        """Install `[project] dependencies` of a local pyproject.toml (and the named groups of
        `[project.optional-dependencies]`) with pip; the project itself is not installed.

        Raises FileNotFoundError for a missing file, InvalidError for a group the file does not
        have or `gpu`.

            img = shoal.Image.debian_slim().pip_install_from_pyproject("pyproject.toml", ["test"])
        """
        import tomllib

        _refuse(gpu=gpu)
        project = tomllib.loads(_read_local(pyproject_toml, "pyproject_toml")).get("project", {})
        deps = list(project.get("dependencies") or [])
        optional = project.get("optional-dependencies") or {}
        for group in optional_dependencies:
            if group not in optional:
                raise InvalidError(f"{pyproject_toml} has no optional dependency group "
                                   f"{group!r} (it has {sorted(optional)})")
            deps += optional[group]
        return self.pip_install(*deps, find_links=find_links, index_url=index_url,
                                extra_index_url=extra_index_url, pre=pre,
                                extra_options=extra_options, force_build=force_build, env=env,
                                secrets=secrets)

    def uv_sync(self, uv_project_dir: str | Path = "./", *, force_build: bool = False,
                groups: list[str] | None = None, extras: list[str] | None = None,
                frozen: bool = True, extra_options: str = "", uv_version: str | None = None,
                env: dict[str, str | None] | None = None, secrets=None,
                gpu=None) -> "_Image":
        """Install the locked dependencies of a local uv project (pyproject.toml and uv.lock)
        into the image's Python: `uv export` of the lock (with `groups` and `extras`), then
        `uv pip install --system` of it. The project itself is not installed, and packages
        already in the image that the lock does not name are left alone.

        Raises FileNotFoundError without pyproject.toml (or uv.lock when `frozen`), InvalidError
        for `gpu`; ExecutionError (at build) if uv fails.

            img = shoal.Image.debian_slim().uv_sync("./my-project", groups=["dev"])
        """
        _refuse(gpu=gpu)
        project = Path(uv_project_dir)
        pyproject = _read_local(project / "pyproject.toml", "uv_project_dir")
        lock = project / "uv.lock"
        if frozen and not lock.is_file():
            raise FileNotFoundError(f"uv_sync(frozen=True) needs {lock}; run `uv lock`")
        img = self.run_commands("mkdir -p /.uv").add_local_file(project / "pyproject.toml",
                                                               "/.uv/pyproject.toml")
        if lock.is_file():
            img = img.add_local_file(lock, "/.uv/uv.lock")
        del pyproject
        uv = "uv" + (f"=={uv_version}" if uv_version else "")
        export = ["uv", "export", "--no-hashes", "--no-emit-project",
                  "--frozen" if frozen else "--locked" if lock.is_file() else "--no-header"]
        for g in groups or []:
            export += ["--group", g]
        for e in extras or []:
            export += ["--extra", e]
        import shlex

        opts = shlex.split(extra_options or "")
        cmd = (f"python3 -m pip install --no-cache-dir {shlex.quote(uv)} && cd /.uv && "
               f"{shlex.join(export)} > /tmp/.shoal-uv-requirements.txt && "
               "uv pip install --system --break-system-packages --no-cache "
               f"{shlex.join(opts)} -r /tmp/.shoal-uv-requirements.txt && "
               "rm -f /tmp/.shoal-uv-requirements.txt")
        return img.run_commands(cmd, env=env, secrets=secrets or (), force_build=force_build)

    def run_commands(self, *commands: str | list[str], env: dict[str, str | None] | None = None,
                     secrets: Sequence = (), volumes: dict | None = None, gpu=None,
                     force_build: bool = False) -> "_Image":
        """Run shell commands (with /bin/sh, one after the other). `env` and `secrets` become
        environment variables of the commands; they are not stored in the image.

        Raises InvalidError for `volumes` or `gpu`; ExecutionError (at build) with the output's
        tail and the exit code if a command fails.

            img = shoal.Image.debian_slim().run_commands("echo hi > /greeting")
        """
        _refuse(gpu=gpu, volumes=volumes or None)
        cmds = _strs(commands, "run_commands commands")
        if not cmds:
            return self
        return self._with(_build_step({"op": "run_commands", "commands": cmds}, env, secrets,
                                      force_build))

    def dockerfile_commands(self, *dockerfile_commands: str | list[str],
                            context_files: dict[str, str] | None = None,
                            env: dict[str, str | None] | None = None, secrets=None, gpu=None,
                            context_dir: str | Path | None = None, force_build: bool = False,
                            ignore: Sequence[str] = (),
                            build_args: dict[str, str] | None = None) -> "_Image":
        """Extend the image with Dockerfile instructions (RUN, COPY from `context_dir`, ENV,
        WORKDIR, ARG, USER, ENTRYPOINT, ...; `FROM base` may start them, as in Modal).

        Raises InvalidError for an unsupported instruction, `context_files`, `ignore` or `gpu`.

            img = shoal.Image.debian_slim().dockerfile_commands("RUN echo hi > /x", "ENV A=1")
        """
        from shoal._dockerfile import apply_dockerfile

        _refuse(gpu=gpu, context_files=context_files or None, ignore=tuple(ignore) or None)
        lines = _strs(dockerfile_commands, "dockerfile_commands")
        if not lines:
            return self
        ctx = Path(context_dir) if context_dir else Path.cwd()
        return apply_dockerfile("\n".join(lines), "dockerfile_commands", ctx, build_args or {},
                                _step_env(env, secrets) or None, image=self,
                                force_build=force_build)

    def env(self, vars: dict[str, str]) -> "_Image":
        """Set environment variables for later steps and for sandboxes.

        Raises InvalidError if `vars` is not a dict of str to str.

            image = shoal.Image.debian_slim().env({"PYTHONUNBUFFERED": "1"})
        """
        if not isinstance(vars, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in vars.items()):
            raise InvalidError("env needs a dict of str to str")
        return self._with({"op": "env", "env": dict(vars)})

    def workdir(self, path: str | PurePosixPath) -> "_Image":
        """The working directory of later steps and of sandboxes.

        Raises InvalidError if `path` is not absolute.

            image = shoal.Image.debian_slim().workdir("/app")
        """
        return self._with({"op": "workdir", "path": _abs(path, "workdir")})

    def cmd(self, cmd: list[str]) -> "_Image":
        """The image's default command (Docker's CMD). Recorded only: a sandbox's command is
        what `Sandbox.create(*args)` gives, and without args a sandbox idles until terminated.

        Raises InvalidError if `cmd` is not a list of strings.

            img = shoal.Image.debian_slim().cmd(["python", "app.py"])
        """
        if not isinstance(cmd, list) or not all(isinstance(c, str) for c in cmd):
            raise InvalidError("cmd must be a list of strings")
        return self

    def entrypoint(self, entrypoint_commands: list[str]) -> "_Image":
        """A command that a sandbox's arguments are appended to (like Docker's ENTRYPOINT).

        Raises InvalidError if `entrypoint_commands` is not a list of str.

            image = shoal.Image.debian_slim().entrypoint(["/bin/sh", "-c"])
        """
        return self._with({"op": "entrypoint",
                           "args": _strs(entrypoint_commands, "entrypoint")})

    def add_local_file(self, local_path: str | Path, remote_path: str, *,
                       copy: bool = True) -> "_Image":
        """Add a file from this machine at `remote_path` (a directory if it ends with '/').

        Raises InvalidError for a missing file or a relative `remote_path`.

            image = shoal.Image.debian_slim().add_local_file("cfg.toml", "/app/cfg.toml")
        """
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
        function of the relative path) for files to leave out.

        Raises InvalidError if `local_path` is not a directory or `remote_path` is not absolute
        (when the image is built: NotFoundError for a missing file).

            image = shoal.Image.debian_slim().add_local_dir("src", "/app/src")
        """
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
        placed under /root/pysrc, which the image puts on PYTHONPATH.

        Raises InvalidError (at build) if a module cannot be found locally.

            image = shoal.Image.debian_slim().add_local_python_source("mypkg")
        """
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
        remember = not self._local and not self._sources \
            and self._spec["base"].get("kind") != "registry" \
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
        for idx, source in self._sources.items():
            spec["steps"][idx]["image_id"] = await source._resolve(fresh)
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

    async def build(self, app=None) -> "_Image":
        """Build now (otherwise the first sandbox that uses the image builds it); always asks the
        server, which answers from its cache when nothing changed. `app` is accepted (images are
        shared by all apps of a server).

        Raises InvalidError for a bad recipe, ExecutionError if a step fails.

            img = shoal.Image.debian_slim().pip_install("six").build()
        """
        await self._resolve(fresh=True)
        return self

    async def hydrate(self, client=None) -> "_Image":
        """Build the image if needed (from the cache when nothing changed); returns it.

        Raises InvalidError for a bad recipe, ExecutionError if a step fails.

            img = shoal.Image.debian_slim().hydrate()
        """
        from shoal.client import check_client

        check_client(client)
        await self._resolve()
        return self

    @property
    def client(self):
        """The Client for the server that builds the image."""
        from shoal.client import _Client

        return _Client()

    @contextlib.contextmanager
    def imports(self):
        """A block for imports that only the image has: on this machine an ImportError inside it
        is ignored (Modal's behaviour outside its containers).

        Raises nothing from a failed import.

            with image.imports():
                import pandas
        """
        try:
            yield
        except ImportError:
            pass

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
