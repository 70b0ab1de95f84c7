"""shoal: self-hosted sandboxes for untrusted code, with a Modal-compatible SDK.

    import shoal as modal

    app = modal.App.lookup("my-app", create_if_missing=True)
    sb = modal.Sandbox.create(app=app)
    print(sb.exec("python", "-c", "print(6 * 7)").stdout.read())
    sb.terminate()

The SDK is this package's top-level modules; it talks to the server (`shoal serve`) over HTTP and
starts one if none runs. The server's parts live in the subpackages server/, runtime/, storage/,
images/ and cli/, which the SDK never imports.
"""

from shoal import exception
from shoal.app import App
from shoal.client import Client
from shoal.container_process import ContainerProcess
from shoal.dict import Dict
from shoal.queue import Queue
from shoal.image import Image
from shoal.io_streams import StreamReader, StreamWriter
from shoal.network_file_system import NetworkFileSystem
from shoal.output import enable_output
from shoal.file_io import FileIO
from shoal.sandbox import Probe, Sandbox
from shoal.sandbox_fs import FileInfo, FileType, SandboxFilesystem
from shoal.secret import Secret
from shoal.snapshot import SandboxSnapshot
from shoal.stream_type import StreamType
from shoal._tunnel import Tunnel
from shoal.volume import FileEntry, FileEntryType, Volume
from shoal.cloud_bucket_mount import CloudBucketMount  # issue 12

__version__ = "0.1.0"

__all__ = [
    "App", "Client", "Dict", "Queue", "ContainerProcess", "FileEntry", "FileEntryType", "FileIO",
    "FileInfo", "FileType", "Image", "NetworkFileSystem", "Probe", "Sandbox", "SandboxFilesystem",
    "SandboxSnapshot", "Secret", "StreamReader", "StreamType", "StreamWriter", "Tunnel", "Volume",
    "enable_output",
    "exception",
    "CloudBucketMount",
]
