"""The wire contract: request and response bodies of the HTTP API. The OpenAPI document is generated
from these (and checked into docs/openapi.json by a test, so it cannot drift unnoticed)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class AppLookup(BaseModel):
    name: str
    create_if_missing: bool = False


class AppInfo(BaseModel):
    app_id: str
    name: str
    created_at: float


class ImageBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = Field("debian_slim", description="debian_slim | registry | image")
    python_version: str | None = None
    tag: str | None = Field(None, description="registry: an image reference")
    username: str | None = None
    password: str | None = None
    image_id: str | None = Field(None, description="image: build on an existing image")


class ImageStep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    op: str = Field(description="apt_install | pip_install | uv_pip_install | run_commands | "
                                "add_local | env | workdir | entrypoint | user")
    packages: list[str] | None = None
    index_url: str | None = None
    extra_index_url: str | None = None
    pre: bool | None = None
    commands: list[str] | None = None
    secret_env: dict[str, str] | None = None
    env: dict[str, str] | None = None
    path: str | None = None
    blob: str | None = Field(None, description="add_local: sha256 of the uploaded tar")
    args: list[str] | None = None
    user: str | None = None


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
    cpu: float | None = Field(None, description="cores; a hard quota")
    memory: int | None = Field(None, description="MiB; a process over it is OOM-killed")
    pids: int | None = None


class ProbeSpec(BaseModel):
    exec_args: list[str] | None = Field(None, description="ready when this exits 0")
    tcp_port: int | None = Field(None, description="ready when this port accepts connections")
    interval_ms: int = 100


class CreateSandbox(BaseModel):
    app_id: str
    args: list[str] = Field(default_factory=list, description="entrypoint; empty = stay up")
    name: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    image_id: str | None = Field(None, description="from POST /images; None: the default image")
    env: dict[str, str] = Field(default_factory=dict)
    workdir: str | None = None
    timeout: float = 300
    idle_timeout: float | None = None
    readiness_probe: ProbeSpec | None = None
    mounts: list[MountSpec] = Field(default_factory=list)
    resources: Resources = Field(default_factory=Resources)
    block_network: bool = True


class SandboxInfo(BaseModel):
    sandbox_id: str
    app_id: str
    name: str | None
    tags: dict[str, str]
    state: str
    created_at: float
    returncode: int | None
    end_reason: str | None


class TagsBody(BaseModel):
    tags: dict[str, str]


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
    whence: int = 0


class WaitResult(BaseModel):
    done: bool
    returncode: int | None


class ExecRequest(BaseModel):
    args: list[str]
    env: dict[str, str] = Field(default_factory=dict)
    workdir: str | None = None
    timeout: float | None = None
    stdout: str = Field("pipe", description="pipe | devnull")
    stderr: str = Field("pipe", description="pipe | devnull | stdout")
    # A pseudo-terminal: the process's stdin, stdout and stderr are the terminal; all its output
    # arrives on stdout.
    pty_rows: int | None = Field(None, ge=1, le=1000, description="with pty_cols: run in a pty")
    pty_cols: int | None = Field(None, ge=1, le=1000)


class ExecInfo(BaseModel):
    exec_id: str
    sandbox_id: str


class VolumeLookup(BaseModel):
    name: str
    create_if_missing: bool = False


class VolumeCreate(BaseModel):
    name: str
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
    old_name: str
    new_name: str


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
