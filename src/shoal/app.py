"""Apps group sandboxes (Modal's `modal.App`)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

from shoal._client import get_client
from shoal._sync import synchronize_api
from shoal.client import check_client
from shoal.exception import InvalidError


class _App:
    """A named group of sandboxes. `App.lookup(name, create_if_missing=True)` is how sandbox code
    gets one; `App(name)` makes a handle that is looked up (and created) on first use.

    `image`, `secrets` and `volumes` given here are the defaults of `Sandbox.create(app=app)`:
    the sandbox's own `image=` wins, its secrets are added after the app's (so they win), and its
    volumes are added to the app's (the sandbox's win on the same path).

        app = shoal.App("etl", image=shoal.Image.debian_slim().pip_install("pandas"))
        sb = shoal.Sandbox.create(app=app)
    """

    _constructible = True

    def __init__(self, name: str | None = None, *, tags: dict[str, str] | None = None,
                 image=None, secrets: Sequence = (), volumes: dict | None = None,
                 include_source: bool = True):
        if name is not None and not isinstance(name, str):
            raise InvalidError(f"App name must be a str, got {type(name).__name__}")
        from shoal.image import _Image
        from shoal.secret import _Secret
        from shoal.volume import _Volume

        if image is not None and not isinstance(image, _Image):
            raise InvalidError(f"App(image=...) must be a shoal.Image, got {type(image).__name__}")
        if not all(isinstance(s, _Secret) for s in secrets or ()):
            raise InvalidError("App(secrets=...) must be a list of shoal.Secret")
        if not isinstance(volumes or {}, dict) or not all(
                isinstance(v, _Volume) for v in (volumes or {}).values()):
            raise InvalidError("App(volumes=...) must be a dict of mount path to shoal.Volume")
        if tags:
            raise InvalidError("App(tags=...) is not supported by shoal: tag sandboxes with "
                               "Sandbox.create(tags=...) instead")
        self._name = name or "default"
        self._app_id: str | None = None
        self._image = image
        self._secrets = list(secrets or ())
        self._volumes = {str(k): v for k, v in (volumes or {}).items()}
        self._include_source = include_source  # Modal Functions' source mounting: no meaning here

    def _sandbox_defaults(self, image, secrets, volumes):
        """(image, secrets, volumes) of a Sandbox.create in this app, the app's defaults applied."""
        merged = {**self._volumes, **{str(k): v for k, v in (volumes or {}).items()}} \
            if isinstance(volumes or {}, dict) else volumes
        return (image if image is not None else self._image,
                [*self._secrets, *(secrets or ())], merged)

    @classmethod
    async def lookup(cls, name: str, *, client=None, environment_name: str | None = None,
                     create_if_missing: bool = False) -> "_App":
        """The app called `name`.

        Raises NotFoundError if it does not exist, unless `create_if_missing`; InvalidError for a
        `client=`/`environment_name=` naming another server.

            app = shoal.App.lookup("my-app", create_if_missing=True)
        """
        check_client(client, environment_name)
        app = cls(name)
        await app._resolve(create_if_missing)
        return app

    async def _resolve(self, create_if_missing: bool = True) -> str:
        if self._app_id is None:
            client = await get_client()
            r = await client.call("POST", "/apps/lookup",
                                  json={"name": self._name, "create_if_missing": create_if_missing})
            self._app_id = r["app_id"]
        return self._app_id

    @contextlib.asynccontextmanager
    async def run(self, *, name: str | None = None, client=None, detach: bool = False,
                  interactive: bool = False, environment_name: str | None = None
                  ) -> AsyncIterator["_App"]:
        """Use the app for the block; on leaving it, the app's running sandboxes are terminated
        (as Modal stops an app run), unless `detach=True`.

        Raises InvalidError for `interactive=True` or a `name=` other than the app's.

            with app.run():
                sb = shoal.Sandbox.create(app=app)
        """
        check_client(client, environment_name)
        if interactive:
            raise InvalidError("App.run(interactive=True) is not supported by shoal")
        if name is not None and name != self._name:
            raise InvalidError(f"App.run(name={name!r}) differs from the app's name "
                               f"{self._name!r}: name the app with App({name!r})")
        await self._resolve(create_if_missing=True)
        try:
            yield self
        finally:
            if not detach:
                await self.stop()

    async def deploy(self, *, name: str | None = None, environment_name: str | None = None,
                     tag: str = "", client=None, strategy: str = "rolling") -> "_App":
        """Make sure the app exists on the server (shoal's apps are always persistent, so this
        is all a deployment means here); returns the app.

        Raises InvalidError for `tag=` (shoal keeps no deployment history) or a `name=` other
        than the app's.

            app = shoal.App("jobs").deploy()
        """
        check_client(client, environment_name)
        if tag:
            raise InvalidError("App.deploy(tag=...) is not supported by shoal: it keeps no "
                               "deployment history")
        if name is not None and name != self._name:
            raise InvalidError(f"App.deploy(name={name!r}) differs from the app's name "
                               f"{self._name!r}")
        if strategy not in ("rolling", "recreate"):
            raise InvalidError(f"strategy must be 'rolling' or 'recreate', got {strategy!r}")
        await self._resolve(create_if_missing=True)
        return self

    async def stop(self, *, client=None) -> None:
        """Terminate every running sandbox of the app.

        Raises InvalidError for a `client=` naming another server.

            shoal.App.lookup("my-app").stop()
        """
        check_client(client)
        app_id = await self._resolve(create_if_missing=True)
        c = await get_client()
        for r in await c.call("GET", "/sandboxes", params={"app_id": app_id}):
            await c.call("POST", f"/sandboxes/{r['sandbox_id']}/terminate")

    @property
    def name(self) -> str | None:
        """The app's name."""
        return self._name

    @property
    def description(self) -> str:
        """The app's name (Modal falls back to a descriptive identifier; shoal apps always have
        a name)."""
        return self._name

    @property
    def app_id(self) -> str | None:
        """The app's id once it was looked up, else None."""
        return self._app_id

    def __repr__(self) -> str:
        return f"App({self._name!r})"


App = synchronize_api(_App)
