"""An S3-compatible bucket mounted into a sandbox as files (Modal's `modal.CloudBucketMount`).

    creds = shoal.Secret.from_name("aws")  # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (AWS_REGION)
    sb = shoal.Sandbox.create(app=app, volumes={
        "/data": shoal.CloudBucketMount("my-bucket", secret=creds, key_prefix="raw/")})

What the sandbox sees (details and measurements in docs/buckets.md):
- objects under `key_prefix` as files; `a/b` prefixes as directories;
- a written file reaches the bucket when it is closed (`close()` returns after the upload);
- append works (the object is rewritten whole); rename is a copy + delete (not atomic);
- `read_only=True`: every write fails with EROFS;
- the endpoint going away: I/O errors (EIO) after ~20 s; the sandbox keeps running.
The mount is made on the host by the server; credentials never enter the sandbox.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from shoal._sync import to_impl
from shoal.exception import InvalidError
from shoal.secret import _Secret


class CloudBucketMount:
    """A bucket (S3, R2, GCS's S3 interface, MinIO, Ceph, ...) to mount with
    `Sandbox.create(volumes={path: mount})`.

    Raises InvalidError for a `key_prefix` that does not end in '/', `requester_pays` without a
    secret, an endpoint that is not an http(s) URL, or `oidc_auth_role_arn` (not supported).
    """

    def __init__(self, bucket_name: str, bucket_endpoint_url: str | None = None,
                 key_prefix: str | None = None, secret: _Secret | None = None,
                 oidc_auth_role_arn: str | None = None, read_only: bool = False,
                 requester_pays: bool = False, force_path_style: bool = False):
        if not isinstance(bucket_name, str) or not bucket_name or "/" in bucket_name:
            raise InvalidError(f"bucket_name must be a bucket's name, got {bucket_name!r}")
        if bucket_endpoint_url is not None:
            u = urlsplit(bucket_endpoint_url) if isinstance(bucket_endpoint_url, str) else None
            if u is None or u.scheme not in ("http", "https") or not u.hostname:
                raise InvalidError("bucket_endpoint_url must be an http(s) URL like "
                                   f"https://s3.example.com, got {bucket_endpoint_url!r}")
        if key_prefix is not None and (not isinstance(key_prefix, str)
                                       or not key_prefix.endswith("/")):
            raise InvalidError("key_prefix will be prefixed to all object paths, so it must end "
                               f"in a '/', got {key_prefix!r}")
        secret = to_impl(secret)
        if secret is not None and not isinstance(secret, _Secret):
            raise InvalidError(f"secret must be a shoal.Secret, got {type(secret).__name__}")
        if requester_pays and secret is None:
            raise InvalidError("Credentials required in order to use Requester Pays.")
        if oidc_auth_role_arn is not None:
            raise InvalidError("CloudBucketMount(oidc_auth_role_arn=...) is not supported by "
                               "shoal; pass AWS credentials as a secret")
        self.bucket_name = bucket_name
        self.bucket_endpoint_url = bucket_endpoint_url
        self.key_prefix = key_prefix
        self.secret = secret
        self.oidc_auth_role_arn = oidc_auth_role_arn
        self.read_only = bool(read_only)
        self.requester_pays = bool(requester_pays)
        self.force_path_style = bool(force_path_style)

    async def _mount_spec(self, mount_path: str) -> dict:
        spec = {"path": mount_path, "bucket_name": self.bucket_name,
                "bucket_endpoint_url": self.bucket_endpoint_url, "key_prefix": self.key_prefix,
                "read_only": self.read_only, "requester_pays": self.requester_pays,
                "force_path_style": self.force_path_style}
        sec = self.secret
        if sec is not None:
            if sec._name is not None:
                spec["secret_id"] = await sec._id()
            else:
                spec["secret_env"] = sec._env_dict()
        return spec

    def __repr__(self) -> str:
        return (f"CloudBucketMount({self.bucket_name!r}, key_prefix={self.key_prefix!r}, "
                f"read_only={self.read_only})")


__all__ = ["CloudBucketMount"]
