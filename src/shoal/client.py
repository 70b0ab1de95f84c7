"""`shoal.Client` (Modal's `modal.Client`): which shoal server the SDK talks to.

Modal's calls take `client=` and `environment_name=` to pick a cloud account and an environment.
In shoal they mean "which server": the SDK talks to one server per process, the one named by
`SHOAL_SERVER` (default: the local socket, started on demand) with `SHOAL_TOKEN`. So

    client = shoal.Client.from_env()
    sb = shoal.Sandbox.create(app=app, client=client)

works, and a `client=` naming another server than the process's, or an `environment_name=` other
than the server's (`SHOAL_ENVIRONMENT`, default "main"), is refused with an InvalidError instead of
quietly using the default server.
"""

from __future__ import annotations

import os

from shoal._client import get_client
from shoal._sync import synchronize_api
from shoal.exception import ClientClosed, InvalidError


def _default_server() -> str:
    from shoal import config

    server = os.environ.get("SHOAL_SERVER") or str(config.paths().socket)
    return server.removeprefix("unix:")


def environment() -> str:
    return os.environ.get("SHOAL_ENVIRONMENT", "main")


class _Client:
    """A handle naming a shoal server and its token."""

    _constructible = True

    def __init__(self, server_url: str | None = None, token: str | None = None):
        self._server_url = (server_url or _default_server()).removeprefix("unix:")
        self._token = token if token is not None else os.environ.get("SHOAL_TOKEN")
        self._closed = False

    @classmethod
    async def from_env(cls, _override_config=None) -> "_Client":
        """The server named by SHOAL_SERVER (default: the local socket) with SHOAL_TOKEN; checks
        that it answers (starting a local server if none runs).

        Raises ConnectionError if no server answers, AuthError if it refuses the token.

            client = shoal.Client.from_env()
        """
        if _override_config is not None:
            raise InvalidError("Client.from_env(_override_config=...) is not supported by shoal: "
                               "set SHOAL_SERVER and SHOAL_TOKEN")
        client = cls()
        await client.hello()
        return client

    @classmethod
    async def from_credentials(cls, token_id: str, token_secret: str) -> "_Client":
        """The server named by SHOAL_SERVER, with `token_secret` as its bearer token (`token_id`
        is not used by shoal, which has one token per server).

        Raises InvalidError if `token_secret` is not the token of the process's server.

            client = shoal.Client.from_credentials("id", os.environ["SHOAL_TOKEN"])
        """
        client = cls(token=token_secret)
        check_client(client)
        return client

    async def hello(self) -> None:
        """Check that the server answers.

        Raises ClientClosed after `close()`, ConnectionError if the server does not answer.

            shoal.Client.from_env().hello()
        """
        if self._closed:
            raise ClientClosed("this Client was closed")
        check_client(self)
        c = await get_client()
        await c.call("GET", "/health")

    async def close(self) -> None:
        """Mark this handle closed; later calls through it raise ClientClosed. The SDK's
        connection to the server stays open for other handles.

            client.close()
        """
        self._closed = True

    def is_closed(self) -> bool:
        """Whether `close()` was called.

        assert not client.is_closed()

        Raises nothing.

            client.close(); assert client.is_closed()
        """
        return self._closed

    @property
    def server_url(self) -> str:
        return self._server_url

    def __repr__(self) -> str:
        return f"Client({self._server_url})"


def check_client(client, environment_name: str | None = None) -> None:
    """Refuse a `client=` or `environment_name=` that names another server than the process's."""
    if client is not None:
        impl = getattr(client, "_impl", client)
        if not isinstance(impl, _Client):
            raise InvalidError(f"client must be a shoal.Client, got {type(client).__name__}")
        if impl._closed:
            raise ClientClosed("this Client was closed")
        if impl._server_url != _default_server() or \
                (impl._token or None) != (os.environ.get("SHOAL_TOKEN") or None):
            raise InvalidError(
                f"client= names the server {impl._server_url!r}, but this process talks to "
                f"{_default_server()!r}: shoal uses one server per process; set SHOAL_SERVER "
                "and SHOAL_TOKEN instead")
    if environment_name not in (None, "", environment()):
        raise InvalidError(f"environment_name={environment_name!r}: this shoal server is the "
                           f"environment {environment()!r} (set SHOAL_ENVIRONMENT to rename it); "
                           "use a different SHOAL_SERVER for another environment")


Client = synchronize_api(_Client)
