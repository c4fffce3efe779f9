"""Broadcast fan-out: a trigger connection asks the server to broadcast; every client times it.

Raw peers broadcast a text message that starts with ``!b``; trio_cable is asked through
BenchmarkChannel's ``broadcast`` action, exactly what websocket-bench does.  The message
carries the trigger's ``perf_counter_ns`` so every recipient measures its own latency.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from bench.loadgen.client import Client, cable_action

STAMP = re.compile(rb'"t":(\d+)')
_RAW_SIZE = 98


def trigger_message(dialect: str, t: int, payload: object = None) -> bytes:
    """The message that makes the server broadcast a payload stamped with *t* (and, if
    given, carrying *payload*, any JSON value)."""
    if dialect == "cable":
        if payload is None:
            return cable_action("broadcast", t=t)
        return cable_action("broadcast", t=t, payload=payload)
    if payload is not None:
        return b'!b{"t":%d,"payload":%s}' % (t, json.dumps(payload).encode())
    head = b'!b"t":%d,' % t
    return head + b"x" * max(0, _RAW_SIZE - len(head))


_WORDS = (
    "live", "score", "update", "match", "goal", "team", "player", "minute", "replay",
    "comment", "great", "save", "corner", "penalty", "crowd", "half", "time", "win",
)  # fmt: skip


def realistic_payload(size: int, seed: int = 7) -> list[dict[str, object]]:
    """A feed of chat-like records, about *size* bytes of JSON: the repetitive keys and
    varied values of what real-time apps broadcast.  Another *seed*, other values (the same
    seed, the same payload: runs are reproducible)."""
    import random as _random

    rng = _random.Random(seed)
    words = _WORDS
    items: list[dict[str, object]] = []
    while len(json.dumps(items)) < size:
        n = len(items)
        items.append({
            "id": 100_000 + n * 37,
            "user": {"id": rng.randrange(10**6), "name": f"user{rng.randrange(10**4)}",
                     "avatar": f"https://cdn.example.com/avatars/{rng.randrange(10**6)}.png"},
            "text": " ".join(rng.choice(words) for _ in range(rng.randrange(6, 16))),
            "reactions": {"like": rng.randrange(100), "love": rng.randrange(20)},
            "created_at": f"2026-12-02T13:{n % 60:02d}:{rng.randrange(60):02d}Z",
        })  # fmt: skip
    return items


@dataclass
class Fanout:
    """Tracks broadcasts in flight and every recipient's latency."""

    dialect: str
    #: Bytes of JSON each broadcast carries besides its stamp (0: none), different values
    #: every time, as a live feed's are (a server that keeps a compression context across
    #: messages would otherwise be credited with compressing the same message again).
    payload_size: int = 0
    _sent: int = 0
    latencies_ns: list[int] = field(default_factory=list)
    pending: dict[int, int] = field(default_factory=dict)
    done: dict[int, asyncio.Event] = field(default_factory=dict)
    frame_bytes: int = 0

    def on_data(self, _client: Client, payload: bytes) -> None:
        now = time.perf_counter_ns()
        if self.dialect == "cable" and b"broadcastResult" in payload:
            return
        m = STAMP.search(payload)
        if m is None:
            return
        t = int(m.group(1))
        left = self.pending.get(t)
        if left is None:
            return  # timed out already
        self.latencies_ns.append(now - t)
        self.frame_bytes = len(payload)
        if left <= 1:
            del self.pending[t]
            self.done.pop(t).set()
        else:
            self.pending[t] = left - 1

    async def broadcast(self, trigger: Client, recipients: int, timeout: float) -> int:
        """Send one broadcast and wait for every recipient; return how many did not get it."""
        t = time.perf_counter_ns()
        while t in self.pending:
            t += 1
        event = asyncio.Event()
        self.pending[t], self.done[t] = recipients, event
        payload = None
        if self.payload_size:
            self._sent += 1
            payload = realistic_payload(self.payload_size, seed=self._sent)
        trigger.send_text(trigger_message(self.dialect, t, payload))
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
        except TimeoutError:
            self.done.pop(t, None)
            return self.pending.pop(t, 0)
        return 0


def latency_summary(latencies_ns: list[int]) -> dict[str, Any]:
    """p50 / p95 / p99 / max in milliseconds."""
    from bench.stats import percentile

    ordered = sorted(latencies_ns)
    ms = [v / 1e6 for v in ordered]
    return {
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "max_ms": ms[-1] if ms else None,
        "samples": len(ms),
    }
