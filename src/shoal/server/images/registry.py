"""Pulling images from an OCI / Docker registry over the distribution HTTP API.

Token auth (the `WWW-Authenticate: Bearer realm=...` dance) and basic auth; manifest lists and OCI
indexes resolved to linux/amd64; every blob's sha256 checked against its descriptor before it is
used; layers unpacked by images/unpack.py (whiteouts, no escapes, no devices, no setuid). Each
layer is stored once under `oci/<digest>` and shared by every image that has it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
from collections.abc import Callable

import httpx

from shoal.server.images.store import ImageConfig, ImageStore
from shoal.server.images.unpack import unpack

Log = Callable[[str], None]
MANIFEST_TYPES = ", ".join([
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])
INDEX_TYPES = {"application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json"}
LAYER_TYPES = {"application/vnd.oci.image.layer.v1.tar+gzip",
               "application/vnd.oci.image.layer.v1.tar",
               "application/vnd.docker.image.rootfs.diff.tar.gzip",
               "application/vnd.docker.image.rootfs.diff.tar"}
REF_RE = re.compile(r"^(?:(?P<host>[A-Za-z0-9.\-]+(?::\d+)?)/)?(?P<name>[a-z0-9._\-/]+?)"
                    r"(?::(?P<tag>[A-Za-z0-9_.\-]{1,128}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$")
INSECURE = {h.strip() for h in os.environ.get("SHOAL_INSECURE_REGISTRIES", "").split(",")
            if h.strip()}


class RegistryError(Exception):
    pass


def parse_ref(ref: str) -> tuple[str, str, str]:
    """(base URL, repository, tag or digest) of an image reference like
    `127.0.0.1:5000/team/app:1.2` or `python:3.11-slim` (Docker Hub)."""
    m = REF_RE.match(ref or "")
    if not m:
        raise RegistryError(f"invalid image reference {ref!r}")
    host, name = m.group("host"), m.group("name")
    if host and "." not in host and ":" not in host and host != "localhost":
        name, host = f"{host}/{name}", None  # "team/app": a Docker Hub namespace, not a host
    if host is None:
        host = "registry-1.docker.io"
        if "/" not in name:
            name = f"library/{name}"
    plain = host.split(":")[0] in ("localhost", "127.0.0.1", "::1") or host in INSECURE
    return f"{'http' if plain else 'https'}://{host}", name, \
        m.group("digest") or m.group("tag") or "latest"


def _sha256_ok(data: bytes, expected: str) -> bool:
    return "sha256:" + hashlib.sha256(data).hexdigest() == expected


class _Session:
    """One pull: an HTTP client that answers the registry's auth challenges."""

    def __init__(self, base: str, repo: str, username: str | None, password: str | None):
        verify = os.environ.get("SSL_CERT_FILE") or True
        self.http = httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(30, read=300),
                                      follow_redirects=True, verify=verify)
        self.repo = repo
        self.auth = (username, password) if username else None
        self.header: dict[str, str] = {}

    async def get(self, path: str, headers: dict | None = None, stream: bool = False):
        for attempt in range(2):
            req = self.http.build_request("GET", path, headers={**(headers or {}), **self.header})
            try:
                resp = await self.http.send(req, stream=stream)
            except httpx.HTTPError as e:
                raise RegistryError(f"cannot reach the registry {self.http.base_url}: {e}") \
                    from None
            if resp.status_code != 401 or attempt:
                return resp
            challenge = resp.headers.get("www-authenticate", "")
            await resp.aclose()
            await self._authenticate(challenge)
        return resp

    async def _authenticate(self, challenge: str) -> None:
        scheme, _, params = challenge.partition(" ")
        fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
        if scheme.lower() == "basic":
            if not self.auth:
                raise RegistryError("the registry needs credentials: pass "
                                    "secret=Secret.from_dict({'REGISTRY_USERNAME': ..., "
                                    "'REGISTRY_PASSWORD': ...})")
            token = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
            self.header = {"authorization": f"Basic {token}"}
            return
        if scheme.lower() != "bearer" or "realm" not in fields:
            raise RegistryError(f"unsupported registry authentication {challenge!r}")
        params = {"service": fields.get("service", "")}
        params["scope"] = fields.get("scope") or f"repository:{self.repo}:pull"
        try:
            r = await self.http.get(fields["realm"], params=params,
                                    auth=httpx.BasicAuth(*self.auth) if self.auth else None)
        except httpx.HTTPError as e:
            raise RegistryError(f"cannot reach the registry's token service: {e}") from None
        if r.status_code != 200:
            raise RegistryError(f"the registry's token service refused ({r.status_code}): "
                                "check the credentials")
        body = r.json()
        token = body.get("token") or body.get("access_token")
        if not token:
            raise RegistryError("the registry's token service returned no token")
        self.header = {"authorization": f"Bearer {token}"}

    async def close(self) -> None:
        await self.http.aclose()


class RegistryPuller:
    def __init__(self, store: ImageStore):
        self.store = store

    async def pull(self, ref: str, username: str | None, password: str | None,
                   log: Log) -> tuple[list[str], ImageConfig, str]:
        base, repo, reference = parse_ref(ref)
        s = _Session(base, repo, username, password)
        try:
            manifest, mdigest = await self._manifest(s, reference, log, ref)
            config = await self._blob_json(s, manifest["config"])
            layers = []
            for n, desc in enumerate(manifest.get("layers") or [], 1):
                layers.append(await self._layer(s, desc, f"{n}/{len(manifest['layers'])}", log))
        finally:
            await s.close()
        cfg = config.get("config") or {}
        env = dict(e.split("=", 1) for e in cfg.get("Env") or [] if "=" in e)
        log(f"pulled {ref} ({mdigest[:19]}, {len(layers)} layers)")
        return layers, ImageConfig(env=env, workdir=cfg.get("WorkingDir") or None), \
            f"registry:{mdigest}"

    async def _manifest(self, s: _Session, reference: str, log: Log, ref: str):
        path = f"/v2/{s.repo}/manifests/{reference}"
        resp = await s.get(path, {"accept": MANIFEST_TYPES})
        if resp.status_code == 404:
            raise RegistryError(f"{ref}: no such image or tag in the registry")
        if resp.status_code == 401:
            raise RegistryError(f"{ref}: the registry refused the credentials")
        if resp.status_code != 200:
            raise RegistryError(f"{ref}: the registry answered {resp.status_code}")
        data = resp.content
        mdigest = "sha256:" + hashlib.sha256(data).hexdigest()
        if reference.startswith("sha256:") and mdigest != reference:
            raise RegistryError(f"{ref}: manifest digest mismatch ({mdigest})")
        doc = json.loads(data)
        mtype = doc.get("mediaType") or resp.headers.get("content-type", "")
        if mtype in INDEX_TYPES or "manifests" in doc:
            for m in doc.get("manifests") or []:
                p = m.get("platform") or {}
                if p.get("os") == "linux" and p.get("architecture") == "amd64":
                    log(f"{ref}: using the linux/amd64 manifest")
                    return await self._manifest(s, m["digest"], log, ref)
            raise RegistryError(f"{ref}: the image has no linux/amd64 variant")
        if doc.get("schemaVersion") != 2 or "config" not in doc:
            raise RegistryError(f"{ref}: unsupported manifest (schema 1 or unknown type)")
        return doc, mdigest

    async def _blob_json(self, s: _Session, desc: dict) -> dict:
        resp = await s.get(f"/v2/{s.repo}/blobs/{desc['digest']}")
        if resp.status_code != 200:
            raise RegistryError(f"config blob {desc['digest'][:19]}: HTTP {resp.status_code}")
        if not _sha256_ok(resp.content, desc["digest"]):
            raise RegistryError(f"config blob {desc['digest'][:19]}: digest mismatch")
        return json.loads(resp.content)

    async def _layer(self, s: _Session, desc: dict, which: str, log: Log) -> str:
        digest_ = desc.get("digest", "")
        if not re.match(r"^sha256:[0-9a-f]{64}$", digest_):
            raise RegistryError(f"layer {which}: unsupported digest {digest_!r}")
        if desc.get("mediaType") not in LAYER_TYPES:
            raise RegistryError(f"layer {which}: unsupported media type {desc.get('mediaType')!r}"
                                " (zstd and foreign layers are not supported)")
        hexd = digest_[7:]
        layer_id = f"oci/{hexd[:32]}"
        if self.store.has_layer(layer_id):
            log(f"layer {which} {hexd[:12]}: cached")
            return layer_id
        handle = await asyncio.to_thread(self.store.acquire, f"oci-{hexd[:32]}")
        try:
            if self.store.has_layer(layer_id):
                return layer_id
            blob = await self._download(s, digest_, desc.get("size"), which, log)
            work = self.store.scratch("pull")
            try:
                (work / "rootfs").mkdir()
                with open(blob, "rb") as f:
                    counts = await asyncio.to_thread(unpack, f, str(work / "rootfs"))
                log(f"layer {which} {hexd[:12]}: {counts['files']} files, "
                    f"{counts['whiteouts']} whiteouts" +
                    (f", {counts['skipped_devices']} device nodes skipped"
                     if counts["skipped_devices"] else ""))
                self.store.commit_layer(layer_id, work / "rootfs", {"digest": digest_})
            finally:
                self.store.discard(work)
                blob.unlink(missing_ok=True)  # the unpacked layer is what is kept
        finally:
            self.store.release(handle)
        return layer_id

    async def _download(self, s: _Session, digest_: str, size, which: str, log: Log):
        final = self.store.root / "blobs" / "sha256" / digest_[7:]
        if final.exists():
            return final
        resp = await s.get(f"/v2/{s.repo}/blobs/{digest_}", stream=True)
        try:
            if resp.status_code != 200:
                raise RegistryError(f"layer {which}: HTTP {resp.status_code}")
            h, n = hashlib.sha256(), 0
            with self.store.staged_file(final) as f:  # visible only whole and checked
                async for chunk in resp.aiter_bytes(1 << 20):
                    h.update(chunk)
                    f.write(chunk)
                    n += len(chunk)
                if "sha256:" + h.hexdigest() != digest_:
                    raise RegistryError(f"layer {which}: digest mismatch (got sha256:"
                                        f"{h.hexdigest()[:12]}..., expected {digest_[:19]}...): "
                                        "the blob is corrupt; nothing was kept")
            log(f"layer {which} {digest_[7:19]}: downloaded {n / 1e6:.1f} MB")
            return final
        finally:
            await resp.aclose()
