"""Test helpers for registry pulls: a real Docker distribution registry (Debian's
`docker-registry`) on 127.0.0.1, a small pusher speaking its HTTP API, and in-memory layer tars.

Nothing here touches the network beyond 127.0.0.1.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REGISTRY_BIN = "/usr/bin/docker-registry"
BUSYBOX = "/bin/busybox"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MEDIA = {
    "oci": (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER, OCI_INDEX),
    "docker": (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER, DOCKER_LIST),
}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- layer tars ------------------------------------------------------------------------------

def _info(name: str, type_: bytes, mode: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.mode = mode
    ti.mtime = 1_700_000_000
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    return ti


class Tar:
    """An uncompressed layer tar built in memory, member by member, in the order given (so a
    test can put hostile members exactly where it wants them)."""

    def __init__(self):
        self._buf = io.BytesIO()
        # GNU format: member names are written as given (no normalisation of "../" or "/").
        self._tar = tarfile.open(fileobj=self._buf, mode="w", format=tarfile.GNU_FORMAT)

    def dir(self, name: str, mode: int = 0o755) -> "Tar":
        self._tar.addfile(_info(name, tarfile.DIRTYPE, mode))
        return self

    def file(self, name: str, data: bytes | str, mode: int = 0o644) -> "Tar":
        if isinstance(data, str):
            data = data.encode()
        ti = _info(name, tarfile.REGTYPE, mode)
        ti.size = len(data)
        self._tar.addfile(ti, io.BytesIO(data))
        return self

    def symlink(self, name: str, target: str) -> "Tar":
        ti = _info(name, tarfile.SYMTYPE, 0o777)
        ti.linkname = target
        self._tar.addfile(ti)
        return self

    def hardlink(self, name: str, target: str) -> "Tar":
        ti = _info(name, tarfile.LNKTYPE, 0o644)
        ti.linkname = target
        self._tar.addfile(ti)
        return self

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o666) -> "Tar":
        ti = _info(name, tarfile.CHRTYPE, mode)
        ti.devmajor, ti.devminor = major, minor
        self._tar.addfile(ti)
        return self

    def bytes(self) -> bytes:
        self._tar.close()
        return self._buf.getvalue()


def gz(data: bytes) -> bytes:
    """Deterministic gzip (no timestamp), so equal tars give equal blobs."""
    return gzip.compress(data, compresslevel=6, mtime=0)


# --- the registry ----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def htpasswd_line(user: str, password: str) -> str:
    import bcrypt

    return f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()}\n"


class Registry:
    """One `docker-registry serve` on 127.0.0.1:<free port>, storage and log in `workdir`."""

    def __init__(self, workdir: Path, users: dict[str, str] | None = None):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.storage = self.dir / "data"
        self.log_path = self.dir / "registry.log"
        self.users = users
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self) -> "Registry":
        lines = ["version: 0.1",
                 "log:", "  level: info", "  accesslog:", "    disabled: false",
                 "storage:", "  filesystem:", f"    rootdirectory: {self.storage}",
                 "  delete:", "    enabled: true",
                 "http:", "  addr: 127.0.0.1:{port}", "  secret: shoal-tests"]
        if self.users is not None:
            pw = self.dir / "htpasswd"
            pw.write_text("".join(htpasswd_line(u, p) for u, p in self.users.items()))
            lines += ["auth:", "  htpasswd:", "    realm: shoal-test-realm", f"    path: {pw}"]
        for _ in range(5):  # the port may be taken between free_port() and the bind
            self.port = free_port()
            cfg = self.dir / "config.yml"
            cfg.write_text("\n".join(lines).replace("{port}", str(self.port)) + "\n")
            log = open(self.log_path, "ab")
            self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(cfg)], stdout=log,
                                         stderr=log, stdin=subprocess.DEVNULL)
            log.close()
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    if httpx.get(f"{self.url}/v2/", timeout=1).status_code in (200, 401):
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
            self.stop()
        raise RuntimeError(f"docker-registry did not start:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def blob_gets(self, digest: str) -> int:
        """How many GETs of blob `digest` the access log shows (answered 200)."""
        n = 0
        for line in self.log().splitlines():
            if "response completed" in line and f"/blobs/{digest}" in line \
                    and "http.request.method=GET" in line and "http.response.status=200" in line:
                n += 1
        return n

    def blob_data(self, digest: str) -> Path:
        hexd = digest.removeprefix("sha256:")
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


# --- pushing ---------------------------------------------------------------------------------

@dataclass
class Pushed:
    """What was pushed for one image manifest."""
    ref: str                 # host:port/repo:tag (or @digest)
    manifest_digest: str
    manifest_size: int
    layer_digests: list[str] = field(default_factory=list)  # of the gzipped blobs
    diff_ids: list[str] = field(default_factory=list)


class Pusher:
    def __init__(self, registry: Registry, auth: tuple[str, str] | None = None):
        self.registry = registry
        self.http = httpx.Client(base_url=registry.url, timeout=30, auth=auth)

    def close(self) -> None:
        self.http.close()

    def blob(self, repo: str, data: bytes) -> str:
        digest = sha256(data)
        if self.http.head(f"/v2/{repo}/blobs/{digest}").status_code == 200:
            return digest
        r = self.http.post(f"/v2/{repo}/blobs/uploads/")
        assert r.status_code == 202, (r.status_code, r.text)
        loc = r.headers["location"]
        sep = "&" if "?" in loc else "?"
        r = self.http.put(f"{loc}{sep}digest={digest}", content=data,
                          headers={"content-type": "application/octet-stream"})
        assert r.status_code == 201, (r.status_code, r.text)
        return digest

    def manifest(self, repo: str, reference: str, doc: dict, media_type: str) -> tuple[str, int]:
        body = json.dumps(doc, separators=(",", ":")).encode()
        r = self.http.put(f"/v2/{repo}/manifests/{reference}", content=body,
                          headers={"content-type": media_type})
        assert r.status_code == 201, (r.status_code, r.text)
        return sha256(body), len(body)

    def image(self, repo: str, tag: str | None, layers: list[bytes], *, media: str = "oci",
              arch: str = "amd64", env: list[str] | None = None,
              workdir: str | None = None) -> Pushed:
        """Push an image of uncompressed layer tars `layers` (gzipped here) as repo:tag; with
        tag None, by its digest only (for an index to refer to)."""
        cfg: dict = {"Env": env if env is not None else ["PATH=/bin:/usr/bin"]}
        if workdir:
            cfg["WorkingDir"] = workdir
        return self.raw_image(repo, tag, [gz(t) for t in layers], [sha256(t) for t in layers],
                              media=media, arch=arch, config=cfg)

    def raw_image(self, repo: str, tag: str | None, blobs: list[bytes],
                  diff_ids: list[str] | None = None, *, media: str = "oci",
                  arch: str = "amd64", config: dict | None = None) -> Pushed:
        """Push an image whose layer blobs are taken as given (gzipped tars, or anything else
        for a test of what a puller does with a bad layer)."""
        mtype, ctype, ltype, _ = MEDIA[media]
        diff_ids = diff_ids if diff_ids is not None else [sha256(b) for b in blobs]
        cfg_blob = json.dumps({"architecture": arch, "os": "linux", "config": config or {},
                               "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
        cdigest = self.blob(repo, cfg_blob)
        ldigests = [self.blob(repo, b) for b in blobs]
        doc = {"schemaVersion": 2, "mediaType": mtype,
               "config": {"mediaType": ctype, "digest": cdigest, "size": len(cfg_blob)},
               "layers": [{"mediaType": ltype, "digest": d, "size": len(b)}
                          for d, b in zip(ldigests, blobs)]}
        mdigest = sha256(json.dumps(doc, separators=(",", ":")).encode())
        _, size = self.manifest(repo, tag or mdigest, doc, mtype)
        ref = f"{self.registry.host}/{repo}:{tag}" if tag else \
            f"{self.registry.host}/{repo}@{mdigest}"
        return Pushed(ref, mdigest, size, ldigests, diff_ids)

    def index(self, repo: str, tag: str, entries: list[tuple[Pushed, str, str]], *,
              media: str = "oci") -> str:
        """Push an OCI index / Docker manifest list of (image, os, architecture) entries."""
        mtype, _, _, itype = MEDIA[media]
        doc = {"schemaVersion": 2, "mediaType": itype,
               "manifests": [{"mediaType": mtype, "digest": p.manifest_digest,
                              "size": p.manifest_size,
                              "platform": {"os": os_, "architecture": arch}}
                             for p, os_, arch in entries]}
        self.manifest(repo, tag, doc, itype)
        return f"{self.registry.host}/{repo}:{tag}"


# --- the shoal image store -------------------------------------------------------------------

def store_root() -> Path:
    return Path(os.environ["SHOAL_IMAGES"])


def oci_layer_dir(digest: str) -> Path:
    return store_root() / "oci" / digest.removeprefix("sha256:")[:32]


def store_blob(digest: str) -> Path:
    return store_root() / "blobs" / "sha256" / digest.removeprefix("sha256:")


def forget_layers(digests: set[str]) -> None:
    """Remove from the shared image store what this module's unique layers left: their `oci/`
    layers and blobs, the image manifests that use them, and the step layers only those images
    use (so repeated test runs do not grow the store)."""
    root = store_root()
    ours = {f"oci/{d.removeprefix('sha256:')[:32]}" for d in digests}
    doomed_manifests, keep, maybe = [], set(), set()
    for p in (root / "manifests").glob("im-*.json"):
        try:
            layers = json.loads(p.read_text())["layers"]
        except (OSError, ValueError, KeyError):
            continue
        if ours & set(layers):
            doomed_manifests.append(p)
            maybe.update(l for l in layers if l.startswith("layers/"))
        else:
            keep.update(layers)
    for p in doomed_manifests:
        p.unlink(missing_ok=True)
    for layer in ours | (maybe - keep):
        shutil.rmtree(root / layer, ignore_errors=True)
    for d in digests:
        store_blob(d).unlink(missing_ok=True)
        for partial in store_blob(d).parent.glob(f".{d.removeprefix('sha256:')}.*"):
            partial.unlink(missing_ok=True)
