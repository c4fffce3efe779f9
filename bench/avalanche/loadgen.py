"""A load-generator process: N trio_cable clients with S subscriptions each.

Every client is a real :func:`trio_cable.client.open_cable` with the row's backoff strategy,
subscribe mode and protocol; it consumes the sequence-numbered broadcasts of its streams and
records, from the cable's own ``on_event`` hooks: connect attempts and their outcome, when it
was *ready* (welcomed and every subscription confirmed) and when it stopped being ready,
subscribe timeouts, how many subscribes it had in flight at once, and per subscription the
first sequence number seen, unique and duplicate messages.  Times are ``time.monotonic()``,
which every process on the machine shares.

Started by the orchestrator (``python -m bench.avalanche.loadgen SPEC.json``); prints a
status line (JSON) four times a second and writes its records to ``result_out`` after the
``finish`` command on stdin.
"""

from __future__ import annotations

import gc
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from trio_cable.client import (
    Backoff,
    CableClosed,
    CableEvent,
    MessagesDropped,
    MessagesMissing,
    SubscribeTimeout,
    SubscriptionRejected,
    open_cable,
)
from trio_cable.identity import issue_token
from trio_cable.streams import sign_stream

STATUS_INTERVAL = 0.25
_HISTORY_EVENTS = {"history_requested": "h", "history_confirmed": "H", "history_rejected": "r"}
MAX_RESUBSCRIBES = 50  # an application re-subscribes after a timeout; bounded here


@dataclass
class ClientRecord:
    """What one client went through."""

    index: int
    subs: int
    events: list[tuple[str, float, Any]] = field(default_factory=list)
    connected: bool = False
    confirmed: set[str] = field(default_factory=set)
    inflight: set[str] = field(default_factory=set)
    max_inflight: int = 0
    ready: bool = False
    seen: dict[int, set[int]] = field(default_factory=dict)  # stream -> sequence numbers
    duplicates: int = 0
    library_duplicates: int = 0
    gave_up: int = 0
    rejected: int = 0

    def on_event(self, event: CableEvent) -> None:
        """The cable's hook: keep the ready state and the in-flight subscribes."""
        kind = event.kind
        t = time.monotonic()
        if kind == "connecting":
            self.events.append(("c", t, event.attempt))
        elif kind == "connected":
            self.connected = True
            self.events.append(("w", t, bool(event.restored)))
        elif kind == "connect_failed":
            self.connected = False
            self.events.append(("f", t, event.status or type(event.error).__name__))
        elif kind == "disconnected":
            self.connected = False
            self.confirmed.clear()
            self.inflight.clear()
            self.events.append(("d", t, event.reason))
        elif kind == "stale":
            self.events.append(("s", t, event.reason))
        elif kind == "subscribe_sent":
            self.inflight.add(event.identifier or "")
            self.max_inflight = max(self.max_inflight, len(self.inflight))
        elif kind == "subscribed":
            self.inflight.discard(event.identifier or "")
            self.confirmed.add(event.identifier or "")
        elif kind in ("rejected", "subscribe_timeout"):
            self.inflight.discard(event.identifier or "")
            self.confirmed.discard(event.identifier or "")
            if kind == "subscribe_timeout":
                self.events.append(("t", t, None))
        elif kind in _HISTORY_EVENTS:
            # How a resume went, per subscription: asked (h), served (H) or refused (r).
            self.events.append((_HISTORY_EVENTS[kind], t, (event.identifier or "")[-60:]))
        self._update_ready(t)

    def _update_ready(self, t: float) -> None:
        ready = self.connected and len(self.confirmed) >= self.subs
        if ready != self.ready:
            self.ready = ready
            self.events.append(("R" if ready else "U", t, None))

    def received(self, stream: int, seq: int) -> None:
        seen = self.seen.setdefault(stream, set())
        if seq in seen:
            self.duplicates += 1
        else:
            seen.add(seq)

    def to_json(self) -> dict[str, Any]:
        return {
            "i": self.index,
            "events": self.events,
            "max_inflight": self.max_inflight,
            "seen": {str(k): sorted(v) for k, v in self.seen.items()},
            "duplicates": self.duplicates,
            "library_duplicates": self.library_duplicates,
            "gave_up": self.gave_up,
            "rejected": self.rejected,
        }


async def keep_subscribed(cable: Any, channel: str, params: dict[str, Any], stream: int,
                          rec: ClientRecord) -> None:  # fmt: skip
    """Subscribe, consume, and subscribe again if the subscription is given up."""
    for _ in range(MAX_RESUBSCRIBES):
        try:
            sub = await cable.subscribe(channel, params)
        except SubscribeTimeout:
            rec.gave_up += 1
            continue
        except SubscriptionRejected:
            rec.rejected += 1  # e.g. the per-connection command rate: try again a bit later
            await trio.sleep(1.0)
            continue
        except CableClosed:
            return
        try:
            while True:
                try:
                    async for message in sub:
                        data = message.data
                        if isinstance(data, dict) and isinstance(data.get("seq"), int):
                            rec.received(stream, data["seq"])
                except (MessagesDropped, MessagesMissing):
                    continue  # counted as lost by the sequence numbers
                except SubscribeTimeout:
                    # The re-subscribe after a reconnect went unanswered and the cable gave
                    # the subscription up: subscribe again, as the application would.
                    rec.gave_up += 1
                    break
                except SubscriptionRejected:
                    rec.rejected += 1
                    await trio.sleep(1.0)
                    break
                except CableClosed:
                    return
                return  # iteration ended: unsubscribed
        finally:
            rec.library_duplicates += sub.duplicates


async def run_client(index: int, spec: dict[str, Any], rec: ClientRecord) -> None:
    """One client for the whole run."""
    c = spec["client"]
    rng = random.Random(f"{spec.get('seed', 1)}-{index}")
    streams = rng.sample(range(spec["streams"]), spec["subs"])
    delay = spec["start_at"] + spec["ramp"] * rng.random() - time.monotonic()
    await trio.sleep(max(0.0, delay))
    token = None
    secret = c.get("secret")
    if c.get("jwt"):
        token = issue_token(secret, {"user_id": index}, ttl=24 * 3600)
    url = f"{spec['url']}?uid={index}"
    backoff = Backoff(c["strategy"], base=c["base"], cap=c["cap"])
    try:
        async with (
            open_cable(
                url,
                subprotocol=c["subprotocol"],
                token=token,
                backoff=backoff,
                linearized=c["linearized"],
                resume=c["resume"],
                subscribe_timeout=c["subscribe_timeout"],
                connect_timeout=c["connect_timeout"],
                ping_interval=c["ping_interval"],
                buffer_size=1000,
                on_event=rec.on_event,
                rng=rng,
            ) as cable,
            trio.open_nursery() as nursery,
        ):
            for stream in streams:
                name = f"room-{stream}"
                if c.get("signed"):
                    channel = "$pubsub"
                    params = {"signed_stream_name": sign_stream(secret, name)}
                else:
                    channel, params = "AvalancheChannel", {"stream": name}
                nursery.start_soon(keep_subscribed, cable, channel, params, stream, rec)
    except CableClosed as exc:
        rec.events.append(("x", time.monotonic(), exc.reason))


class LoopLag:
    """How late this process's own timers fire: when the load generator falls behind, its
    clients time out for reasons that have nothing to do with the server."""

    def __init__(self) -> None:
        self.window = 0.0

    async def probe(self) -> None:
        while True:
            before = time.monotonic()
            await trio.sleep(0.01)
            self.window = max(self.window, time.monotonic() - before - 0.01)


async def status(records: list[ClientRecord], lag: LoopLag) -> None:
    while True:
        ready = sum(r.ready for r in records)
        connected = sum(r.connected for r in records)
        line = {
            "event": "status",
            "t": time.monotonic(),
            "ready": ready,
            "connected": connected,
            "cpu": time.process_time(),  # this process's CPU seconds so far
            "lag": lag.window,  # worst timer lateness since the last status line
        }
        lag.window = 0.0
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()
        await trio.sleep(STATUS_INTERVAL)


async def wait_finish() -> None:
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buffer = b""
    while b"finish" not in buffer:
        chunk = await stdin.receive_some(1024)
        if not chunk:
            return
        buffer += chunk


async def amain(spec: dict[str, Any]) -> None:
    first, count = spec["clients"]
    records = [ClientRecord(first + k, spec["subs"]) for k in range(count)]
    async with trio.open_nursery() as nursery:
        lag = LoopLag()
        nursery.start_soon(lag.probe)
        nursery.start_soon(status, records, lag)
        for rec in records:
            nursery.start_soon(run_client, rec.index, spec, rec)
        await wait_finish()
        nursery.cancel_scope.cancel()
    with open(spec["result_out"], "w") as f:
        json.dump([r.to_json() for r in records], f)
    sys.stdout.write(json.dumps({"event": "done"}) + "\n")
    sys.stdout.flush()


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    # Pinned to the client core with the open-file limit raised: by bench.procs, before exec.
    # No automatic full collections: thousands of clients in one process make every full
    # collection walk all of their objects, and connecting 4,000 clients then costs 6.4 ms of
    # CPU each instead of 1.8 ms (measured 2026-11-30).  A real client process holds one
    # connection, so that cost belongs to the load generator, not to what is measured.  Young
    # cycles are still collected; the few that survive live until the run ends.
    gc.set_threshold(700, 10, 1_000_000_000)
    trio.run(amain, spec)


if __name__ == "__main__":
    main()
