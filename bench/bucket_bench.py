"""Bucket throughput: a 256 MiB object read and written from inside a sandbox through a
CloudBucketMount (s3fs on the host, bound in), next to boto3 from the host against the same
S3-protocol server (moto_server on loopback, started here).

Cases (medians of --runs, MB/s = 1e6 bytes/s):
- sandbox write: `dd if=/dev/zero of=/b/obj bs=4M count=64` inside the sandbox; done when dd's
  close() returned, which is when s3fs has uploaded the object.
- sandbox read:  `dd if=/b/obj of=/dev/null bs=4M` inside the sandbox (s3fs keeps no cache here).
- boto3 put_object / get_object(...).read() of the same bytes from the host.
Also: the peak RSS of the s3fs process (VmHWM).

Runs its own shoal server on a fresh SHOAL_HOME under /tmp (reusing the image store) and removes
it and every process it started on exit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

SIZE = 256 << 20


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--runtime", choices=["runc", "gvisor"], default="runc",
                    help="the sandbox's runtime (the host side, s3fs and moto, is the same)")
    ap.add_argument("--images", default=os.environ.get("SHOAL_IMAGES")
                    or str(Path.home() / ".shoal" / "images"))
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="shoal-bench-", dir="/tmp"))
    os.environ.update(SHOAL_HOME=str(home), SHOAL_IMAGES=str(Path(args.images).absolute()))
    from s3_util import start_s3
    from sandbox_bench import start_server, stop_server, wait_ready

    server = start_server(home)
    s3 = None
    sb = None
    try:
        wait_ready(home, server)
        import shoal

        s3 = start_s3(auth=False)
        c = s3.client()
        c.create_bucket(Bucket="bench")
        app = shoal.App.lookup("bench", create_if_missing=True)
        secret = shoal.Secret.from_dict({"AWS_ACCESS_KEY_ID": s3.key,
                                         "AWS_SECRET_ACCESS_KEY": s3.secret})
        sb = shoal.Sandbox.create(app=app, timeout=1800, volumes={"/b": shoal.CloudBucketMount(
            "bench", bucket_endpoint_url=s3.endpoint, secret=secret)},
            experimental_options={"runtime": args.runtime})
        res: dict[str, list[float]] = {k: [] for k in ("sandbox write", "sandbox read",
                                                        "boto3 put", "boto3 get")}
        data = b"\0" * SIZE

        def timed(key, fn):
            t = time.perf_counter()
            fn()
            res[key].append(SIZE / 1e6 / (time.perf_counter() - t))

        def in_sb(cmd):
            p = sb.exec("sh", "-c", cmd, timeout=600)
            assert p.wait() == 0, p.stderr.read()

        for _ in range(args.runs):
            timed("sandbox write", lambda: in_sb(f"dd if=/dev/zero of=/b/obj bs=4M count={SIZE >> 22} 2>/dev/null"))
            timed("sandbox read", lambda: in_sb("dd if=/b/obj of=/dev/null bs=4M 2>/dev/null"))
            timed("boto3 put", lambda: c.put_object(Bucket="bench", Key="obj2", Body=data))
            timed("boto3 get", lambda: c.get_object(Bucket="bench", Key="obj2")["Body"].read())
        pid = next(p for p in Path("/proc").iterdir() if p.name.isdigit()
                   and b"s3fs" in (p / "cmdline").read_bytes()[:64]
                   and str(home).encode() in (p / "cmdline").read_bytes())
        peak = [ln for ln in (pid / "status").read_text().splitlines()
                if ln.startswith("VmHWM")][0].split()[1]
        print(f"256 MiB object, {args.runtime} sandbox, medians of {args.runs} runs (MB/s), "
              f"load average {os.getloadavg()[0]:.1f}:")
        for k, v in res.items():
            print(f"  {k:14s} {statistics.median(v):7.0f}   (runs: {', '.join(f'{x:.0f}' for x in v)})")
        print(f"  s3fs peak RSS  {int(peak) / 1024:7.0f} MiB")
        return 0
    finally:
        if sb is not None:
            sb.terminate()
        stop_server(home, server)
        if s3 is not None:
            s3.stop()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
