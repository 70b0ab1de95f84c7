"""Apps group sandboxes (Modal's `modal.App`)."""

from __future__ import annotations

from shoal._client import get_client
from shoal._sync import synchronize_api
from shoal.exception import InvalidError


class _App:
    """A named group of sandboxes. `App.lookup(name, create_if_missing=True)` is how sandbox code
    gets one; `App(name)` makes a handle that is looked up (and created) on first use."""

    _constructible = True

    def __init__(self, name: str | None = None, **_ignored):
        if name is not None and not isinstance(name, str):
            raise InvalidError(f"App name must be a str, got {type(name).__name__}")
        self._name = name or "default"
        self._app_id: str | None = None

    @classmethod
    async def lookup(cls, name: str, *, create_if_missing: bool = False,
                     environment_name: str | None = None) -> "_App":
        """The app called `name`. Raises NotFoundError if it does not exist, unless
        `create_if_missing`.

            app = shoal.App.lookup("my-app", create_if_missing=True)
        """
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

    @property
    def name(self) -> str:
        return self._name

    @property
    def app_id(self) -> str | None:
        return self._app_id

    def __repr__(self) -> str:
        return f"App({self._name!r})"


App = synchronize_api(_App)
