"""Errors raised by shoal. Names follow `modal.exception`, so `except modal.exception.NotFoundError`
keeps working after `import shoal as modal`.

The server reports an error as `{"error": {"type": NAME, "message": ...}}`; the SDK turns NAME back
into the class of the same name here (or the built-in OSError subclass of that name), so a caller
catches the same type whether the fault was found on its side or on the server's.
"""

from __future__ import annotations

import builtins


class Error(Exception):
    """Base class for every shoal error."""


class NotFoundError(Error):
    """The named object (sandbox, volume, app, file, image) does not exist."""


class InvalidError(Error):
    """An argument is wrong; the message names it and says what would be right."""


class AlreadyExistsError(Error):
    """An object with that name already exists."""


class ConflictError(InvalidError):
    """The object is in a state that does not allow the operation (e.g. deleting a mounted volume)."""


class ExecutionError(Error):
    """Something went wrong running a command or building an image."""


class RemoteError(Error):
    """The server failed in a way it could not attribute to the call."""


class InternalError(Error):
    """A bug in shoal: please report it with the server log (`$SHOAL_HOME/logs/server.log`)."""


class ConnectionError(Error):  # noqa: A001 - Modal's name
    """The SDK could not reach or start the shoal server."""


class AuthError(Error):
    """The server refused the token (TCP mode)."""


class TimeoutError(Error):  # noqa: A001 - Modal's name
    """Base class for the timeouts below."""


class SandboxTimeoutError(TimeoutError):
    """The sandbox reached its `timeout` and was stopped."""


class SandboxTerminatedError(Error):
    """The sandbox was terminated (or finished) while the operation needed it running."""


class ExecTimeoutError(TimeoutError):
    """The exec'd command reached its `timeout`."""


class VolumeUploadTimeoutError(TimeoutError):
    """An upload to a volume did not finish in time."""


class FilesystemExecutionError(Error):
    """A sandbox file operation failed."""


class SandboxFilesystemError(Error):
    """Base class for `Sandbox.filesystem` errors."""


class SandboxFilesystemNotFoundError(SandboxFilesystemError):
    """No file or directory at that path in the sandbox."""


class SandboxFilesystemIsADirectoryError(SandboxFilesystemError):
    """The path is a directory where a file was expected."""


class SandboxFilesystemNotADirectoryError(SandboxFilesystemError):
    """A component of the path is not a directory."""


class SandboxFilesystemPermissionError(SandboxFilesystemError):
    """The operation is not permitted (read-only file system, not a regular file, ...)."""


class SandboxFilesystemDirectoryNotEmptyError(SandboxFilesystemError):
    """The directory is not empty; pass recursive=True to remove it."""


class SandboxFilesystemPathAlreadyExistsError(SandboxFilesystemError):
    """The path exists and the operation needs it absent."""


class SandboxFilesystemFileTooLargeError(SandboxFilesystemError):
    """The file is larger than a whole-file read allows; stream it with copy_to_local."""


class DeprecationError(UserWarning):
    """Kept for Modal compatibility."""


# --- The rest of Modal's exception classes, with Modal's hierarchy. shoal raises those that have
# a meaning here (PermissionDeniedError, ResourceExhaustedError, RequestSizeError, ImageBuildError,
# ClientClosed, SerializationError, DeserializationError); the others exist so that `except` clauses
# written for Modal keep working.


class PermissionDeniedError(Error):
    """The server does not allow this call (e.g. a read-only volume or a refused token)."""


class ResourceExhaustedError(Error):
    """A limit was reached (e.g. a Queue or Dict is full, a value is too large to store)."""


class RequestSizeError(Error):
    """The request is larger than the server accepts."""


class UnimplementedError(Error):
    """The server does not implement this call."""


class ServiceError(Error):
    """The server could not complete the call (transient); try again."""


class DataLossError(Error):
    """Stored data was lost or corrupted."""


class ImageBuildError(RemoteError):
    """An image build failed (Modal's name; shoal raises ExecutionError for a failed step)."""


class ClientClosed(Error):
    """The Client was closed and cannot make calls."""


class SerializationError(Error):
    """A value could not be pickled (for a Dict or Queue)."""


class DeserializationError(Error):
    """A stored value could not be unpickled here (a class missing on this side?)."""


class VersionError(Error):
    """The client and the server speak incompatible versions."""


class InternalFailure(Error):
    """A retryable internal failure."""


class LogsFetchError(Error):
    """The logs could not be fetched."""


class SnapshotCreationError(Error):
    """A snapshot could not be made."""


class WorkspaceManagementError(Error):
    """Modal workspace management; never raised by shoal (it has no workspaces)."""


class FunctionTimeoutError(TimeoutError):
    """Modal Functions' timeout; never raised by shoal (it has no Functions)."""


class MountUploadTimeoutError(TimeoutError):
    """An upload of local files did not finish in time."""


class InteractiveTimeoutError(TimeoutError):
    """An interactive session did not start in time."""


class OutputExpiredError(TimeoutError):
    """The output of a call is no longer available."""


class ModuleNotMountable(Exception):
    """A local module cannot be added to an image (Modal's name)."""


class InputCancellation(BaseException):
    """Modal Functions' input cancellation; never raised by shoal."""


class AsyncUsageWarning(UserWarning):
    """A blocking call was made from async code; use the `.aio` variant."""


class InternalAPIWarning(UserWarning):
    """An internal API was used."""


class ServerWarning(UserWarning):
    """A warning sent by the server."""


def _all_error_types() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for name, obj in globals().items():
        if isinstance(obj, type) and issubclass(obj, Error):
            found[name] = obj
    # Modal raises these built-ins for file operations; they cross the wire by name too.
    for builtin in (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
                    PermissionError, ValueError, TypeError):
        found.setdefault(builtin.__name__, builtin)
    return found


def from_wire(type_name: str, message: str, errno: int | None = None) -> BaseException:
    """Rebuild the exception the server described; unknown names become RemoteError."""
    cls = _all_error_types().get(type_name)
    if cls is None:
        err = RemoteError(f"{type_name}: {message}")
    elif errno is not None and issubclass(cls, OSError):
        err = cls(errno, message)  # str() reads "[Errno 2] ...", as the built-in's would
    else:
        err = cls(message)
    err._shoal_typed = True  # a user-facing error: shown without the SDK's internal frames
    return err


def is_typed(err: BaseException) -> bool:
    return isinstance(err, Error) or getattr(err, "_shoal_typed", False)


__all__ = [n for n, o in dict(globals()).items()
           if isinstance(o, type) and issubclass(o, BaseException) and not n.startswith("_")
           and o.__module__ == __name__]
del builtins
