"""The live target: a real ``python -m trio_cable serve`` process fed hostile connections.

Each example of the campaign is a batch of connections (:func:`~bench.fuzz.strategies.
live_connections`) that send mutated upgrade requests, frames and commands in random chunks
over real sockets (:func:`run_connection`); :func:`judge_connection` holds each outcome to the
bad-input table's promises, and after every batch :func:`health_check` makes sure a
well-behaved client still connects, subscribes and receives a broadcast.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import procs
from bench.fuzz.checks import FrameErrorT, parse_events
from bench.fuzz.strategies import chunked
from trio_cable import _speedups_py

FUZZ_SERVER_FLAGS = [
    "--public-streams", "--benchmark-channel", "--broadcast-key", "fuzz-key",
    "--echo-path", "/echo", "--max-message-size", "65536", "--handshake-timeout", "2",
    "--close-timeout", "1", "--ping-interval", "1", "--pong-timeout", "5",
    "--sessions-ttl", "20", "--history-ttl", "20", "--log-level", "warning",
    "--max-pending-handshakes", "256",
]  # fmt: skip

#: Close codes the bad-input table lets the server send (besides echoing the client's own).
ALLOWED_CLOSE_CODES = frozenset({1000, 1001, 1002, 1007, 1008, 1009})
#: A stalled request must be answered and closed within this (--handshake-timeout 2, then
#: the answer's --close-timeout 1, and room for a busy machine).
STALL_LIMIT = 10.0
#: A client's FIN must end its connection within this.
FIN_LIMIT = 5.0


@dataclass
class LiveServer:
    """A ``trio-cable serve`` process for the live target, with its log in a file (with
    *tls*: ``--tls-cert``, a throwaway certificate, for the TLS stalls)."""

    workdir: Path
    port: int = 0
    proc: procs.Proc | None = None
    log_offset: int = 0
    restarts: int = 0
    tls: bool = False

    @property
    def log_path(self) -> Path:
        return self.workdir / ("server-tls.log" if self.tls else "server.log")

    def _tls_flags(self) -> list[str]:
        import trustme

        cert = trustme.CA().issue_cert(procs.HOST)
        cert_path, key_path = self.workdir / "cert.pem", self.workdir / "key.pem"
        cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
        cert.private_key_pem.write_to_path(str(key_path))
        return ["--tls-cert", str(cert_path), "--tls-key", str(key_path)]

    @property
    def popen(self) -> subprocess.Popen[bytes] | None:
        return self.proc.popen if self.proc is not None else None

    def start(self) -> None:
        """Start the server on a free port and wait until it accepts."""
        self.port = procs.free_port()
        tls = self._tls_flags() if self.tls else []
        cmd = procs.python("trio_cable", "serve", "--host", procs.HOST, "--port", str(self.port),
                           *FUZZ_SERVER_FLAGS, *tls)  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = procs.start(cmd, name="fuzz server", port=self.port, stdout=log,
                                    stderr=log)  # fmt: skip

    def stop(self) -> int | None:
        """SIGTERM (then SIGKILL); returns the exit status."""
        return self.proc.stop(timeout=20) if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def new_log(self) -> str:
        """The log lines written since the last call."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_offset)
                text = f.read()
        except FileNotFoundError:
            return ""
        self.log_offset += len(text)
        return text.decode("utf-8", "replace")

    def usage(self) -> tuple[float, int]:
        """(RSS in MiB, open file descriptors) of the server process."""
        import psutil

        assert self.proc is not None
        proc = psutil.Process(self.proc.pid)
        return proc.memory_info().rss / 2**20, proc.num_fds()


async def stall_connection(port: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Send the start of a request and nothing more: the server must answer (or not: a TLS
    stall gets no HTTP) and close the connection within :data:`STALL_LIMIT`."""
    import trio

    from bench import wsraw

    outcome: dict[str, Any] = {"status": None, "close_code": None, "messages": 0,
                               "sent_codes": set(), "stall": spec["stall"]}  # fmt: skip
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError as exc:
        outcome["error"] = f"connect: {exc}"
        return outcome
    started = trio.current_time()
    got = b""
    try:
        with trio.move_on_after(STALL_LIMIT) as scope:
            await stream.send_all(spec["data"])
            while chunk := await stream.receive_some(65536):
                got += chunk
        if scope.cancelled_caught:
            outcome["stall_open"] = True
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        outcome["reset"] = True
    finally:
        await trio.aclose_forcefully(stream)
    outcome["status"] = wsraw.status_of(got) if got else "closed"
    outcome["closed_after_s"] = round(trio.current_time() - started, 2)
    return outcome


async def run_connection(
    port: int, spec: dict[str, Any], tls_port: int | None = None
) -> dict[str, Any]:
    """Play one :func:`live_connections` spec against the server (a ``tls-*`` stall against
    the TLS server on *tls_port*); report what came back."""
    import trio

    from bench import wsraw

    if "stall" in spec:
        tls = spec["stall"].startswith("tls-")
        if tls and tls_port is None:
            return {"status": "skipped", "close_code": None, "messages": 0, "sent_codes": set()}
        return await stall_connection(tls_port if tls else port, spec)
    outcome: dict[str, Any] = {"status": None, "close_code": None, "messages": 0}
    data = spec["data"]
    # The close codes the server will see from this client (parsed as the server parses them):
    # the server may echo those back.
    sent_codes: set[int] = {
        int.from_bytes(event[1][:2], "big")
        for event in parse_events(_speedups_py, [data], max_message_size=65536)
        if event[0] == 8 and len(event[1]) >= 2
    }
    outcome["sent_codes"] = sent_codes
    with trio.move_on_after(4.0 + (FIN_LIMIT if spec["end"] == "fin" else 0)) as scope:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError as exc:
            outcome["error"] = f"connect: {exc}"
            return outcome
        try:
            if "raw_request" in spec:
                await stream.send_all(spec["raw_request"])
            else:
                await stream.send_all(wsraw.upgrade_request(
                    "127.0.0.1", port, path=spec["path"], subprotocols=spec["subprotocols"],
                    query=spec["query"]))  # fmt: skip
            head, rest = await wsraw.read_head(stream)
            outcome["status"] = wsraw.status_of(head)
            if outcome["status"] != 101:
                return outcome
            ws = wsraw.RawWS(stream, wsraw.header_value(head, "Sec-WebSocket-Protocol"), head)
            if rest:
                ws.parser.feed(rest)

            async def reader() -> None:
                try:
                    while await ws.recv() is not None:
                        outcome["messages"] += 1
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    outcome["reset"] = True
                except FrameErrorT as exc:  # the server sent something our parser refuses
                    outcome["bad_server_frame"] = str(exc)

            async def writer() -> None:
                try:
                    for chunk in chunked(data, spec["cuts"]):
                        await stream.send_all(chunk)
                        if spec["pause_ms"]:
                            await trio.sleep(spec["pause_ms"] / 1000)
                    if spec["end"] == "close":
                        await ws.send(wsraw.OP_CLOSE, b"\x03\xe8")
                        sent_codes.add(1000)
                    elif spec["end"] == "fin":  # data, then FIN (issue 14 item 8)
                        await stream.send_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    outcome["reset"] = True

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await writer()
                if spec["end"] == "fin" and not outcome.get("reset"):
                    with trio.move_on_after(FIN_LIMIT) as fin_scope:
                        while not ws.closed and not outcome.get("reset"):
                            await trio.sleep(0.02)
                    outcome["fin_ignored"] = fin_scope.cancelled_caught
                elif spec["end"] != "abort":
                    with trio.move_on_after(1.0):
                        while not ws.closed and not outcome.get("reset"):
                            await trio.sleep(0.02)
                nursery.cancel_scope.cancel()
            outcome["close_code"] = ws.close_code
        except wsraw.HandshakeRefused as exc:
            outcome["status"] = exc.status or "eof"
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            outcome["reset"] = True
        finally:
            await trio.aclose_forcefully(stream)
    if scope.cancelled_caught:
        outcome["timeout"] = True
    return outcome


def judge_connection(spec: dict[str, Any], outcome: dict[str, Any]) -> str | None:
    """Why an outcome breaks the bad-input table's promises, or ``None``."""
    status = outcome.get("status")
    if isinstance(status, int) and status >= 500 and status != 503:
        return f"HTTP {status}"
    code = outcome.get("close_code")
    if code is not None and code not in ALLOWED_CLOSE_CODES and code not in outcome["sent_codes"]:
        return f"close code {code}"
    if "bad_server_frame" in outcome:
        return f"server sent an invalid frame: {outcome['bad_server_frame']}"
    if outcome.get("stall_open"):
        return f"stalled request ({outcome['stall']}) still open after {STALL_LIMIT:.0f} s"
    if outcome.get("fin_ignored"):
        return f"the client's FIN did not end the connection within {FIN_LIMIT:.0f} s"
    return None


async def health_check(port: int, serial: int) -> str | None:
    """A well-behaved client connects, subscribes and receives a broadcast; the reason if not."""
    import trio

    from bench import wsraw

    stream_name = f"health-{serial}"
    identifier = json.dumps({"channel": "$pubsub", "stream_name": stream_name})
    with trio.move_on_after(10.0):
        try:
            ws = await wsraw.connect("127.0.0.1", port, subprotocols=["actioncable-v1-ext-json"])
        except (OSError, wsraw.HandshakeRefused) as exc:
            return f"health: connect failed: {exc}"
        try:
            welcome = await ws.expect(lambda m: m.get("type") in ("welcome", "disconnect"))
            if not welcome or welcome.get("type") != "welcome":
                return f"health: no welcome ({welcome})"
            await ws.send_command({"command": "subscribe", "identifier": identifier})
            confirm = await ws.expect(lambda m: m.get("identifier") == identifier)
            if not confirm or confirm.get("type") != "confirm_subscription":
                return f"health: subscription not confirmed ({confirm})"
            body = json.dumps({"stream": stream_name, "data": json.dumps({"n": serial})}).encode()
            status, _ = await wsraw.http_request(
                "127.0.0.1", port, "POST", "/_broadcast", body,
                {"Authorization": "Bearer fuzz-key"},
            )  # fmt: skip
            if status != 201:
                return f"health: broadcast answered {status}"
            got = await ws.expect(lambda m: m.get("identifier") == identifier and "message" in m)
            if not got or got.get("message") != {"n": serial}:
                return f"health: broadcast not received ({got})"
            await ws.close()
            return None
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            return f"health: connection broke: {exc!r}"
        finally:
            await ws.aclose()
    return "health: timed out (10 s)"
