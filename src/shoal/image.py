"""Images: the root filesystem a sandbox starts from (Modal's `modal.Image`)."""

from __future__ import annotations

from shoal._sync import synchronize_api
from shoal.exception import InvalidError


class _Image:
    """A recipe for a sandbox's root filesystem. Built by the server on first use and cached."""

    def __init__(self, spec: dict):
        self._spec = spec

    @staticmethod
    def debian_slim(python_version: str | None = None, force_build: bool = False) -> "_Image":
        """Debian bookworm with Python 3 (`python`, `pip`, `bash` work), built from Debian's
        packages. `python_version` may be one the distribution provides ("3.11"); the server says
        which when another is asked for."""
        if python_version is not None and not isinstance(python_version, str):
            raise InvalidError("python_version must be a str like '3.11'")
        return _Image({"kind": "debian_slim", "python_version": python_version})

    @staticmethod
    def from_id(image_id: str) -> "_Image":
        """An image by its id (e.g. one made by `Sandbox.snapshot_filesystem`)."""
        if not isinstance(image_id, str) or not image_id.startswith("im-"):
            raise InvalidError(f"invalid image id {image_id!r}")
        return _Image({"kind": "snapshot", "image_id": image_id})

    @property
    def object_id(self) -> str | None:
        return self._spec.get("image_id")

    def _wire(self) -> dict:
        return dict(self._spec)

    def __repr__(self) -> str:
        return f"Image({self._spec})"


Image = synchronize_api(_Image)
