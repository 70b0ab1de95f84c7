"""A real S3-protocol server on loopback for tests: moto's standalone server (`moto_server`),
with IAM authentication on, seeded with boto3."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    proc: subprocess.Popen
    endpoint: str
    key: str
    secret: str

    def client(self, key: str | None = None, secret: str | None = None):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=key or self.key,
                            aws_secret_access_key=secret or self.secret,
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def start_s3(auth: bool = True) -> S3Server:
    import boto3

    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    env = {**os.environ}
    env.pop("AWS_CA_BUNDLE", None)
    if auth:
        # The first three requests (create the user, its key, its policy) run unauthenticated;
        # every later one needs a valid signature by a key moto knows.
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start")
            time.sleep(0.1)
    # Without auth moto takes any key: unique ones, so that a test finding them somewhere (a
    # command line, a log) finds a leak and not some other process's words.
    key, secret = f"AKIA{uuid.uuid4().hex[:16].upper()}", uuid.uuid4().hex
    if auth:
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="x", aws_secret_access_key="x")
        iam.create_user(UserName="shoal")
        k = iam.create_access_key(UserName="shoal")["AccessKey"]
        iam.put_user_policy(UserName="shoal", PolicyName="all", PolicyDocument=(
            '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", '
            '"Resource": "*"}]}'))
        key, secret = k["AccessKeyId"], k["SecretAccessKey"]
    return S3Server(proc, endpoint, key, secret)
