"""Secrets: environment variables given to a sandbox or an exec (Modal's `modal.Secret`)."""

from __future__ import annotations

import os

from shoal._sync import synchronize_api
from shoal.exception import InvalidError, NotFoundError


class _Secret:
    def __init__(self, env: dict[str, str]):
        self._env = env

    @staticmethod
    def from_dict(env_dict: dict[str, str | None] = {}) -> "_Secret":  # noqa: B006 - Modal's signature
        """A secret from a dict of environment variables (None values are dropped)."""
        if not isinstance(env_dict, dict) or not all(isinstance(k, str) for k in env_dict):
            raise InvalidError("Secret.from_dict needs a dict of str to str")
        bad = [k for k, v in env_dict.items() if v is not None and not isinstance(v, str)]
        if bad:
            raise InvalidError(f"Secret.from_dict values must be str; not for {bad}")
        return _Secret({k: v for k, v in env_dict.items() if v is not None})

    @staticmethod
    def from_local_environ(env_keys: list[str]) -> "_Secret":
        """A secret from variables of the calling process's environment."""
        missing = [k for k in env_keys if k not in os.environ]
        if missing:
            raise NotFoundError(f"not in the local environment: {', '.join(missing)}")
        return _Secret({k: os.environ[k] for k in env_keys})

    @staticmethod
    def from_dotenv(path=None, *, filename: str = ".env", client=None) -> "_Secret":
        """A secret from a `.env` file: `filename` in the directory `path` (default: the current
        directory). Lines are KEY=VALUE, optionally quoted, with `export ` and # comments allowed.

        Raises NotFoundError if the file does not exist, InvalidError for a line that is not
        KEY=VALUE.

            sb = shoal.Sandbox.create(secrets=[shoal.Secret.from_dotenv()])
        """
        import shlex
        from pathlib import Path

        from shoal.client import check_client

        check_client(client)
        base = Path(path) if path is not None else Path.cwd()
        file = base / filename if base.is_dir() or path is None else base
        if not file.is_file():
            raise NotFoundError(f"no such .env file: {file}")
        env: dict[str, str] = {}
        for n, line in enumerate(file.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.removeprefix("export ").partition("=")
            if not sep or not key.strip().isidentifier():
                raise InvalidError(f"{file}:{n}: not KEY=VALUE: {line!r}")
            value = value.strip()
            if value[:1] in ("'", '"'):
                value = " ".join(shlex.split(value))
            elif " #" in value:
                value = value.split(" #", 1)[0].rstrip()
            env[key.strip()] = value
        return _Secret(env)

    async def hydrate(self, client=None) -> "_Secret":
        """Nothing to look up: a shoal secret lives in the client until a sandbox uses it.

        Raises InvalidError for a `client=` naming another server.

            secret = shoal.Secret.from_dict({"A": "1"}).hydrate()
        """
        from shoal.client import check_client

        check_client(client)
        return self

    @property
    def object_id(self) -> None:
        """None: a shoal secret is not stored on the server."""
        return None

    @property
    def client(self):
        """The Client for the process's server."""
        from shoal.client import _Client

        return _Client()

    def _env_dict(self) -> dict[str, str]:
        return dict(self._env)

    def __repr__(self) -> str:
        return f"Secret({sorted(self._env)})"


Secret = synchronize_api(_Secret)


def merge_env(env: dict[str, str] | None, secrets) -> dict[str, str]:
    merged: dict[str, str] = {}
    for s in secrets or ():
        if not isinstance(s, _Secret):
            raise InvalidError(f"secrets must be Secret objects, got {type(s).__name__}")
        merged.update(s._env_dict())
    if env:
        if not isinstance(env, dict):
            raise InvalidError("env must be a dict of str to str")
        for k, v in env.items():
            if not isinstance(k, str) or not isinstance(v, (str, type(None))):
                raise InvalidError(f"env values must be str; {k!r} is {type(v).__name__}")
        merged.update({k: v for k, v in env.items() if v is not None})
    return merged
