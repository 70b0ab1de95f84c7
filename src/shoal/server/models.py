"""The wire contract: request and response bodies of the HTTP API. The OpenAPI document is generated
from these (and checked into docs/openapi.json by a test, so it cannot drift unnoticed)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from shoal.server.names import NAME_PATTERN

# --- constraints the server enforces, published in the schema (issue 9) so a client generated
# from docs/openapi.json cannot send what the server refuses.
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=NAME_PATTERN,
                            description="1-64 of [A-Za-z0-9._-], not '.' or '..'")]
NoNul = Annotated[str, Field(pattern=r"^[^\x00]*$")]
EnvKey = Annotated[str, Field(min_length=1, pattern=r"^[^=\x00]+$")]
Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0, le=24 * 3600)]
# --- end constraints


class AppLookup(BaseModel):
    name: Name
    create_if_missing: bool = False


class AppInfo(BaseModel):
    app_id: str
    name: str
    created_at: float


class ImageBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["debian_slim", "registry", "image"] = "debian_slim"
    python_version: str | None = None
    tag: str | None = Field(None, description="registry: an image reference")
    username: str | None = None
    password: str | None = None
    image_id: str | None = Field(None, description="image: build on an existing image")
    secret_id: str | None = Field(None, description="registry: a named secret with "
                                  "REGISTRY_USERNAME / REGISTRY_PASSWORD")


class ImageStep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    op: Literal["apt_install", "pip_install", "uv_pip_install", "run_commands", "add_local",
                "copy_from", "env", "workdir", "entrypoint", "user"]
    packages: list[str] | None = None
    index_url: str | None = None
    extra_index_url: str | None = None
    pre: bool | None = None
    commands: list[str] | None = None
    secret_env: dict[str, str] | None = None
    secret_ids: list[str] | None = Field(None, description="named secrets; secret_env wins")
    env: dict[str, str] | None = None
    path: str | None = None
    blob: str | None = Field(None, description="add_local: sha256 of the uploaded tar")
    args: list[str] | None = None
    user: str | None = None
    # pip_install / uv_pip_install (Modal's parameters of the same names)
    find_links: str | None = None
    extra_options: list[str] | None = Field(None, description="extra pip/uv arguments")
    requirements: list[str] | None = Field(None, description="contents of requirements files")
    uv_version: str | None = None
    nonce: str | None = Field(None, description="force_build: a new value rebuilds the step")
    # copy_from (a Dockerfile's COPY --from): files of another image of this server
    image_id: str | None = Field(None, description="copy_from: the image to copy from")
    srcs: list[str] | None = Field(None, description="copy_from: paths in that image")
    dest: str | None = Field(None, description="copy_from: absolute destination")
    chown: str | None = Field(None, description="copy_from: USER[:GROUP] of the copies")


class ImageRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: ImageBase = Field(default_factory=ImageBase)
    steps: list[ImageStep] = Field(default_factory=list)


class BlobList(BaseModel):
    digests: list[str]


class MountSpec(BaseModel):
    path: str = Field(description="absolute path inside the sandbox")
    volume_id: str
    read_only: bool = False


class Resources(BaseModel):
    """Modal's semantics: `cpu`/`memory` are requests a sandbox may burst past; `cpu_limit` /
    `memory_limit` (Modal's `(request, limit)` tuples) are hard caps, only when asked."""
    cpu: float | None = Field(None, ge=0.01, description="cores requested: a proportional CPU "
                              "share, not a cap (at most the machine's cores)")
    memory: int | None = Field(None, ge=16, description="MiB requested: a soft reservation, not "
                               "a cap")
    cpu_limit: float | None = Field(None, ge=0.01, description="cores; a hard quota (at most "
                                    "the machine's cores)")
    memory_limit: int | None = Field(None, ge=16, description="MiB; a process over it is "
                                     "OOM-killed. None: the host-protecting default "
                                     "(SHOAL_SANDBOX_MEMORY_MAX, 3/4 of RAM)")
    pids: int | None = Field(None, ge=8)
    ephemeral_disk: int | None = Field(
        None, description="MiB for the writable root and /tmp; writing past it is ENOSPC. "
                          "None: the server's default (SHOAL_EPHEMERAL_DISK, 10 GiB)")


class ProbeSpec(BaseModel):
    exec_args: list[NoNul] | None = Field(None, min_length=1,
                                          description="ready when this exits 0")
    tcp_port: Port | None = Field(None, description="ready when this port accepts connections")
    interval_ms: int = Field(100, ge=10, le=60_000)


# --- secrets and bucket mounts (issue 12)
class SecretCreate(BaseModel):
    name: Name
    env: dict[str, str]
    force: bool = Field(False, description="replace the values of an existing secret")


class SecretLookup(BaseModel):
    name: Name
    required_keys: list[str] = Field(default_factory=list)


class SecretInfo(BaseModel):
    secret_id: str
    name: str
    created_at: float
    updated_at: float
    keys: list[str] = Field(description="names of the variables; values are never returned")


class BucketMountSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="absolute path inside the sandbox")
    bucket_name: str
    bucket_endpoint_url: str | None = None
    key_prefix: str | None = None
    read_only: bool = False
    requester_pays: bool = False
    force_path_style: bool = False
    secret_id: str | None = Field(None, description="a named secret with AWS_ACCESS_KEY_ID ...")
    secret_env: dict[str, str] | None = Field(None, description="inline credentials")
# --- end secrets and bucket mounts


class CreateSandbox(BaseModel):
    app_id: str
    args: list[NoNul] = Field(default_factory=list, description="entrypoint; empty = stay up")
    name: Name | None = None
    tags: dict[Name, str] = Field(default_factory=dict)
    image_id: str | None = Field(None, description="from POST /images; None: the default image")
    env: dict[EnvKey, NoNul] = Field(default_factory=dict)
    workdir: str | None = Field(None, pattern=r"^/[^\x00]*$")
    timeout: Seconds = 300
    idle_timeout: Seconds | None = None
    readiness_probe: ProbeSpec | None = None
    mounts: list[MountSpec] = Field(default_factory=list)
    resources: Resources = Field(default_factory=Resources)
    # Network (Modal's names; docs/network.md).
    block_network: bool = Field(False, description="only loopback (unless ports are exposed)")
    cidr_allowlist: list[str] | None = Field(
        None, description="outbound only to these IPv4 CIDRs (plus DNS); None: everywhere "
                          "public")
    outbound_domain_allowlist: list[str] | None = Field(None, description="not supported yet")
    encrypted_ports: list[Port] = Field(default_factory=list, description="TLS tunnels")
    unencrypted_ports: list[Port] = Field(default_factory=list,
                                          description="TLS and raw TCP tunnels")
    h2_ports: list[Port] = Field(default_factory=list, description="TLS tunnels offering h2")
    secret_ids: list[str] = Field(default_factory=list, description="named secrets, resolved "
                                  "by the server; `env` overrides them")
    bucket_mounts: list[BucketMountSpec] = Field(default_factory=list)
    # --- runtimes (issue 10): experimental_options={"runtime": ...} in the SDK
    runtime: str | None = Field(None, description="runc | gvisor; None: the server's default "
                                "(docs/gvisor.md)")
    pty_rows: int | None = Field(None, ge=1, le=1000, description="with pty_cols: run the "
                                 "entrypoint on a pseudo-terminal (stderr merged into stdout)")
    pty_cols: int | None = Field(None, ge=1, le=1000)


class SandboxInfo(BaseModel):
    sandbox_id: str
    app_id: str
    name: str | None
    tags: dict[str, str]
    state: str
    created_at: float
    returncode: int | None
    end_reason: str | None
    runtime: str = Field("runc", description="runc | gvisor (docs/gvisor.md)")


class TunnelModel(BaseModel):
    host: str
    port: int
    unencrypted_host: str | None = None
    unencrypted_port: int | None = None


class TunnelsInfo(BaseModel):
    tunnels: dict[int, TunnelModel] = Field(description="by sandbox port")


class TagsBody(BaseModel):
    tags: dict[Name, str]


class FileInfoModel(BaseModel):
    name: str
    path: str
    type: str = Field(description="FILE | DIRECTORY | SYMLINK")
    size: int
    mode: int
    owner: str
    group: str
    modified_time: float
    symlink_target: str | None


class MkdirBody(BaseModel):
    path: str
    parents: bool = False
    exist_ok: bool = False


class RenameFileBody(BaseModel):
    src: str
    dst: str
    overwrite: bool = True


class OpenBody(BaseModel):
    path: str
    mode: str = "r"


class SeekBody(BaseModel):
    offset: int
    whence: Literal[0, 1, 2] = 0


class WaitResult(BaseModel):
    done: bool
    returncode: int | None
    timed_out: bool = Field(False, description="an exec killed at its timeout (returncode 124)")


class ExecRequest(BaseModel):
    args: list[NoNul] = Field(min_length=1)
    env: dict[EnvKey, NoNul] = Field(default_factory=dict)
    workdir: str | None = Field(None, pattern=r"^/[^\x00]*$")
    timeout: float | None = Field(None, gt=0)
    stdout: Literal["pipe", "devnull"] = "pipe"
    stderr: Literal["pipe", "devnull", "stdout"] = "pipe"
    secret_ids: list[str] = Field(default_factory=list, description="named secrets; `env` wins")
    # A pseudo-terminal: the process's stdin, stdout and stderr are the terminal; all its output
    # arrives on stdout.
    pty_rows: int | None = Field(None, ge=1, le=1000, description="with pty_cols: run in a pty")
    pty_cols: int | None = Field(None, ge=1, le=1000)


class ExecInfo(BaseModel):
    exec_id: str
    sandbox_id: str


class VolumeLookup(BaseModel):
    name: Name
    create_if_missing: bool = False


class VolumeCreate(BaseModel):
    name: Name
    allow_existing: bool = False


class VolumeInfo(BaseModel):
    volume_id: str
    kind: str
    name: str | None
    ephemeral: bool
    created_at: float
    lease_ttl: float | None = None


class FileEntryModel(BaseModel):
    path: str
    type: int
    mtime: int
    size: int


class ErrorBody(BaseModel):
    type: str = Field(description="a class of shoal.exception, or a built-in OSError subclass")
    message: str
    errno: int | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class RenameRequest(BaseModel):
    old_name: Name
    new_name: Name


class CopyRequest(BaseModel):
    src_paths: list[str]
    dst: str
    recursive: bool = False


class BatchCreate(BaseModel):
    paths: list[str] = Field(default_factory=list, description="targets, checked when not force")
    force: bool = True


class BatchInfo(BaseModel):
    batch_id: str


# --- operations: status, stats, terminal size (routes/ops.py)

class ResizeBody(BaseModel):
    rows: int = Field(ge=1, le=1000)
    cols: int = Field(ge=1, le=1000)


class SandboxStatsModel(BaseModel):
    sandbox_id: str
    cpu_seconds: float = Field(description="CPU time used since the sandbox started")
    cpu_percent: float | None = Field(None, description="of one core, since the previous sample")
    memory_bytes: int
    memory_limit: int | None
    pids: int
    disk_bytes: int = Field(description="written to its root filesystem")


class StatusInfo(BaseModel):
    version: str
    api_version: str
    pid: int
    started_at: float
    uptime: float
    runtimes: list[str]
    sandboxes_running: int
    pool_size: int
    pool_hits: int
    pool_misses: int
    home: str
    disk_used: int = Field(description="bytes under SHOAL_HOME (the image store aside)")
    log_path: str | None


class AppSummary(BaseModel):
    app_id: str
    name: str
    created_at: float
    sandboxes_running: int


class SandboxDetail(BaseModel):
    """A sandbox as operators see it (`shoal sandbox list/inspect`, the dashboard)."""
    sandbox_id: str
    app_id: str
    app_name: str | None
    name: str | None
    tags: dict[str, str]
    state: str
    created_at: float
    ended_at: float | None
    deadline: float | None
    returncode: int | None
    end_reason: str | None
    image_id: str | None
    runtime: str
    args: list[str]
    workdir: str | None
    resources: dict
    mounts: list[dict]
    env_keys: list[str] = Field(description="names only: values may be secrets")


# --- memory snapshots (Modal's SandboxSnapshot)
class MemorySnapshotInfo(BaseModel):
    snapshot_id: str = Field(description="sn-...")
    sandbox_id: str = Field(description="the sandbox it was taken of")
    created_at: float
    expires_at: float = Field(description="removed after this (SHOAL_MEMORY_SNAPSHOT_TTL, "
                                          "default 7 days, as Modal)")


class RestoreMemorySnapshot(BaseModel):
    keep_name: bool = Field(True, description="take the snapshotted sandbox's name (Modal's "
                                              "default); false: `name`")
    name: Name | None = Field(None, description="with keep_name=false: the new sandbox's name, "
                                                "or null for none")
