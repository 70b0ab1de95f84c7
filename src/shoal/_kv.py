"""What Dict and Queue share: lookup by name or id, ephemeral objects with a heart-beaten lease,
and pickling (plain `pickle`: values must be picklable here and unpicklable where they are read)."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import pickle
from collections.abc import AsyncIterator

from shoal._client import checked_id, get_client
from shoal._named import NamedObject
from shoal.client import check_client
from shoal.exception import DeserializationError, InvalidError, SerializationError


def dumps(value) -> str:
    try:
        return base64.b64encode(pickle.dumps(value, protocol=4)).decode()
    except Exception as e:  # pickle raises many types
        raise SerializationError(f"cannot pickle {type(value).__name__}: {e}") from None


def loads(data: str):
    try:
        return pickle.loads(base64.b64decode(data))
    except Exception as e:
        raise DeserializationError(f"cannot unpickle a stored value here: {e}") from None


@dataclasses.dataclass(frozen=True)
class KvInfo:
    name: str | None
    created_at: datetime.datetime
    created_by: str | None = None


class _KvObject(NamedObject):
    _kind = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._prefix = f"/{cls._kind}s"

    @classmethod
    def _from_name(cls, name, environment_name, create_if_missing, client):
        check_client(client, environment_name)
        if not isinstance(name, str) or not name:
            raise InvalidError(f"{cls._kind} name must be a non-empty str")
        return cls(name=name, create_if_missing=create_if_missing)

    @classmethod
    def _from_id(cls, object_id, client):
        check_client(client)
        if not isinstance(object_id, str) or not object_id:
            raise InvalidError(f"{cls._kind} id must be a non-empty str")
        return cls(object_id=checked_id(object_id, cls._kind))

    @classmethod
    @contextlib.asynccontextmanager
    async def _ephemeral(cls, client, environment_name, heartbeat_sleep) -> AsyncIterator:
        check_client(client, environment_name)
        if heartbeat_sleep is not None:
            raise InvalidError("_heartbeat_sleep is not supported: SHOAL_LEASE_TTL sets it")
        async with cls._leased() as obj:
            yield obj

    async def hydrate(self, client=None):
        """Look the object up now (otherwise it is looked up on first use); returns it.

        Raises NotFoundError if it does not exist (and was not to be created).

            d = shoal.Dict.from_name("jobs", create_if_missing=True).hydrate()
        """
        check_client(client)
        await self._id()
        return self

    async def info(self) -> KvInfo:
        """Name and creation time.

        Raises NotFoundError if the object does not exist.

            print(q.info().created_at)
        """
        r = await self._call("GET", "")
        return KvInfo(r["name"], datetime.datetime.fromtimestamp(r["created_at"],
                                                                 datetime.timezone.utc))

    @property
    def object_id(self) -> str | None:
        """The object's id once looked up, else None."""
        return self._object_id

    @property
    def name(self) -> str | None:
        """The object's name (None for an ephemeral one)."""
        return self._name

    @property
    def client(self):
        """The Client for the server that stores the object."""
        from shoal.client import _Client

        return _Client()

    def __repr__(self) -> str:
        return f"{type(self).__name__.lstrip('_')}({self._name or self._object_id})"


class _KvManager:
    """`Dict.objects` / `Queue.objects`: create, list and delete named objects."""

    def __init__(self, cls=None):
        self._cls = cls

    async def create(self, name: str, *, allow_existing: bool = False,
                     environment_name: str | None = None, client=None) -> None:
        """Create a named object.

        Raises AlreadyExistsError if it exists, unless `allow_existing`.

            shoal.Dict.objects.create("jobs")
        """
        from shoal.exception import AlreadyExistsError, NotFoundError

        check_client(client, environment_name)
        c = await get_client()
        kind = self._cls._kind
        try:
            await c.call("POST", f"/{kind}s/lookup", json={"name": name})
            if not allow_existing:
                raise AlreadyExistsError(f"{kind} {name!r} already exists")
        except NotFoundError:
            await c.call("POST", f"/{kind}s/lookup", json={"name": name,
                                                          "create_if_missing": True})

    async def list(self, *, environment_name: str | None = None, client=None) -> list:
        """All named objects of this kind.

        Raises InvalidError for another server's client.

            names = [d.name for d in shoal.Dict.objects.list()]
        """
        check_client(client, environment_name)
        c = await get_client()
        return [self._cls(r["name"], object_id=r["id"])
                for r in await c.call("GET", f"/{self._cls._kind}s")]

    async def delete(self, name: str, *, allow_missing: bool = False,
                     environment_name: str | None = None, client=None) -> None:
        """Delete a named object and its contents.

        Raises NotFoundError if it does not exist, unless `allow_missing`.

            shoal.Queue.objects.delete("jobs")
        """
        check_client(client, environment_name)
        c = await get_client()
        await c.call("POST", f"/{self._cls._kind}s/delete",
                     json={"name": name, "allow_missing": allow_missing})
