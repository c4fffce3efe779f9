"""The fuzz campaign: every target round-robin, time-sliced, until the time is up."""

from __future__ import annotations

import gc
import random
import re
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.errors import HypothesisWarning

from bench.fuzz.checks import (
    COMPILED,
    SlowInput,
    check_command,
    check_frames,
    check_publications,
)
from bench.fuzz.live import LiveServer, health_check, judge_connection, run_connection
from bench.fuzz.strategies import (
    LIVE_BASES,
    as_payload,
    command_payloads,
    expand_batch,
    live_connections,
    mutated_frame_streams,
    publication_bodies,
    random_mutant,
)
from trio_cable.protocol import cable

#: Longest repr of a failing input kept in the results (enough for any generated input).
MAX_EXAMPLE_REPR = 1 << 20
#: Cheap random mutants checked around every hypothesis example of the decoder targets.
MUTANTS_PER_EXAMPLE = 16
#: CPU budget of one check in the campaign: SLOW_BASE_S + SLOW_PER_BYTE_S x input size.  Linear
#: code stays orders of magnitude below it (a JSON decode of 80 KiB takes about a millisecond);
#: superlinear code (the event loop is blocked meanwhile) goes over it.  CPU time of this
#: thread, not wall time, so that a busy machine does not make false alarms.
SLOW_BASE_S = 0.25
SLOW_PER_BYTE_S = 10e-6


@dataclass
class Failure:
    """One distinct failure: where, what, and an input that shows it."""

    target: str
    error: str
    example: str
    seed: int | None = None
    count: int = 1

    def key(self) -> tuple[str, str]:
        """Failures with the same target and first line (numbers aside) are the same."""
        first = self.error.splitlines()[0] if self.error else ""
        return self.target, re.sub(r"\d+", "N", first.split(" on the mutant ")[0])[:120]


@dataclass
class TargetStats:
    """Examples run (and inputs checked: examples plus their cheap mutants), time spent and
    outcome labels of one target."""

    examples: int = 0
    inputs: int = 0
    max_cpu_ms: float = 0.0
    max_cpu_bytes: int = 0
    seconds: float = 0.0
    runs: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)


@dataclass
class Campaign:
    """State of a running campaign."""

    deadline: float
    workdir: Path
    live_batch: int = 16
    stats: dict[str, TargetStats] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    server: LiveServer | None = None
    #: The ``--tls-cert`` server the TLS stalls go to (``None`` without trustme).
    tls_server: LiveServer | None = None
    tls_fd_baseline: int | None = None
    live_samples: list[dict[str, float]] = field(default_factory=list)
    fd_baseline: int | None = None
    rss_baseline: float | None = None
    log_problems: Counter[str] = field(default_factory=Counter)
    harness_errors: Counter[str] = field(default_factory=Counter)
    failing_input: bytes | None = None
    connections: Counter[str] = field(default_factory=Counter)
    health_checks: int = 0
    started: float = field(default_factory=time.monotonic)
    progress: bool = True

    def record(self, target: str, error: str, example: str, seed: int | None) -> None:
        failure = Failure(target, error, example[:MAX_EXAMPLE_REPR], seed)
        for known in self.failures:
            if known.key() == failure.key():
                known.count += 1
                return
        self.failures.append(failure)
        if self.progress:
            print(f"[fuzz] FAILURE in {target}: {error.splitlines()[0][:300]}", file=sys.stderr)

    # -- in-process targets ------------------------------------------------------------------

    def _in_process(self, name: str, strategy: st.SearchStrategy[Any],
                    check: Callable[[Any], str], examples: int) -> None:  # fmt: skip
        stats = self.stats.setdefault(name, TargetStats())
        last: dict[str, Any] = {}
        run_seed = random.getrandbits(64)

        @hypothesis_seed(run_seed)
        # No shrinking in the campaign: a slow input (the failure it looks for besides
        # exceptions) makes every shrink step slow too; the failing input is recorded as is,
        # and tests/test_fuzz.py (which does shrink) reproduces it.
        @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck), print_blob=False)  # fmt: skip
        @given(value=strategy)
        def run(value: Any) -> None:
            if time.monotonic() > self.deadline + 30:
                return  # out of time: let hypothesis finish quickly
            stats.examples += 1
            try:
                stats.outcomes[check(value)] += 1
            except BaseException as exc:
                # The whole input that failed: a cheap mutant when one did, else the example.
                last["value"] = value if self.failing_input is None else self.failing_input
                self.failing_input = None
                last["error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                last["tb"] = traceback.format_exc(limit=6)
                raise

        start = time.monotonic()
        try:
            run()
        except Exception:
            if last:
                self.record(name, last["error"] + "\n" + last["tb"], repr(last["value"]), run_seed)
        stats.seconds += time.monotonic() - start
        stats.runs += 1

    @staticmethod
    def _timed(stats: TargetStats, check: Callable[[Any], str], value: Any, size: int) -> str:
        """Run one check, track its CPU time, and fail it past the budget."""
        start = time.thread_time()
        label = check(value)
        cpu = time.thread_time() - start
        if cpu * 1000 > stats.max_cpu_ms:
            stats.max_cpu_ms, stats.max_cpu_bytes = cpu * 1000, size
        budget = SLOW_BASE_S + SLOW_PER_BYTE_S * size
        if cpu > budget:
            # A slow input is slow every time; a garbage collection of the campaign's own heap
            # (hundreds of ms, counted as this thread's CPU) happens once.  Time it again with
            # the collector off, and fail only if it is still over budget.
            gc.disable()
            try:
                start = time.thread_time()
                check(value)
                again = time.thread_time() - start
            finally:
                gc.enable()
            if again > budget:
                raise SlowInput(f"{cpu * 1000:.0f} ms, then {again * 1000:.0f} ms of CPU for "
                                f"{size} bytes (budget {budget * 1000:.0f} ms)")  # fmt: skip
            stats.outcomes["over budget once (a GC pause), in budget again"] += 1
        return label

    def _with_mutants(self, name: str, check: Callable[[bytes], str], codec: str,
                      data: bytes, rng_seed: int) -> str:  # fmt: skip
        """Check *data*, then :data:`MUTANTS_PER_EXAMPLE` cheap mutants of it."""
        stats = self.stats[name]
        label = self._timed(stats, check, data, len(data))
        stats.inputs += 1
        rng = random.Random(rng_seed)
        for _ in range(MUTANTS_PER_EXAMPLE):
            mutant = random_mutant(data, rng, codec)
            try:
                stats.outcomes[self._timed(stats, check, mutant, len(mutant))] += 1
            except BaseException as exc:
                self.failing_input = mutant
                raise AssertionError(f"{exc!r} on the mutant {mutant[:2000]!r}") from exc
            stats.inputs += 1
        return label

    def decode_target(self, codec_name: str, examples: int) -> None:
        codec = cable.JSON if codec_name == "json" else cable.MSGPACK
        name = f"decode-{codec_name}"
        strategy = st.tuples(command_payloads(codec_name), st.integers(0, 3),
                             st.integers(0, 2**32))  # fmt: skip

        def check(v: tuple[bytes, int, int]) -> str:
            data, kind, rng_seed = v
            return self._with_mutants(
                name, lambda d: check_command(codec, as_payload(d, kind)), codec_name, data,
                rng_seed,
            )  # fmt: skip

        self._in_process(name, strategy, check, examples)

    def publications_target(self, examples: int) -> None:
        strategy = st.tuples(publication_bodies(), st.integers(0, 3), st.integers(0, 2**32))

        def check(v: tuple[bytes, int, int]) -> str:
            data, kind, rng_seed = v
            return self._with_mutants(
                "publications", lambda d: check_publications(as_payload(d, kind)), "json", data,
                rng_seed,
            )  # fmt: skip

        self._in_process("publications", strategy, check, examples)

    def frames_target(self, examples: int) -> None:
        strategy = st.tuples(
            mutated_frame_streams(),
            st.lists(st.integers(0, 200_000), max_size=12),
            st.sampled_from([0, 10, 125, 126, 300, 4096, 65535, 65536, 1048576]),
            st.booleans(),
        )

        def check(v: tuple[bytes, list[int], int, bool]) -> str:
            stats = self.stats["frames"]
            stats.inputs += 1
            return self._timed(stats, lambda w: check_frames(*w), v, len(v[0]))

        self._in_process("frames", strategy, check, examples)

    # -- live target ---------------------------------------------------------------------------

    def live_target(self, batches: int) -> None:
        import trio

        stats = self.stats.setdefault("live", TargetStats())
        if self.server is None or not self.server.alive():
            if self.server is not None:
                self.record("live", f"server process exited with {self.server.popen.returncode}"
                            if self.server.popen else "server gone", "", None)  # fmt: skip
                self.server.restarts += 1
            self.server = self.server or LiveServer(self.workdir)
            self.server.start()
            problem = trio.run(health_check, self.server.port, 0)
            if problem:
                self.record("live", "server unhealthy right after start: " + problem, "", None)
            time.sleep(0.5)
            rss, fds = self.server.usage()
            self.fd_baseline, self.rss_baseline = fds, rss
        if self.tls_server is None or not self.tls_server.alive():
            self._start_tls_server()
        server = self.server
        last: dict[str, Any] = {}
        run_seed = random.getrandbits(64)

        @hypothesis_seed(run_seed)
        @settings(max_examples=batches, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck), print_blob=False)  # fmt: skip
        @given(bases=st.lists(live_connections(), min_size=LIVE_BASES, max_size=LIVE_BASES),
               variant_seed=st.integers(0, 2**32))  # fmt: skip
        def run(bases: list[dict[str, Any]], variant_seed: int) -> None:
            if time.monotonic() > self.deadline + 30 or not server.alive():
                return
            batch = expand_batch(bases, self.live_batch, random.Random(variant_seed))
            stats.examples += 1
            stats.inputs += len(batch)
            self.health_checks += 1
            serial = self.health_checks
            problems = trio.run(self._live_batch, server.port, batch, serial)
            for spec, reason in problems:
                last["value"] = spec
                self.record("live", reason, repr(spec), run_seed)

        start = time.monotonic()
        try:
            run()
        except Exception as exc:
            self.harness_errors[f"{type(exc).__name__}: {exc}"[:200]] += 1
        stats.seconds += time.monotonic() - start
        stats.runs += 1

    def _start_tls_server(self) -> None:
        try:
            import trustme  # noqa: F401  (a dev dependency, as hypothesis is)
        except ImportError:
            return
        if self.tls_server is not None:
            self.record("live", f"TLS server exited with {self.tls_server.popen.returncode}"
                        if self.tls_server.popen else "TLS server gone", "", None)  # fmt: skip
        tls_dir = self.workdir / "tls"
        tls_dir.mkdir(exist_ok=True)
        self.tls_server = LiveServer(tls_dir, tls=True)
        self.tls_server.start()
        time.sleep(0.5)
        self.tls_fd_baseline = self.tls_server.usage()[1]

    async def _live_batch(self, port: int, batch: list[dict[str, Any]],
                          serial: int) -> list[tuple[Any, str]]:  # fmt: skip
        import trio

        problems: list[tuple[Any, str]] = []
        outcomes: list[tuple[dict[str, Any], dict[str, Any]]] = []

        tls_port = self.tls_server.port if self.tls_server is not None else None

        async def one(spec: dict[str, Any]) -> None:
            try:
                outcomes.append((spec, await run_connection(port, spec, tls_port)))
            except Exception as exc:  # a bug of this harness, not of the server
                self.harness_errors[f"{type(exc).__name__}: {exc}"[:200]] += 1

        async with trio.open_nursery() as nursery:
            for spec in batch:
                nursery.start_soon(one, spec)
        for spec, outcome in outcomes:
            self.connections[self._label(outcome)] += 1
            self.stats["live"].outcomes[self._label(outcome)] += 1
            reason = judge_connection(spec, outcome)
            if reason:
                problems.append((spec, reason))
        assert self.server is not None
        if not self.server.alive():
            problems.append((None, f"server died (exit {self.server.popen.poll()})"))  # type: ignore[union-attr]
            return problems
        problem = await health_check(port, serial)
        if problem:
            problems.append((batch, problem))
        problems.extend((None, p) for p in self._scan_log())
        await self._sample(problems)
        return problems

    @staticmethod
    def _label(outcome: dict[str, Any]) -> str:
        status = outcome.get("status")
        if "stall" in outcome:
            return f"stall {outcome['stall']}: {status}"
        if status != 101:
            return f"http {status}"
        if outcome.get("close_code") is not None:
            return f"close {outcome['close_code']}"
        if outcome.get("reset"):
            return "reset"
        return "open at end" if not outcome.get("timeout") else "timeout"

    def _scan_log(self) -> list[str]:
        assert self.server is not None
        problems = []
        servers = [self.server] + ([self.tls_server] if self.tls_server is not None else [])
        for line in (ln for srv in servers for ln in srv.new_log().splitlines()):
            if "Traceback" in line or " ERROR " in line or "CRITICAL" in line:
                key = line.split(": ", 1)[-1][:160]
                self.log_problems[key] += 1
                if self.log_problems[key] == 1:
                    problems.append(f"server log: {line.strip()[:300]}")
        return problems

    async def _sample(self, problems: list[tuple[Any, str]]) -> None:
        """RSS and fds after a batch; the fds must come back to the baseline once the batch's
        connections are gone (they may take up to the close timeout to go)."""
        import trio

        assert self.server is not None
        rss, fds = self.server.usage()
        with trio.move_on_after(5.0):
            while self.fd_baseline is not None and fds > self.fd_baseline + 2:
                await trio.sleep(0.1)
                rss, fds = self.server.usage()
        self.live_samples.append({"t": time.monotonic() - self.started, "rss_mib": rss,
                                  "fds": float(fds)})  # fmt: skip
        if self.fd_baseline is not None and fds > self.fd_baseline + 2:
            problems.append((None, f"open fds stay at {fds} after the batch (baseline "
                                   f"{self.fd_baseline})"))  # fmt: skip
        tls = self.tls_server
        if tls is not None and self.tls_fd_baseline is not None:
            if not tls.alive():
                problems.append((None, f"TLS server died (exit {tls.popen.poll()})"))  # type: ignore[union-attr]
                return
            tls_fds = tls.usage()[1]
            with trio.move_on_after(5.0):
                while tls_fds > self.tls_fd_baseline + 2:
                    await trio.sleep(0.1)
                    tls_fds = tls.usage()[1]
            if tls_fds > self.tls_fd_baseline + 2:
                problems.append((None, f"TLS server: open fds stay at {tls_fds} after the batch "
                                       f"(baseline {self.tls_fd_baseline})"))  # fmt: skip


def run_campaign(minutes: float, *, live: bool = True, progress: bool = True,
                 workdir: Path | None = None, live_batch: int = 32) -> dict[str, Any]:  # fmt: skip
    """Run every target round-robin for *minutes*; return the summary."""
    from bench.conditions import conditions

    started_wall = time.time()
    warnings.filterwarnings("ignore", category=HypothesisWarning)
    own_tmp = None
    if workdir is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="fuzz-")
        workdir = Path(own_tmp.name)
    campaign = Campaign(time.monotonic() + minutes * 60, workdir, live_batch=live_batch,
                        progress=progress)  # fmt: skip
    # Time shares: the live target is slow per example but is the only one that exercises the
    # server; the in-process targets run thousands of examples a second.
    slices: list[tuple[str, float, Callable[[int], None]]] = [
        ("decode-json", 0.15, lambda n: campaign.decode_target("json", n)),
        ("decode-msgpack", 0.15, lambda n: campaign.decode_target("msgpack", n)),
        ("publications", 0.1, campaign.publications_target),
        ("frames", 0.2, campaign.frames_target),
    ]
    if live:
        slices.append(("live", 0.4, campaign.live_target))
    per_run = {name: 50 for name, *_ in slices}
    per_run["live"] = 5
    slice_seconds = max(2.0, min(30.0, minutes * 60 / 20))
    try:
        while time.monotonic() < campaign.deadline:
            # The target furthest behind its share of the time goes next.
            name, _share, fn = min(
                slices,
                key=lambda s: campaign.stats.get(s[0], TargetStats()).seconds / s[1],
            )
            before = campaign.stats.get(name, TargetStats()).seconds
            fn(per_run[name])
            took = campaign.stats[name].seconds - before
            # Size the next run of this target to take about slice_seconds.
            if took > 0:
                scale = slice_seconds / took
                per_run[name] = max(1, min(20_000, int(per_run[name] * min(4.0, max(0.25, scale)))))
            if progress:
                total = sum(s.examples for s in campaign.stats.values())
                left = max(0.0, campaign.deadline - time.monotonic())
                print(f"[fuzz] {name}: {campaign.stats[name].examples} examples; {total} in all, "
                      f"{len(campaign.failures)} failures, {left:.0f} s left",
                      file=sys.stderr)  # fmt: skip
    finally:
        exit_code = campaign.server.stop() if campaign.server is not None else None
        if campaign.server is not None:
            campaign._scan_log()
        if campaign.tls_server is not None:
            campaign.tls_server.stop()
    summary = _summary(campaign, minutes, started_wall, exit_code)
    summary["conditions"] = conditions()
    if own_tmp is not None:
        own_tmp.cleanup()
    return summary


def _summary(campaign: Campaign, minutes: float, started_wall: float,
             exit_code: int | None) -> dict[str, Any]:  # fmt: skip
    samples = campaign.live_samples
    targets = {}
    for name, stats in campaign.stats.items():
        targets[name] = {
            "examples": stats.examples,
            "inputs": stats.inputs or stats.examples,
            "max_cpu_ms_per_input": round(stats.max_cpu_ms, 2),
            "max_cpu_input_bytes": stats.max_cpu_bytes,
            "seconds": round(stats.seconds, 1),
            "runs": stats.runs,
            "distinct_outcomes": len(stats.outcomes),
            "top_outcomes": stats.outcomes.most_common(12),
        }
    live: dict[str, Any] = {}
    if "live" in campaign.stats:
        live_stats = campaign.stats["live"]
        rss = [s["rss_mib"] for s in samples]
        fds = [s["fds"] for s in samples]
        quarter = max(1, len(rss) // 4)
        live = {
            "batches": live_stats.examples,
            "connections": sum(campaign.connections.values()),
            "frames_bytes_note": "each connection sends one mutated frame stream",
            "health_checks": campaign.health_checks,
            "connection_outcomes": campaign.connections.most_common(20),
            "rss_mib_baseline": campaign.rss_baseline,
            "rss_mib_max": max(rss) if rss else None,
            "rss_mib_first_quarter_median": _median(rss[:quarter]) if rss else None,
            "rss_mib_last_quarter_median": _median(rss[-quarter:]) if rss else None,
            "fds_baseline": campaign.fd_baseline,
            "fds_max_after_batch": max(fds) if fds else None,
            "server_restarts": campaign.server.restarts if campaign.server else 0,
            "server_exit_code": exit_code,
            "log_problems": campaign.log_problems.most_common(20),
            "harness_errors": campaign.harness_errors.most_common(10),
            "samples": samples,
        }
    examples = sum(s.examples for s in campaign.stats.values())
    return {
        "bench": "fuzz",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started_wall)),
        "minutes": minutes,
        "wall_seconds": round(time.time() - started_wall, 1),
        "examples": examples,
        "inputs": sum(s.inputs or s.examples for s in campaign.stats.values()),
        "failures": [f.__dict__ for f in campaign.failures],
        "failure_count": sum(f.count for f in campaign.failures),
        "verdict": "no failures" if not campaign.failures else "failures found",
        "compiled_speedups": COMPILED is not None,
        "targets": targets,
        "live": live,
    }


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
