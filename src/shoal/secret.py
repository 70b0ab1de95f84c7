"""Secrets: environment variables given to a sandbox, an exec or an image build (Modal's
`modal.Secret`).

Two kinds: inline ones (`from_dict`, `from_local_environ`, `from_dotenv`), whose values travel with
the request that uses them, and named ones (`from_name`), stored by the server (`shoal secret
create`) and resolved there: their values never pass through the client.

Order: later secrets win over earlier ones, and `env=` wins over all. Named secrets are applied
before inline ones (the server resolves them), so an inline secret wins over a named one that sets
the same variable, wherever the two stand in the list.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shoal._client import get_client
from shoal._sync import synchronize_api
from shoal.exception import InvalidError

_DOTENV_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_.]*)\s*=\s*(.*?)\s*$")


@dataclass(frozen=True)
class SecretInfo:
    name: str
    created_at: datetime.datetime
    updated_at: datetime.datetime
    keys: list[str]


def _info(r: dict) -> SecretInfo:
    ts = datetime.datetime.fromtimestamp
    return SecretInfo(r["name"], ts(r["created_at"], datetime.timezone.utc),
                      ts(r["updated_at"], datetime.timezone.utc), list(r["keys"]))


class _Secret:
    def __init__(self, env: dict[str, str] | None = None, *, name: str | None = None,
                 required_keys: Sequence[str] = ()):
        self._env = env
        self._name = name
        self._required_keys = list(required_keys)
        self._secret_id: str | None = None
        self._lock: asyncio.Lock | None = None

    @staticmethod
    def from_dict(env_dict: dict[str, str | None] = {}) -> "_Secret":  # noqa: B006 - Modal's signature
        """A secret from a dict of environment variables (None values are dropped).

        Raises InvalidError if a key or value is not a str.

            shoal.Secret.from_dict({"API_TOKEN": "..."})
        """
        if not isinstance(env_dict, dict) or not all(isinstance(k, str) for k in env_dict):
            raise InvalidError("Secret.from_dict needs a dict of str to str")
        bad = [k for k, v in env_dict.items() if v is not None and not isinstance(v, str)]
        if bad:
            raise InvalidError(f"Secret.from_dict values must be str; not for {bad}")
        return _Secret({k: v for k, v in env_dict.items() if v is not None})

    @staticmethod
    def from_local_environ(env_keys: list[str]) -> "_Secret":
        """A secret from variables of the calling process's environment. InvalidError names the
        ones that are not set.

        Raises InvalidError if a named variable is not set here.

            secret = shoal.Secret.from_local_environ(["HF_TOKEN"])
        """
        if isinstance(env_keys, str):
            raise InvalidError("env_keys must be a list of variable names")
        missing = [k for k in env_keys if k not in os.environ]
        if missing:
            raise InvalidError("Could not find local environment variable(s) "
                               f"{', '.join(missing)} for Secret.from_local_environ")
        return _Secret({k: os.environ[k] for k in env_keys})

    @staticmethod
    def from_dotenv(path: str | Path | None = None, *, filename: str = ".env",
                    client=None) -> "_Secret":
        """A secret from a `.env` file: searched for in `path` (a directory, or a file such as
        `__file__`, whose directory is used; default: the working directory) and its parents.
        No file found: an empty secret, as Modal's.

            shoal.Secret.from_dotenv(__file__)

        Raises InvalidError if the file cannot be read, or for a `client=` naming another server.
        """
        from shoal.client import check_client

        check_client(client)
        start = Path(path) if path is not None else Path.cwd()
        if start.is_file():
            start = start.parent
        for d in (start.resolve(), *start.resolve().parents):
            candidate = d / filename
            if candidate.is_file():
                return _Secret(_parse_dotenv(candidate))
        return _Secret({})

    @staticmethod
    def from_name(name: str, *, environment_name: str | None = None,
                  required_keys: list[str] = [],  # noqa: B006 - Modal's signature
                  namespace=None) -> "_Secret":
        """A secret stored by the server (`shoal secret create NAME KEY=VALUE ...`). Looked up on
        first use: NotFoundError if there is none, InvalidError if it lacks one of
        `required_keys`. Its values stay on the server.

            sb = shoal.Sandbox.create(secrets=[shoal.Secret.from_name("aws")], app=app)

        Raises NotFoundError (when used) if no secret has that name.
        """
        if not isinstance(name, str) or not name:
            raise InvalidError(f"secret name must be a non-empty str, got {name!r}")
        if isinstance(required_keys, str) or not all(isinstance(k, str) for k in required_keys):
            raise InvalidError("required_keys must be a list of variable names")
        return _Secret(name=name, required_keys=required_keys)

    async def hydrate(self, client=None) -> "_Secret":
        """Look a named secret up now (it is otherwise looked up on first use).

        Raises NotFoundError for an unknown name, InvalidError for a `client=` naming another
        server.

            secret = shoal.Secret.from_name("aws").hydrate()
        """
        from shoal.client import check_client

        check_client(client)
        await self._id()
        return self

    @property
    def client(self):
        """The Client for the process's server."""
        from shoal.client import _Client

        return _Client()

    async def _id(self) -> str | None:
        if self._name is None:
            return None
        if self._secret_id is None:
            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                if self._secret_id is None:
                    client = await get_client()
                    r = await client.call("POST", "/secrets/lookup", json={
                        "name": self._name, "required_keys": self._required_keys})
                    self._secret_id = r["secret_id"]
        return self._secret_id

    @property
    def object_id(self) -> str | None:
        return self._secret_id

    @property
    def name(self) -> str | None:
        return self._name

    async def info(self) -> SecretInfo:
        """Name, dates and key names of a named secret (never its values).

        Raises NotFoundError for a deleted secret, InvalidError for an unnamed one.

            print(shoal.Secret.from_name("api").info().name)
        """
        if self._name is None:
            raise InvalidError("only a named secret (Secret.from_name) has info")
        client = await get_client()
        return _info(await client.call("POST", "/secrets/lookup", json={
            "name": self._name, "required_keys": self._required_keys}))

    def _env_dict(self) -> dict[str, str]:
        if self._env is None:
            raise InvalidError(f"secret {self._name!r} is stored on the server; its values are "
                               "not available to the client")
        return dict(self._env)

    def __repr__(self) -> str:
        if self._name is not None:
            return f"Secret.from_name({self._name!r})"
        return f"Secret({sorted(self._env)})"


class _SecretManager:
    """`Secret.objects`: create, list and delete named secrets."""

    async def create(self, name: str, env_dict: dict[str, str], *, allow_existing: bool = False,
                     environment_name: str | None = None) -> None:
        """Store a named secret. AlreadyExistsError if it exists, unless `allow_existing`
        (then its values are replaced).

        Raises AlreadyExistsError if it exists (unless `allow_existing`), InvalidError for a bad
        name or values.

            shoal.Secret.objects.create("api", {"TOKEN": "..."})
        """
        client = await get_client()
        await client.call("POST", "/secrets", json={"name": name, "env": env_dict,
                                                     "force": allow_existing})

    async def list(self, *, environment_name: str | None = None) -> list[SecretInfo]:
        """Named secrets: names, dates and key names (never values).

        Raises ConnectionError if the server cannot be reached.

            names = [s.name for s in shoal.Secret.objects.list()]
        """
        client = await get_client()
        return [_info(r) for r in await client.call("GET", "/secrets")]

    async def delete(self, name: str, *, allow_missing: bool = False,
                     environment_name: str | None = None) -> None:
        """Delete a named secret. NotFoundError if missing, unless `allow_missing`.

        Raises NotFoundError if there is no such secret (unless `allow_missing`).

            shoal.Secret.objects.delete("api")
        """
        client = await get_client()
        await client.call("DELETE", f"/secrets/{name}", params={"allow_missing": allow_missing})


def _parse_dotenv(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _DOTENV_LINE.match(line)
        if not m:
            continue
        key, value = m.groups()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            quote, value = value[0], value[1:-1]
            if quote == '"':
                value = value.replace("\\n", "\n").replace('\\"', '"')
        else:
            value = re.sub(r"\s+#.*$", "", value)
        env[key] = value
    return env


_Secret.objects = _SecretManager()
SecretManager = synchronize_api(_SecretManager)
Secret = synchronize_api(_Secret)


def _check(secrets) -> list[_Secret]:
    out = []
    for s in secrets or ():
        if not isinstance(s, _Secret):
            raise InvalidError(f"secrets must be Secret objects, got {type(s).__name__}")
        out.append(s)
    return out


def merge_env(env: dict[str, str] | None, secrets) -> dict[str, str]:
    """The inline secrets' values, then `env` (named secrets are left to the server)."""
    merged: dict[str, str] = {}
    for s in _check(secrets):
        if s._name is None:
            merged.update(s._env_dict())
    if env:
        if not isinstance(env, dict):
            raise InvalidError("env must be a dict of str to str")
        for k, v in env.items():
            if not isinstance(k, str) or not isinstance(v, (str, type(None))):
                raise InvalidError(f"env values must be str; {k!r} is {type(v).__name__}")
        merged.update({k: v for k, v in env.items() if v is not None})
    return merged


async def secret_ids(secrets) -> list[str]:
    """Ids of the named secrets among `secrets`, in order (looking them up)."""
    named = [s for s in _check(secrets) if s._name is not None]
    if not named:  # (gather() with nothing to wait for still wants an event loop)
        return []
    return list(await asyncio.gather(*(s._id() for s in named)))
