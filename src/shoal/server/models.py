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
    secret_id: str | None = Field(None, description="registry: a named secret with "
                                  "REGISTRY_USERNAME / REGISTRY_PASSWORD")


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


# --- secrets and bucket mounts (issue 12)
class SecretCreate(BaseModel):
    name: str
    env: dict[str, str]
    force: bool = Field(False, description="replace the values of an existing secret")


class SecretLookup(BaseModel):
    name: str
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
    # Network (Modal's names; docs/network.md).
    block_network: bool = Field(False, description="only loopback (unless ports are exposed)")
    cidr_allowlist: list[str] | None = Field(
        None, description="outbound only to these IPv4 CIDRs (plus DNS); None: everywhere "
                          "public")
    outbound_domain_allowlist: list[str] | None = Field(None, description="not supported yet")
    encrypted_ports: list[int] = Field(default_factory=list, description="TLS tunnels")
    unencrypted_ports: list[int] = Field(default_factory=list,
                                         description="TLS and raw TCP tunnels")
    h2_ports: list[int] = Field(default_factory=list, description="TLS tunnels offering h2")
    secret_ids: list[str] = Field(default_factory=list, description="named secrets, resolved "
                                  "by the server; `env` overrides them")
    bucket_mounts: list[BucketMountSpec] = Field(default_factory=list)
    # --- runtimes (issue 10): experimental_options={"runtime": ...} in the SDK
    runtime: str | None = Field(None, description="runc | gvisor; None: the server's default "
                                "(docs/gvisor.md)")


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
    secret_ids: list[str] = Field(default_factory=list, description="named secrets; `env` wins")


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
