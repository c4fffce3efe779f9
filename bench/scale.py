"""Bench: scale on one process: idle subscribed connections, loop lag, GC pauses, churn,
broadcast latency, and what a big fan-out costs another client (issue 15).

For each size (1k, 5k, 18k; ``--sizes``) a fresh ``python -m trio_cable serve`` (default 3 s
pings) gets its connections from several load-generator processes (at most
:data:`PER_LOADGEN` each, the open-file limit being 20,000 per process, each from its own
127.0.0.x address), all subscribed to one stream.  Then, each phase ``--duration`` long
(60 s; ``--quick``: 3 s):

1. **steady**: nothing but the server's pings.  Event-loop lag p50 / p99 / max, full-GC
   pauses (count, max).
2. **churn**: the same while another process connects and disconnects ``CHURN_RATE``
   (1,000) clients a second, each welcomed and subscribed.
3. **broadcasts**: ``--broadcasts`` publications (10; spaced 1 s) to every connection, each
   stamped and numbered; the load generators time them (p50 / p99 / max delivery latency to
   all connections) and check that every held connection got every one, once, in order.

Where the numbers come from:

- **Loop lag and GC pauses** are the server's own raw samples (``GET /metrics/samples``: the
  lag monitor's timer lateness every 50 ms, each full collection's pause), cut to the
  phase's window.  A revision without that endpoint (a ``--baseline`` before it) is read from
  its ``/metrics`` histograms instead, whose buckets bound the figures (``lag.source`` says
  ``histogram``: a p99 of 10 means "in the 5-10 ms bucket"); one without GC metrics has none.
  Every run also reads the histogram (``lag_buckets``, ``lag_bucket_p99_ms``): that column
  compares any two revisions by the same method.
- **The probe**, a client of its own on its own stream, sends a WebSocket ping and a
  BenchmarkChannel ``echo`` command every 10 ms (one of each outstanding) throughout and times
  the answers: measured from outside, the same way for every revision.  During the broadcast
  phase its worst round trip is what a fan-out to every connection delays another client's
  ping reply and command reply (the must-show: at most 20 ms).  It runs on the client core:
  on a busy machine its round trips carry the client's scheduling delays too, which the
  server's own loop lag over the same window (``bcast_lag_max_ms``) does not.

The load generators share the client core with the probe at a lower priority (``nice``), so
the probe's round trips are the server's delays more than the scheduler's.
"""

from __future__ import annotations

import json
import math
import os
import re
import select
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from typing import Any

from bench import procs
from bench.baseline import METRICS
from bench.loadgen.scale import stats_ms
from bench.options import Options
from bench.runner import log, rotate, serving
from bench.stats import summarize

TARGETS = ["trio_cable-cable"]
SIZES = [1000, 5000, 18000]
QUICK_SIZES = [200, 600]
DURATION = 60.0
QUICK_DURATION = 3.0
#: Connections per load-generator process: the open-file limit is 20,000 a process.
PER_LOADGEN = 9000
CHURN_RATE = 1000.0
QUICK_CHURN_RATE = 100.0
BROADCASTS, QUICK_BROADCASTS = 10, 3
SPACING, QUICK_SPACING = 1.0, 0.3
PING_INTERVAL = 3.0  # the server's default
#: The issue's limits, checked in every row (``checks``).
LIMITS = {"lag_p99_ms": 10.0, "lag_max_ms": 50.0, "churn_gc_max_ms": 50.0, "probe_max_ms": 20.0}
_CHURN_SOURCES = ",".join(f"127.0.1.{i}" for i in range(1, 17))
_SETTLE = 2.0
_LAG_BUCKETS = "trio_cable_loop_lag_seconds"
_GC_BUCKETS = "trio_cable_gc_full_pause_seconds"


class Child:
    """A load-generator child of :mod:`bench.loadgen.scale`: commands on its stdin, one JSON
    answer a line on its stdout."""

    def __init__(self, proc: procs.Proc) -> None:
        self.proc = proc
        self._buffer = b""

    def send(self, cmd: str, **fields: Any) -> None:
        stdin = self.proc.popen.stdin
        assert stdin is not None
        stdin.write(json.dumps({"cmd": cmd, **fields}).encode() + b"\n")
        stdin.flush()

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        """The next answer *event* (others are skipped); raise if the child dies or is late."""
        stdout = self.proc.popen.stdout
        assert stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                try:
                    item = json.loads(line)
                except ValueError:
                    continue
                if isinstance(item, dict) and item.pop("event", None) == event:
                    item.pop("t", None)  # when it was written
                    return item
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{self.proc.name}: no {event!r} after {timeout:.0f} s")
            ready, _w, _x = select.select([stdout], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(stdout.fileno(), 1 << 20)
                if not chunk:
                    raise RuntimeError(f"{self.proc.name} exited ({self.proc.popen.wait()})")
                self._buffer += chunk

    def ask(self, cmd: str, timeout: float, **fields: Any) -> dict[str, Any]:
        self.send(cmd, **fields)
        return self.expect(cmd, timeout)


def _spawn(stack: ExitStack, role: str, url: str, name: str, **flags: Any) -> Child:
    args = [role, "--url", url]
    for key, value in flags.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    proc = procs.start(
        procs.python("bench.loadgen.scale", *args), name=name, core=procs.cores()[1],
        nofile=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    stack.enter_context(proc)
    return Child(proc)


def shares(conns: int) -> list[int]:
    """*conns* split over as few load generators as hold them (at most PER_LOADGEN each)."""
    n = max(1, math.ceil(conns / PER_LOADGEN))
    return [conns // n + (1 if i < conns % n else 0) for i in range(n)]


# -- reading the server ------------------------------------------------------------------------


def _get(port: int, path: str) -> bytes | None:
    try:
        with urllib.request.urlopen(f"http://{procs.HOST}:{port}{path}", timeout=10) as resp:
            return bytes(resp.read())
    except urllib.error.HTTPError:
        return None


def histograms(port: int) -> dict[str, dict[float, float]]:
    """The loop-lag and GC-pause histograms of ``/metrics``: name -> {bound: cumulative}."""
    text = (_get(port, "/metrics") or b"").decode()
    out: dict[str, dict[float, float]] = {}
    for m in re.finditer(r'(?m)^(\w+)_bucket\{le="([^"]+)"\} ([0-9.e+-]+)$', text):
        name, bound, value = m.groups()
        if name in (_LAG_BUCKETS, _GC_BUCKETS):
            out.setdefault(name, {})[float(bound)] = float(value)
    return out


def _from_buckets(before: dict[float, float], after: dict[float, float]) -> dict[str, Any]:
    """p50 / p99 / max as the upper bounds of the buckets that hold them (a window's counts:
    *after* minus *before*)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0

    def upper(q: float) -> float | None:
        if not total:
            return None
        for bound, seen in zip(bounds, counts, strict=True):
            if seen >= q * total:
                return None if math.isinf(bound) else bound * 1000
        return None

    top = next((b for b, c, prev in zip(bounds, counts, [0.0, *counts], strict=False)
                if c > prev and c == total), None)  # fmt: skip
    return {
        "p50_ms": upper(0.5), "p99_ms": upper(0.99),
        "max_ms": None if top is None or math.isinf(top) else top * 1000,
        "n": int(total), "source": "histogram",
    }  # fmt: skip


class Window:
    """One phase's measurement window on the server: opened, then read."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.start = time.monotonic()
        self.before = histograms(port)

    def read(self) -> dict[str, Any]:
        """Loop lag and full-GC pauses from the window's start until now."""
        end = time.monotonic()
        raw = _get(self.port, f"/metrics/samples?since={self.start!r}")
        after = histograms(self.port)
        # The same figures from the histogram, for every revision: the like-for-like column
        # when a baseline has no raw samples.
        buckets = _from_buckets(self.before.get(_LAG_BUCKETS, {}), after.get(_LAG_BUCKETS, {}))
        if raw is not None:
            doc = json.loads(raw)
            lags = [v for t, v in doc["loop_lag_seconds"] if t <= end]
            pauses = [v for t, v in doc["gc_full_pause_seconds"] if t <= end]
            lag = {**stats_ms(lags), "source": "samples"}
            gc = {"count": len(pauses), "max_ms": stats_ms(pauses)["max_ms"] or 0.0,
                  "source": "samples"}  # fmt: skip
        else:
            lag = buckets
            if _GC_BUCKETS in after:
                g = _from_buckets(self.before.get(_GC_BUCKETS, {}), after[_GC_BUCKETS])
                gc = {"count": g["n"], "max_ms": g["max_ms"] or 0.0, "source": "histogram"}
            else:
                gc = {"count": None, "max_ms": None, "source": "not exposed by this revision"}
        return {"seconds": end - self.start, "lag": lag, "lag_buckets": buckets, "gc": gc}


# -- one run -----------------------------------------------------------------------------------


def measure(target: str, conns: int, opts: Options) -> dict[str, Any]:
    """One fresh server of *target* with *conns* held connections, through the three phases."""
    quick = opts.quick
    duration = opts.duration or (QUICK_DURATION if quick else DURATION)
    count = QUICK_BROADCASTS if quick else BROADCASTS
    spacing = QUICK_SPACING if quick else SPACING
    rate = QUICK_CHURN_RATE if quick else CHURN_RATE
    with ExitStack() as stack:
        spec, server = stack.enter_context(serving(target, ping_interval=PING_INTERVAL))
        url = f"ws://{procs.HOST}:{server.port}{spec.path}"
        probe = _spawn(stack, "probe", url, "probe")
        probe.expect("ready", 60)
        holders = [
            _spawn(stack, "hold", url, f"hold{i}", conns=n, source=f"127.0.0.{10 + i}")
            for i, n in enumerate(shares(conns))
        ]
        churner = _spawn(stack, "churn", url, "churn", source=_CHURN_SOURCES)
        t0 = time.monotonic()
        held = [h.expect("ready", 120 + conns / 50) for h in holders]
        connect_s = time.monotonic() - t0
        churner.expect("ready", 60)
        time.sleep(_SETTLE)
        steady = Window(server.port)
        time.sleep(duration)
        steady_m = steady.read()
        steady_m["probe"] = probe.ask("window", 60, spans=[[steady.start, time.monotonic()]])

        window = Window(server.port)
        churned = churner.ask("churn", duration + 120, rate=rate, seconds=duration)
        churn_m = {**window.read(), "churn": churned}
        churn_m["probe"] = probe.ask("window", 60, spans=[[window.start, time.monotonic()]])
        time.sleep(_SETTLE)

        for h in holders:
            h.ask("reset", 60)
        window = Window(server.port)
        spans = []
        for seq in range(1, count + 1):
            sent = probe.ask("broadcast", 60, seq=seq)["sent"]
            time.sleep(spacing)
            spans.append([sent, time.monotonic()])
        time.sleep(_SETTLE)  # stragglers: a broadcast still arriving is late, not missing
        bcast_m = window.read()
        bcast_m["probe"] = probe.ask("window", 60, spans=spans)
        checks = [h.ask("check", 120, first=1, last=count) for h in holders]
        latencies = sorted(v / 1000 for c in checks for v in c.pop("latencies_ms"))
        bcast_m.update(
            broadcasts=count, spacing_s=spacing, latency=stats_ms(latencies),
            delivered=len(latencies), expected=count * conns,
            **{k: sum(c[k] for c in checks) for k in
               ("complete", "closed", "out_of_order", "missing", "duplicates")},
        )  # fmt: skip
        rss = _rss(server.pid)
        for child in (probe, *holders, churner):
            child.send("stop")
    return _flatten({
        "target": target, "conns": conns, "loadgens": len(holders), "connect_s": connect_s,
        "connected": sum(h["conns"] for h in held), "rss_bytes": rss, "duration_s": duration,
        "steady": steady_m, "churn": churn_m, "broadcast": bcast_m,
    })  # fmt: skip


def _rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def _flatten(r: dict[str, Any]) -> dict[str, Any]:
    """The figures the rows, the checks and the baseline comparison use, at the top level."""
    b = r["broadcast"]
    probe = b["probe"]
    worst = max((probe[k]["max_ms"] or 0.0) for k in ("ping", "command"))
    r.update(
        lag_p50_ms=r["steady"]["lag"]["p50_ms"], lag_p99_ms=r["steady"]["lag"]["p99_ms"],
        lag_max_ms=r["steady"]["lag"]["max_ms"],
        lag_bucket_p99_ms=r["steady"]["lag_buckets"]["p99_ms"],
        lag_bucket_max_ms=r["steady"]["lag_buckets"]["max_ms"],
        steady_gc_max_ms=r["steady"]["gc"]["max_ms"],
        churn_lag_p99_ms=r["churn"]["lag"]["p99_ms"], churn_lag_max_ms=r["churn"]["lag"]["max_ms"],
        churn_gc_max_ms=r["churn"]["gc"]["max_ms"], churn_gc_count=r["churn"]["gc"]["count"],
        churn_rate=r["churn"]["churn"]["rate"],
        bcast_p50_ms=b["latency"]["p50_ms"], bcast_p99_ms=b["latency"]["p99_ms"],
        probe_max_ms=worst, bcast_lag_max_ms=b["lag"]["max_ms"],
        in_order=b["complete"] == r["conns"] and not (b["missing"] or b["duplicates"]),
    )  # fmt: skip
    r["checks"] = {
        "lag_p99": _within(r["lag_p99_ms"], LIMITS["lag_p99_ms"]),
        "lag_max": _within(r["lag_max_ms"], LIMITS["lag_max_ms"]),
        "churn_gc_max": _within(r["churn_gc_max_ms"], LIMITS["churn_gc_max_ms"]),
        "probe_max": _within(worst, LIMITS["probe_max_ms"]),
        "every_broadcast_in_order": r["in_order"],
    }
    return r


def _within(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit


def _describe(r: dict[str, Any]) -> str:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    return (
        f"scale {r['target']:22} {r['conns']:>6}c lag p50/p99/max {f(r['lag_p50_ms'])}/"
        f"{f(r['lag_p99_ms'])}/{f(r['lag_max_ms'])} ms; churn {r['churn_rate']:.0f}/s lag p99/max "
        f"{f(r['churn_lag_p99_ms'])}/{f(r['churn_lag_max_ms'])} GC max "
        f"{f(r['churn_gc_max_ms'])} ms ({r['churn_gc_count']}); broadcast p50/p99 "
        f"{f(r['bcast_p50_ms'])}/{f(r['bcast_p99_ms'])} ms, probe max {f(r['probe_max_ms'])} "
        f"ms, in order {r['in_order']}"
    )


def run(opts: Options) -> dict[str, Any]:
    """Every target x size x repeat, a fresh server for each."""
    targets = opts.pick(TARGETS)
    sizes = opts.sizes or (QUICK_SIZES if opts.quick else SIZES)
    repeats = 1 if opts.quick else opts.repeats
    samples: list[dict[str, Any]] = []
    for rep in range(repeats):
        for conns in sizes:
            for target in rotate(targets, rep):
                r = measure(target, conns, opts)
                r["repeat"] = rep
                samples.append(r)
                if opts.progress:
                    log(_describe(r))
    rows = []
    for conns in sizes:
        for target in targets:
            mine = [s for s in samples if s["conns"] == conns and s["target"] == target]
            if not mine:
                continue
            row: dict[str, Any] = {"target": target, "conns": conns}
            for key in (*METRICS["scale"][1], "lag_p50_ms", "churn_lag_p99_ms", "churn_lag_max_ms",
                        "bcast_p50_ms", "bcast_lag_max_ms", "churn_rate",
                        "steady_gc_max_ms"):  # fmt: skip
                row[key] = summarize(s[key] for s in mine)
            row["in_order"] = all(s["in_order"] for s in mine)
            row["checks"] = {
                k: None if any(s["checks"][k] is None for s in mine)
                else all(s["checks"][k] for s in mine)
                for k in mine[0]["checks"]
            }  # fmt: skip
            rows.append(row)
    return {"bench": "scale", "limits": LIMITS, "rows": rows, "samples": samples}
