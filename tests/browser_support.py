"""Headless Chromium for tests (bench/browser.py drives it) and a static server for the test
pages."""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.browser import CHROMIUM, FLAGS, SKIP_REASON, Page, chromium_page

__all__ = ["CHROMIUM", "FLAGS", "SKIP_REASON", "TESTS", "Page", "chromium_page", "static_server"]

#: What the test pages are served from: tests/ (assets/ and interop/node_modules/).
TESTS = Path(__file__).resolve().parent


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
