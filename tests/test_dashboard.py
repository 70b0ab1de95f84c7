"""The web dashboard in a real headless Chromium (Debian's, driven by Playwright), over
`shoal serve --tcp` with a token: list -> sandbox -> logs -> terminal -> files, volumes, images,
errors; and the token check on HTTP and websocket routes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from conftest import DEFAULT_IMAGES, leftovers, temp_home

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
TOKEN = "dashboard-test-token"

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason="needs Debian's chromium (scripts/install.sh)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tcp_server():
    """A server of its own on a fresh SHOAL_HOME, on TCP with a token."""
    home = temp_home()
    port = _free_port()
    env = {**os.environ, "SHOAL_HOME": str(home), "SHOAL_IMAGES": str(DEFAULT_IMAGES)}
    (home / "logs").mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "shoal", "serve", "--tcp",
                             f"127.0.0.1:{port}", "--token", TOKEN],
                            env=env, stdout=open(home / "logs" / "server.log", "ab"),
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None
        try:
            if httpx.get(base + "/health", headers={"authorization": f"Bearer {TOKEN}"}
                         ).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    client_env = {**env, "SHOAL_SERVER": base, "SHOAL_TOKEN": TOKEN}
    yield base, client_env
    subprocess.run([sys.executable, "-m", "shoal", "stop"], env=env, timeout=120)
    proc.wait(timeout=30)
    assert not leftovers(home)
    shutil.rmtree(home, ignore_errors=True)


def _sdk(env: dict, code: str) -> str:
    return subprocess.run([sys.executable, "-c", "import shoal\n" + code], env=env, check=True,
                          capture_output=True, text=True, timeout=120).stdout.strip()


def test_websocket_and_http_need_the_token(tcp_server):
    import websockets

    base, env = tcp_server
    assert httpx.get(base + "/status").status_code == 401
    assert httpx.get(base + "/metrics").status_code == 401
    assert httpx.get(base + "/dashboard/").status_code == 200  # static, holds no data
    ws_url = base.replace("http", "ws") + "/sandboxes/sb-0000000000000000000000/terminal"

    async def attempt(url: str, headers=None):
        try:
            async with websockets.connect(url, additional_headers=headers) as ws:
                return json.loads(await ws.recv())
        except websockets.exceptions.InvalidStatus as e:
            return e.response.status_code

    assert asyncio.run(attempt(ws_url)) == 403
    assert asyncio.run(attempt(ws_url + "?token=wrong")) == 403
    answer = asyncio.run(attempt(ws_url + f"?token={TOKEN}"))
    assert answer["type"] == "error" and "not found" in answer["message"]
    answer = asyncio.run(attempt(ws_url, {"authorization": f"Bearer {TOKEN}"}))
    assert answer["type"] == "error"

    # On the Unix socket its permissions are the authentication: no token, on HTTP and websockets.
    sock = str(Path(env["SHOAL_HOME"]) / "shoal.sock")
    with httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://shoal") as c:
        assert c.get("/status").status_code == 200 and c.get("/dashboard/").status_code == 200

    async def over_socket():
        async with websockets.unix_connect(sock, "ws://shoal/sandboxes/"
                                           "sb-0000000000000000000000/terminal") as ws:
            return json.loads(await ws.recv())

    assert asyncio.run(over_socket())["type"] == "error"


def test_metrics_text_format(tcp_server):
    base, env = tcp_server
    _sdk(env, "a = shoal.App.lookup('m', create_if_missing=True)\n"
              "sb = shoal.Sandbox.create(app=a)\n"
              "sb.exec('true').wait()\n"
              "sb.filesystem.write_text('x', '/tmp/x')\n"
              "sb.terminate()\n"
              "v = shoal.Volume.from_name('metrics-vol', create_if_missing=True)\n"
              "with v.batch_upload() as b:\n"
              "    import io; b.put_file(io.BytesIO(b'12345'), '/f')\n"
              "assert v.read_file('f') and True\n"
              "print(b''.join(v.read_file('f')))")
    text = httpx.get(base + "/metrics", headers={"authorization": f"Bearer {TOKEN}"}).text
    for name in ("shoal_sandboxes{runtime=\"runc\",state=\"terminated\"}",
                 "shoal_sandbox_creations_total{result=\"ok\"}", "shoal_sandbox_create_seconds_bucket",
                 "shoal_exec_start_seconds_count", "shoal_file_api_seconds_count",
                 "shoal_volume_bytes_total{direction=\"in\"}",
                 "shoal_volume_bytes_total{direction=\"out\"}", "shoal_pool_hits_total",
                 "shoal_pool_misses_total", "shoal_image_build_seconds_count"):
        assert name in text, name
    line = next(x for x in text.splitlines() if x.startswith('shoal_volume_bytes_total{direction="in"}'))
    assert float(line.split()[-1]) >= 5


def _bad_terminal_frame(base: str, sandbox_id: str) -> None:
    """Open a terminal and send it a text frame that is not JSON (Playwright's sync API owns
    this thread's event loop: the sync websocket client)."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    url = base.replace("http", "ws") + f"/sandboxes/{sandbox_id}/terminal?token={TOKEN}"
    with connect(url) as ws:
        ws.send("not json")
        with contextlib.suppress(ConnectionClosed):
            while True:
                ws.recv(timeout=30)


def test_click_through(tcp_server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    base, env = tcp_server
    name = f"dash-{uuid.uuid4().hex[:6]}"
    sid = _sdk(env, "a = shoal.App.lookup('dash', create_if_missing=True)\n"
                    f"sb = shoal.Sandbox.create('sh', '-c', 'echo booted-{name}; echo warn-{name} >&2;"
                    f" mkdir -p /srv/data; echo hello > /srv/data/greeting.txt; "
                    f"while sleep 1; do echo tick; done', app=a, name='{name}', tags={{'team': 'web'}})\n"
                    "print(sb.object_id)")
    _sdk(env, "v = shoal.Volume.from_name('dash-vol', create_if_missing=True)\n"
              "with v.batch_upload() as b:\n"
              "    import io; b.put_file(io.BytesIO(b'volume-bytes'), '/docs/readme.txt')")
    upload = tmp_path / "upload-me.txt"
    upload.write_text("uploaded from the browser")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 800}, accept_downloads=True)
        confirm = {"accept": True}  # how the next confirm() is answered
        page.on("dialog", lambda d: d.accept() if confirm["accept"] else d.dismiss())
        page.goto(base + "/")
        # The token, once per tab.
        page.fill("#token-input", TOKEN)
        page.click("#token-form button")
        row = page.locator(f"#sandbox-rows tr[data-id='{sid}']")
        expect(row).to_contain_text(name)
        expect(row).to_contain_text("running")
        expect(row).to_contain_text("team=web")
        expect(row).to_contain_text("runc")
        expect(row.locator("td").nth(5)).to_contain_text("im-")  # image
        expect(row.locator("td").nth(8)).to_contain_text("%", timeout=10000)  # cpu
        expect(row.locator("td").nth(9)).to_contain_text("iB", timeout=10000)  # memory
        expect(page.locator("#server-status")).to_contain_text("running")

        row.click()
        expect(page.locator("#logs")).to_contain_text(f"booted-{name}")
        expect(page.locator("#logs .stderr")).to_contain_text(f"warn-{name}")
        expect(page.locator("#logs")).to_contain_text("tick")  # live: the loop keeps printing
        expect(page.locator("#sandbox-stats")).to_contain_text("processes", timeout=10000)

        page.click("#tab-terminal")
        page.wait_for_function("window.shoalTerminal !== undefined")
        expect(page.locator("#terminal")).to_contain_text("root@sandbox", timeout=15000)
        page.locator("#terminal").click()
        page.keyboard.type("echo $((6*7))-from-xterm; tput cols\n")
        expect(page.locator("#terminal")).to_contain_text("42-from-xterm", timeout=10000)
        cols = page.evaluate("window.shoalTerminal.cols")
        expect(page.locator("#terminal")).to_contain_text(str(cols))  # tput cols = xterm size

        page.click("#tab-files")
        expect(page.locator("#cwd")).to_have_text("/")
        page.locator("#file-rows tr[data-name='srv']").click()
        page.locator("#file-rows tr[data-name='data']").click()
        expect(page.locator("#cwd")).to_have_text("/srv/data")
        with page.expect_download() as dl:
            page.locator("#file-rows tr[data-name='greeting.txt']").click()
        assert Path(dl.value.path()).read_text() == "hello\n"
        page.set_input_files("#upload", str(upload))
        expect(page.locator("#file-rows tr[data-name='upload-me.txt']")).to_be_visible()
        got = _sdk(env, f"print(shoal.Sandbox.from_id('{sid}').filesystem.read_text("
                        "'/srv/data/upload-me.txt'))")
        assert got == "uploaded from the browser"
        page.screenshot(path=str(tmp_path / "sandbox.png"))  # proves it renders; not kept

        page.click("nav a[data-view='volumes']")
        page.locator("#volumes tr[data-name='dash-vol']").click()
        page.locator("#file-rows tr[data-name='docs']").click()
        with page.expect_download() as dl:
            page.locator("#file-rows tr[data-name='readme.txt']").click()
        assert Path(dl.value.path()).read_text() == "volume-bytes"
        page.set_input_files("#upload", str(upload))
        expect(page.locator("#file-rows tr[data-name='upload-me.txt']")).to_be_visible()
        confirm["accept"] = False
        page.locator("#file-rows tr[data-name='readme.txt'] button").click()  # confirm: dismissed
        page.wait_for_timeout(500)
        expect(page.locator("#file-rows tr[data-name='readme.txt']")).to_have_count(1)
        confirm["accept"] = True
        page.locator("#file-rows tr[data-name='readme.txt'] button").click()  # confirm: accepted
        expect(page.locator("#file-rows tr[data-name='readme.txt']")).to_have_count(0)

        page.click("nav a[data-view='images']")
        page.locator("#images tbody tr").first.click()
        expect(page.locator("#layers tbody tr").first).to_contain_text("iB")

        page.click("nav a[data-view='volumes']")
        page.locator("#volumes tr[data-name='dash-vol'] button").click()
        expect(page.locator("#volumes tr[data-name='dash-vol']")).to_have_count(0)

        _bad_terminal_frame(base, sid)  # the server logs a warning about it, with a request id
        warned = [e for e in httpx.get(base + "/errors", headers={"authorization": f"Bearer {TOKEN}"}
                                       ).json() if f"terminal on {sid} ended" in e["message"]]
        assert warned and warned[0]["request_id"] and warned[0]["level"] == "warning"
        page.click("nav a[data-view='errors']")
        expect(page.locator("#errors")).to_contain_text(f"terminal on {sid} ended",
                                                        timeout=10000)

        page.goto(base + f"/#/sandbox/{sid}")
        expect(page.locator("#sandbox-state")).to_have_text("running")
        confirm["accept"] = False
        page.click("#stop-sandbox")
        page.wait_for_timeout(500)
        expect(page.locator("#sandbox-state")).to_have_text("running")
        confirm["accept"] = True
        page.click("#stop-sandbox")
        expect(page.locator("#sandbox-state")).to_have_text("terminated (137)", timeout=15000)
        browser.close()
    _sdk(env, f"shoal.Sandbox.from_id('{sid}').terminate()")
