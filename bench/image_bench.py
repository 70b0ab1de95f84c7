"""Image builds, cached rebuilds, start-up from a built image, and disk per sandbox.

1. First build of `Image.debian_slim().apt_install("curl").pip_install("six")` — in a fresh image
   store that has only the default base image (hard-linked from the real store), so the two step
   layers are really built (apt and PyPI are reached over the network) — and the cached rebuild of
   the same recipe from a new Image object (median of 5).
2. `Sandbox.create(image=...)` → first exec output, with that built image beside the default
   image, interleaved, medians of --runs.
3. Disk used by ten running sandboxes of the built image: their writable layers (`du` of each
   sandbox directory) against the image's own layers — sandboxes share the image's layers, so ten
   cost about one image, not ten.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sandbox_bench import log, start_server, stop_server, wait_ready  # noqa: E402


def du(path: Path) -> int:
    out = subprocess.run(["du", "-sbx", str(path)], capture_output=True, text=True).stdout
    return int(out.split()[0]) if out else 0


def recipe():
    import shoal

    return shoal.Image.debian_slim().apt_install("curl").pip_install("six")


def first_output_ms(app, image) -> float:
    import shoal

    t = time.perf_counter()
    sb = shoal.Sandbox.create(app=app, image=image)
    out = sb.exec("echo", "hi").stdout.read()
    ms = (time.perf_counter() - t) * 1000
    assert out == "hi\n", out
    sb.terminate()
    return ms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--images", default=os.environ.get("SHOAL_IMAGES")
                    or str(Path.home() / ".shoal" / "images"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        log("image_bench.py needs root")
        return 2

    from shoal.server.images.base import ensure_base_image, image_dir

    real_store = Path(args.images).absolute()
    ensure_base_image(real_store, log=log)
    workdir = Path(tempfile.mkdtemp(prefix="shoal-bench-img-", dir="/tmp"))
    home, store = workdir / "home", workdir / "images"
    (store / "base").mkdir(parents=True)
    base = image_dir(real_store)
    subprocess.run(["cp", "-al", str(base), str(store / "base" / base.name)], check=True)
    base_meta = json.loads((base / "image.json").read_text())
    os.environ.update(SHOAL_HOME=str(home), SHOAL_IMAGES=str(store))
    for var in ("SHOAL_SERVER", "SHOAL_TOKEN"):
        os.environ.pop(var, None)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    server = None
    result: dict = {"machine": {"nproc": os.cpu_count(), "load1": os.getloadavg()[0]}}
    try:
        server = start_server(home)
        wait_ready(home, server)
        import shoal

        app = shoal.App.lookup("bench", create_if_missing=True)
        t = time.perf_counter()
        built = recipe().build()
        first = time.perf_counter() - t
        rebuilds = []
        for _ in range(5):
            t = time.perf_counter()
            again = recipe().build()
            rebuilds.append(time.perf_counter() - t)
            assert again.object_id == built.object_id
        result["build"] = {
            "base_image_debootstrap_s": base_meta.get("build_seconds"),
            "base_image_mb": round(base_meta.get("size_bytes", 0) / 1e6),
            "first_build_s": round(first, 2),
            "cached_rebuild_median_ms": round(statistics.median(rebuilds) * 1000, 1),
        }

        default = shoal.Image.debian_slim()
        for _ in range(3):  # warm-up
            first_output_ms(app, built)
            first_output_ms(app, default)
        custom_ms, default_ms = [], []
        for i in range(args.runs):
            order = [(built, custom_ms), (default, default_ms)]
            for image, bucket in (order if i % 2 == 0 else order[::-1]):
                bucket.append(first_output_ms(app, image))
        result["first_output_ms"] = {
            "built_image_median": round(statistics.median(custom_ms), 1),
            "default_image_median": round(statistics.median(default_ms), 1),
            "ratio": round(statistics.median(custom_ms) / statistics.median(default_ms), 2),
        }

        from shoal.server.images.store import ImageStore

        st = ImageStore(store)
        layers = st.manifest(built.object_id).layers
        image_bytes = sum(du(st.layer_path(i)) for i in layers)
        sbs = [shoal.Sandbox.create(app=app, image=built) for _ in range(10)]
        for sb in sbs:
            sb.exec("true").wait()
        per_sandbox = [du(home / "sandboxes" / sb.object_id) for sb in sbs]
        for sb in sbs:
            sb.terminate()
        result["disk"] = {
            "image_layers_mb": round(image_bytes / 1e6, 1),
            "ten_sandboxes_mb": round(sum(per_sandbox) / 1e6, 2),
            "per_sandbox_kb_median": round(statistics.median(per_sandbox) / 1e3, 1),
            "ten_sandboxes_total_vs_one_image": round(
                (image_bytes + sum(per_sandbox)) / image_bytes, 3),
        }
    finally:
        if server is not None:
            stop_server(home, server)
        subprocess.run(["rm", "-rf", str(workdir)])

    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    b, f, d = result["build"], result["first_output_ms"], result["disk"]
    print(f"machine: nproc={result['machine']['nproc']} load1={result['machine']['load1']:.2f}; "
          f"N={args.runs}")
    print(f"default base image (debootstrap, once): {b['base_image_debootstrap_s']} s, "
          f"{b['base_image_mb']} MB")
    print(f"debian_slim().apt_install('curl').pip_install('six'):  first build "
          f"{b['first_build_s']} s, cached rebuild {b['cached_rebuild_median_ms']} ms (median)")
    print(f"create -> first output: built image {f['built_image_median']} ms, default image "
          f"{f['default_image_median']} ms (ratio {f['ratio']})")
    print(f"disk: image layers {d['image_layers_mb']} MB; ten running sandboxes add "
          f"{d['ten_sandboxes_mb']} MB ({d['per_sandbox_kb_median']} kB each); ten sandboxes + "
          f"image = {d['ten_sandboxes_total_vs_one_image']} x one image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
