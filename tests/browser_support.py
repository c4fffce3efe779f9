"""Headless Chromium for tests: a fresh profile, a page, and ``Runtime.evaluate`` over the
DevTools protocol (a WebSocket, with trio-websocket)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import itertools
import json
import shutil
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import trio
from trio_websocket import open_websocket_url

from trio_cable.client.http import request

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SKIP_REASON = "chromium is not installed (apt-get install chromium)"
#: What the test pages are served from: tests/ (assets/ and interop/node_modules/).
TESTS = Path(__file__).resolve().parent
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
]


@contextlib.contextmanager
def static_server(root: Path) -> Iterator[int]:
    """Serve *root* over HTTP on a free loopback port (a thread: the page is not under
    test, the cable server is)."""
    handler = functools.partial(QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(httpd.server_address[1])
    finally:
        httpd.shutdown()
        httpd.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".js": "text/javascript",
    }

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Page:
    """One page of a running Chromium, driven over its DevTools WebSocket."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self._ids = itertools.count(1)

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of *expression* in the page."""
        call_id = next(self._ids)
        await self.ws.send_message(
            json.dumps(
                {
                    "id": call_id,
                    "method": "Runtime.evaluate",
                    "params": {"expression": expression, "returnByValue": True},
                }
            )
        )
        while True:
            answer = json.loads(await self.ws.get_message())
            if answer.get("id") == call_id:
                result = answer["result"]
                if "exceptionDetails" in result:
                    raise RuntimeError(f"page error: {result['exceptionDetails']}")
                return result["result"].get("value")

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools method of the page (``Page.captureScreenshot`` ...): its result."""
        call_id = next(self._ids)
        await self.ws.send_message(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            answer = json.loads(await self.ws.get_message())
            if answer.get("id") == call_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return dict(answer["result"])

    async def screenshot(self) -> bytes:
        """A PNG of the page as it is drawn now."""
        import base64

        return base64.b64decode((await self.call("Page.captureScreenshot"))["data"])

    async def wait_for(self, expression: str, timeout: float = 30.0) -> Any:
        """Poll *expression* until it is truthy (an exception counts as false: the page may
        not have loaded yet); return its value."""
        guarded = f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return false; }} }})()"
        with trio.fail_after(timeout):
            while True:
                value = await self.evaluate(guarded)
                if value:
                    return value
                await trio.sleep(0.05)


@contextlib.asynccontextmanager
async def chromium_page(url: str, profile: Path) -> AsyncIterator[Page]:
    """Start Chromium on *url* with a fresh profile in *profile*; yield its page."""
    assert CHROMIUM is not None, SKIP_REASON
    proc = subprocess.Popen(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        with trio.fail_after(30):
            while not port_file.exists() or not port_file.read_text().strip():
                await trio.sleep(0.05)
            port = int(port_file.read_text().split()[0])
            page_ws = None
            while page_ws is None:
                targets = json.loads((await request(f"http://127.0.0.1:{port}/json/list")).body)
                pages = [t for t in targets if t.get("type") == "page"]
                if pages:
                    page_ws = pages[0]["webSocketDebuggerUrl"]
                else:
                    await trio.sleep(0.05)
        async with open_websocket_url(page_ws, max_message_size=64 << 20) as ws:
            yield Page(ws)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
