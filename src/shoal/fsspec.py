"""Volumes as an fsspec filesystem: `shoal://VOLUME/path`.

Registered through the `fsspec.specs` entry point, so any fsspec-aware tool reads and writes
volumes directly:

    import pandas as pd
    df = pd.read_csv("shoal://my-data/train.csv")
    df.to_parquet("shoal://my-data/train.parquet")
    fs = fsspec.filesystem("shoal"); fs.ls("my-data/"); fs.put("local.bin", "my-data/x.bin")

Built on the volume HTTP API only (the SDK never imports the server). Guarantees:
- a file written through `open(..., "wb")` or `put` is spooled to a local temporary file (disk,
  not memory) and lands on close through `batch_upload(force=True)`: readers and sandboxes see the
  old file or the whole new one, never a part;
- a file opened for reading is streamed from the server into a local temporary file on its first
  read (bounded memory; random access for pyarrow/parquet then works locally);
- directories exist as long as they hold something: `mkdir` of a directory in an existing volume
  does nothing (as on object stores), `mkdir("VOLUME")` creates the volume.
fsspec is optional: install it (`pip install fsspec`) to use this module.
"""

from __future__ import annotations

import shutil
import tempfile

from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from shoal.exception import NotFoundError
from shoal.volume import FileEntryType, Volume

SPOOL_DIR = None  # tempfile's default directory


def _split(path: str) -> tuple[str, str]:
    path = path.strip("/")
    vol, _, rel = path.partition("/")
    return vol, rel


class ShoalFileSystem(AbstractFileSystem):
    """fsspec filesystem over shoal volumes: the first path component names the volume."""

    protocol = ("shoal",)
    root_marker = ""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._volumes: dict[str, Volume] = {}

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = str(path)
        if path.startswith("shoal://"):
            path = path[len("shoal://"):]
        return path.rstrip("/") if path not in ("", "/") else ""

    def _vol(self, name: str) -> Volume:
        if not name:
            raise FileNotFoundError("a shoal path starts with a volume name: shoal://VOLUME/path")
        if name not in self._volumes:
            self._volumes[name] = Volume.from_name(name)
        return self._volumes[name]

    def _entry(self, vol: str, e) -> dict:
        return {"name": f"{vol}/{e.path}".rstrip("/"), "size": e.size,
                "type": "directory" if e.type == FileEntryType.DIRECTORY else "file",
                "mtime": e.mtime}

    # --- listing
    def ls(self, path, detail=True, **kwargs):
        path = self._strip_protocol(path)
        vol, rel = _split(path)
        if not vol:
            out = [{"name": v.name, "size": 0, "type": "directory"} for v in Volume.objects.list()]
        else:
            try:
                entries = self._vol(vol).listdir(rel or "/")
            except NotFoundError as e:
                raise FileNotFoundError(path) from e
            out = [self._entry(vol, e) for e in entries]
        return out if detail else [o["name"] for o in out]

    def info(self, path, **kwargs):
        path = self._strip_protocol(path)
        vol, rel = _split(path)
        if not vol or not rel:
            self.ls(path)  # FileNotFoundError for a missing volume
            return {"name": path, "size": 0, "type": "directory"}
        parent, _, base = rel.rpartition("/")
        try:
            entries = self._vol(vol).listdir(parent or "/")
        except (NotFoundError, NotADirectoryError) as e:
            raise FileNotFoundError(path) from e
        for e in entries:
            if e.path.rstrip("/") == rel:
                return self._entry(vol, e)
        raise FileNotFoundError(path)

    # --- changing
    def mkdir(self, path, create_parents=True, **kwargs):
        vol, rel = _split(self._strip_protocol(path))
        if not rel:
            Volume.objects.create(vol, allow_existing=True)
            return
        self.info(vol)  # the volume must exist; directories appear with their files

    def makedirs(self, path, exist_ok=False):
        self.mkdir(path)

    def rmdir(self, path):
        vol, rel = _split(self._strip_protocol(path))
        if rel:
            self._vol(vol).remove_file(rel)

    def rm_file(self, path):
        vol, rel = _split(self._strip_protocol(path))
        self._vol(vol).remove_file(rel)

    _rm = rm_file

    def rm(self, path, recursive=False, maxdepth=None):
        paths = path if isinstance(path, list) else [path]
        for p in paths:
            vol, rel = _split(self._strip_protocol(p))
            if not rel:
                raise PermissionError("removing a whole volume through fsspec is not allowed; "
                                      "use shoal.Volume.objects.delete")
            self._vol(vol).remove_file(rel, recursive=recursive)
        self.invalidate_cache()

    def cp_file(self, path1, path2, **kwargs):
        v1, r1 = _split(self._strip_protocol(path1))
        v2, r2 = _split(self._strip_protocol(path2))
        if v1 != v2:
            with self.open(path1, "rb") as src, self.open(path2, "wb") as dst:
                shutil.copyfileobj(src, dst, 4 << 20)
            return
        self._vol(v1).copy_files([r1], r2)

    def put_file(self, lpath, rpath, callback=None, mode="overwrite", **kwargs):
        vol, rel = _split(self._strip_protocol(rpath))
        import os
        if os.path.isdir(lpath):
            return  # directories appear with their files
        with self._vol(vol).batch_upload(force=True) as batch:
            batch.put_file(lpath, rel)

    def get_file(self, rpath, lpath, callback=None, outfile=None, **kwargs):
        vol, rel = _split(self._strip_protocol(rpath))
        if self.isdir(rpath):
            import os
            os.makedirs(lpath, exist_ok=True)
            return
        with open(lpath, "wb") as f:
            self._vol(vol).read_file_into_fileobj(rel, f)

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None,
              **kwargs):
        return ShoalFile(self, self._strip_protocol(path), mode, block_size or 4 << 20,
                         autocommit, cache_options=cache_options, **kwargs)


class ShoalFile(AbstractBufferedFile):
    """A volume file: reads from a local copy streamed on first use; writes spool to a local
    temporary file and land whole on close."""

    def __init__(self, fs, path, mode="rb", block_size=4 << 20, autocommit=True, **kwargs):
        self._spool = None
        super().__init__(fs, path, mode, block_size, autocommit,
                         cache_type="none" if "r" in mode else "readahead", **kwargs)

    # --- reading
    def _fetch_range(self, start, end):
        if self._spool is None:
            vol, rel = _split(self.path)
            self._spool = tempfile.TemporaryFile(dir=SPOOL_DIR)
            self.fs._vol(vol).read_file_into_fileobj(rel, self._spool)
        self._spool.seek(start)
        return self._spool.read(end - start)

    # --- writing
    def _initiate_upload(self):
        self._spool = tempfile.TemporaryFile(dir=SPOOL_DIR)

    def _upload_chunk(self, final=False):
        self.buffer.seek(0)
        shutil.copyfileobj(self.buffer, self._spool, 4 << 20)
        if final:
            self._spool.seek(0)
            vol, rel = _split(self.path)
            with self.fs._vol(vol).batch_upload(force=True) as batch:
                batch.put_file(self._spool, rel)
        return True

    def discard(self):
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    def close(self):
        try:
            super().close()
        finally:
            if self._spool is not None:
                self._spool.close()
                self._spool = None
