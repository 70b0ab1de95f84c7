"""Building images step by step: packages from Debian and PyPI, commands, local files, cache hits,
failures that leave the cache clean, pruning, and deep chains."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

import shoal
from conftest import shoal_cli
from shoal import config
from shoal.exception import ExecutionError, InvalidError
from shoal.server.images.store import ImageStore


def store() -> ImageStore:
    return ImageStore(config.paths().images)


def run(sb, script: str) -> str:
    p = sb.exec("bash", "-c", script)
    out = p.stdout.read()
    assert p.wait() == 0, p.stderr.read()
    return out


def marker() -> str:
    """A unique step, so a test builds its own layers instead of hitting another test's cache."""
    return f"echo {uuid.uuid4().hex} > /marker"


@pytest.mark.slow
def test_apt_pip_env_workdir_and_cache(app):
    img = (shoal.Image.debian_slim().run_commands(marker())
           .apt_install("jq").pip_install("six==1.16.0")
           .env({"APP_MODE": "test"}).workdir("/srv"))
    t = time.monotonic()
    img.build()
    first = time.monotonic() - t
    sb = shoal.Sandbox.create(app=app, image=img)
    try:
        out = run(sb, "echo '{\"a\": 5}' | jq .a; python -c 'import six; print(six.__version__)';"
                      " echo $APP_MODE; pwd")
        assert out == "5\n1.16.0\ntest\n/srv\n"
    finally:
        sb.terminate()
    # The same recipe again, from a new Image object: every layer is a cache hit.
    again = (shoal.Image.debian_slim().run_commands(img._impl._spec["steps"][0]["commands"][0])
             .apt_install("jq").pip_install("six==1.16.0")
             .env({"APP_MODE": "test"}).workdir("/srv"))
    t = time.monotonic()
    again.build()
    assert again.object_id == img.object_id
    assert time.monotonic() - t < min(1.0, first / 3)


def test_changed_step_rebuilds_from_there_on(app):
    base = shoal.Image.debian_slim().run_commands(marker())
    a = base.run_commands("echo a > /step2").build()
    b = base.run_commands("echo b > /step2").build()
    la = store().manifest(a.object_id).layers
    lb = store().manifest(b.object_id).layers
    assert la[:-1] == lb[:-1] and la[-1] != lb[-1]


def test_build_logs_stream_with_enable_output(app, capsys):
    with shoal.enable_output():
        shoal.Image.debian_slim().run_commands(marker(), "echo visible-in-the-log").build()
    err = capsys.readouterr().err
    assert "visible-in-the-log" in err and "building" in err and "ready" in err


def test_failing_command_fails_the_build_with_its_exit_code_and_leaves_no_layer(app):
    before = set(store().all_layers())
    with pytest.raises(ExecutionError, match="exit code 3") as e:
        shoal.Image.debian_slim().run_commands(marker(), "echo about-to-fail; exit 3").build()
    assert "about-to-fail" in str(e.value)
    assert set(store().all_layers()) == before
    assert not [d for d in (config.paths().images / ".work").iterdir()
                if d.name.startswith(f"{_server_pid()}-")]


def _server_pid() -> int:
    return int((config.paths().home / "server.pid").read_text())


# Without a network, apt's empty index also says "Unable to locate package" and pip also says
# "No matching distribution": each negative test therefore asserts the failure names the package,
# shows no network error, and runs a positive control through the same build network (a real
# package is found), so it cannot pass on a build with no network.
NET_ERRORS = ("Temporary failure", "Failed to fetch", "Could not resolve", "NewConnectionError",
              "Network is unreachable", "Connection refused", "ProxyError")


def test_missing_apt_package_fails_with_apts_message(app):
    with pytest.raises(ExecutionError) as e:
        shoal.Image.debian_slim().run_commands(marker()).apt_install(
            "no-such-package-shoal-xyz").build()
    msg = str(e.value)
    assert "Unable to locate package no-such-package-shoal-xyz" in msg and "exit code 100" in msg
    assert not [n for n in NET_ERRORS if n in msg], msg
    # Positive control: the same network and the same index find a real package.
    shoal.Image.debian_slim().run_commands(
        marker(), "apt-get update -q", "apt-cache show jq > /dev/null",
        "rm -rf /var/lib/apt/lists/*").build()


def test_missing_pip_package_fails_with_pips_message(app):
    with pytest.raises(ExecutionError) as e:
        shoal.Image.debian_slim().run_commands(marker()).pip_install(
            "no-such-package-shoal-xyz-123").build()
    msg = str(e.value)
    assert "no-such-package-shoal-xyz-123" in msg
    assert "No matching distribution" in msg or "Could not find" in msg
    assert not [n for n in NET_ERRORS if n in msg], msg
    # Positive control: the same network reaches the index and finds a real distribution.
    shoal.Image.debian_slim().run_commands(
        marker(), "python3 -m pip download --no-deps --no-cache-dir -q -d /tmp/pc six==1.16.0",
        "rm -rf /tmp/pc").build()


@pytest.mark.parametrize("bad", ["curl; rm -rf /", "$(reboot)", "a b", ""])
def test_package_names_cannot_inject_commands(app, bad):
    with pytest.raises(InvalidError):
        shoal.Image.debian_slim().apt_install(bad).build() if bad else \
            shoal.Image.debian_slim().apt_install(bad, "ok; x").build()


def test_add_local_file_dir_and_python_source(app, tmp_path):
    (tmp_path / "one.txt").write_text("one")
    proj = tmp_path / "proj"
    (proj / "pkg").mkdir(parents=True)
    (proj / "pkg" / "__init__.py").write_text("VALUE = 42\n")
    (proj / "skip.log").write_text("no")
    (proj / "keep.cfg").write_text("yes")
    img = (shoal.Image.debian_slim()
           .add_local_file(tmp_path / "one.txt", "/root/data/")
           .add_local_dir(proj, "/opt/proj", ignore=["*.log"]))
    sb = shoal.Sandbox.create(app=app, image=img)
    try:
        out = run(sb, "cat /root/data/one.txt; echo; ls /opt/proj; stat -c %a /root; "
                      "cd /opt/proj && python -c 'import pkg; print(pkg.VALUE)'")
        assert out == "one\nkeep.cfg\npkg\n700\n42\n"  # /root keeps its mode under the new layer
    finally:
        sb.terminate()
    # Changing a file's content changes the step's cache key.
    (proj / "keep.cfg").write_text("changed")
    img2 = shoal.Image.debian_slim().add_local_file(tmp_path / "one.txt", "/root/data/") \
        .add_local_dir(proj, "/opt/proj", ignore=["*.log"])
    assert img2.build().object_id != img.object_id


def test_add_local_python_source(app, tmp_path, monkeypatch):
    pkg = tmp_path / "shoal_test_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .inner import ANSWER\n")
    (pkg / "inner.py").write_text("ANSWER = 'local source'\n")
    (tmp_path / "shoal_test_mod.py").write_text("NAME = 'module'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    img = shoal.Image.debian_slim().add_local_python_source("shoal_test_pkg", "shoal_test_mod")
    sb = shoal.Sandbox.create(app=app, image=img)
    try:
        out = run(sb, "cd / && python -c 'import shoal_test_pkg, shoal_test_mod; "
                      "print(shoal_test_pkg.ANSWER, shoal_test_mod.NAME)'")
        assert out == "local source module\n"
    finally:
        sb.terminate()
    with pytest.raises(InvalidError):
        shoal.Image.debian_slim().add_local_python_source("no_such_module_shoal")


def test_missing_local_file_is_an_error_at_definition(tmp_path):
    with pytest.raises(FileNotFoundError):
        shoal.Image.debian_slim().add_local_file(tmp_path / "nope", "/x")
    with pytest.raises(NotADirectoryError):
        shoal.Image.debian_slim().add_local_dir(tmp_path / "nope", "/x")
    with pytest.raises(InvalidError):
        shoal.Image.debian_slim().workdir("relative")


def test_secrets_and_build_mounts_stay_out_of_the_image(app):
    secret = shoal.Secret.from_dict({"BUILD_TOKEN": "s3cr3t-value"})
    img = shoal.Image.debian_slim().run_commands(
        marker(), "test \"$BUILD_TOKEN\" = s3cr3t-value && echo ok > /token-was-there",
        "python3 -c 'import ssl, os; print(os.environ[\"PIP_CERT\"])' > /cert-path",
        secrets=[secret])
    img.build()
    layer = store().layer_path(store().manifest(img.object_id).layers[-1])
    assert (layer / "token-was-there").read_text() == "ok\n"
    assert not (layer / ".shoal-build").exists() and not (layer / ".shoal").exists()
    assert not (layer / "etc" / "resolv.conf").exists()
    sb = shoal.Sandbox.create(app=app, image=img)
    try:
        assert run(sb, "env | grep -c BUILD_TOKEN || true") == "0\n"
        assert run(sb, "grep -rl s3cr3t-value / --exclude-dir=proc --exclude-dir=sys "
                       "2>/dev/null | wc -l") == "0\n"
    finally:
        sb.terminate()


def test_concurrent_builds_of_one_recipe_build_once(app):
    step = f"cat /proc/sys/kernel/random/uuid >> /built-by; sleep 1  # {uuid.uuid4().hex}"
    results = []

    def build():
        results.append(shoal.Image.debian_slim().run_commands(step).build().object_id)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    sb = shoal.Sandbox.create(app=app, image=shoal.Image.from_id(results[0]))
    try:
        assert len(run(sb, "cat /built-by").split()) == 1
    finally:
        sb.terminate()


def test_snapshot_images_can_be_extended(app):
    sb = shoal.Sandbox.create(app=app)
    run(sb, "echo from-sandbox > /snap.txt")
    snap = sb.snapshot_filesystem()
    sb.terminate()
    img = snap.run_commands("cat /snap.txt > /copied.txt")
    sb2 = shoal.Sandbox.create(app=app, image=img)
    try:
        assert run(sb2, "cat /copied.txt") == "from-sandbox\n"
    finally:
        sb2.terminate()


def test_prune_keeps_layers_in_use(app):
    used = shoal.Image.debian_slim().run_commands(marker()).build()
    dropped = shoal.Image.debian_slim().run_commands(marker()).build()
    used_layer = store().manifest(used.object_id).layers[-1]
    dropped_layer = store().manifest(dropped.object_id).layers[-1]
    sb = shoal.Sandbox.create(app=app, image=used)
    try:
        refused = shoal_cli("image", "rm", used.object_id, check=False)
        assert refused.returncode == 1 and "running sandbox" in refused.stderr
        shoal_cli("image", "rm", dropped.object_id)
        r = shoal_cli("image", "prune")
        assert "removed" in r.stdout
        assert store().has_layer(used_layer), "a running sandbox's layer was pruned"
        assert not store().has_layer(dropped_layer)
        assert run(sb, "cat /marker") != ""
    finally:
        sb.terminate()


@pytest.mark.slow
def test_deep_chains_are_flattened_to_mount(app):
    img = shoal.Image.debian_slim().run_commands(marker())
    for i in range(30):
        img = img.run_commands(f"echo {i} >> /steps")
    sb = shoal.Sandbox.create(app=app, image=img)
    try:
        assert run(sb, "wc -l < /steps") == "30\n"
    finally:
        sb.terminate()
    layers = store().manifest(img.object_id).layers
    assert len(layers) == 32
    assert any(p.parent.parent.name == "flat" for p in store().mount_layers(layers))


def test_image_cli(app, tmp_path):
    f = tmp_path / "images.py"
    f.write_text("import shoal\n"
                 f"app_image = shoal.Image.debian_slim().run_commands({marker()!r})\n"
                 "not_an_image = 3\n")
    r = shoal_cli("image", "build", f"{f}::app_image")
    image_id = r.stdout.strip().splitlines()[-1]
    assert image_id.startswith("im-") and "ready" in r.stderr
    assert image_id in shoal_cli("image", "list").stdout
    bad = shoal_cli("image", "build", f"{f}::not_an_image", check=False)
    assert bad.returncode == 1 and "not a shoal.Image" in bad.stderr
    shoal_cli("image", "rm", image_id)
    assert image_id not in shoal_cli("image", "list").stdout
    assert shoal_cli("image", "rm", image_id, check=False).returncode == 1


def test_dockerfile_on_the_default_image(app, tmp_path):
    (tmp_path / "app.py").write_text("print('dockerfile app')\n")
    (tmp_path / "Dockerfile").write_text(
        "FROM shoal/debian_slim\nARG WHO=world\nENV GREETING=hello\nWORKDIR /app\n"
        "COPY app.py .\nRUN echo \"$GREETING $WHO\" > /greeting\nLABEL a=b\nCMD [\"python\"]\n")
    img = shoal.Image.from_dockerfile(tmp_path / "Dockerfile")
    sb = shoal.Sandbox.create(app=app, image=img)
    try:
        assert run(sb, "python app.py; cat /greeting; pwd") == \
            "dockerfile app\nhello world\n/app\n"
    finally:
        sb.terminate()
    (tmp_path / "Dockerfile").write_text("FROM shoal/debian_slim\nSTOPSIGNAL SIGTERM\n")
    with pytest.raises(InvalidError, match="STOPSIGNAL"):
        shoal.Image.from_dockerfile(tmp_path / "Dockerfile")


def test_multi_stage_dockerfile_copies_from_stages_with_owners(app, tmp_path):
    (tmp_path / "hello.txt").write_text("from the context\n")
    (tmp_path / "Dockerfile").write_text("""\
FROM shoal/debian_slim AS build
RUN mkdir -p /out/sub && echo built > /out/a.txt && echo deep > /out/sub/b.txt \\
    && ln -s a.txt /out/link && echo 'not me' > /out/.hidden
FROM shoal/debian_slim
RUN useradd -u 1234 appu && mkdir -p /opt/out && echo kept > /opt/out/old.txt
USER appu
COPY --from=build /out /opt/out
COPY --from=0 /out/a.txt /single.txt
COPY --from=build --chown=appu:appu /out/sub/ /owned/
COPY --link --chown=appu hello.txt /ctx/
""")
    img = shoal.Image.from_dockerfile(tmp_path / "Dockerfile")
    sb = shoal.Sandbox.create(app=app, image=img)
    try:
        # a directory's contents merge into the target; symlinks and dot files are kept
        assert run(sb, "cat /opt/out/a.txt /opt/out/sub/b.txt /opt/out/old.txt /opt/out/.hidden;"
                       " readlink /opt/out/link") == "built\ndeep\nkept\nnot me\na.txt\n"
        assert run(sb, "cat /single.txt; stat -c %U /single.txt") == "built\nroot\n"
        assert run(sb, "stat -c '%U:%G' /owned/b.txt /ctx/hello.txt /opt; cat /ctx/hello.txt") \
            == "appu:appu\nappu:appu\nroot:root\nfrom the context\n"
        assert run(sb, "id -un") == "appu\n", "the image's USER is what the Dockerfile says"
        assert run(sb, "test -e /.shoal-build && echo left || echo clean") == "clean\n"
    finally:
        sb.terminate()
    (tmp_path / "Dockerfile").write_text(
        "FROM shoal/debian_slim AS a\nFROM shoal/debian_slim\nCOPY --from=a /no/such /x\n")
    with pytest.raises(ExecutionError, match="/no/such is not in the source image"):
        shoal.Image.from_dockerfile(tmp_path / "Dockerfile").build()


def test_a_removed_image_is_rebuilt_when_a_resolved_recipe_is_used_again(app):
    step = marker()
    img = shoal.Image.debian_slim().run_commands(step).build()
    shoal_cli("image", "rm", img.object_id)
    # Same recipe, new object: this process remembers the id, the server no longer has it.
    sb = shoal.Sandbox.create(app=app, image=shoal.Image.debian_slim().run_commands(step))
    try:
        assert run(sb, "test -s /marker && echo ok") == "ok\n"
    finally:
        sb.terminate()
