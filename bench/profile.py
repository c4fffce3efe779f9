"""Profile the trio_cable server under load with py-spy and rank where its CPU time goes.

``python -m bench profile --scenario echo-cable`` samples the server process (not the
load generator) while a load runs, then reports self and inclusive time by
``file:function``.  py-spy skips idle samples, so the shares are of on-CPU time.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from typing import Any

from bench import procs
from bench.deps import require_tool
from bench.options import Options
from bench.runner import load, log, serving

SCENARIOS: dict[str, dict[str, Any]] = {
    "echo-raw": {"target": "trio_cable", "mode": "echo", "conns": 100, "size": 64},
    "echo-cable": {"target": "trio_cable-cable", "mode": "echo", "conns": 100, "size": 64},
    "broadcast": {"target": "trio_cable-cable", "mode": "broadcast", "conns": 4000, "count": 20},
}
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _short(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3", f"{procs.ROOT}/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return path


def _frame_name(raw: str) -> str:
    m = _FRAME.match(raw.strip())
    if m is None:
        return raw.strip()
    return f"{_short(m.group('file'))}:{m.group('func')}"


def summarize_collapsed(text: str, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares by ``file:function`` from py-spy's raw format."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";")]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            incl[name] += count
    share = (lambda c: round(100.0 * c / total, 1)) if total else (lambda c: 0.0)
    return {
        "samples": total,
        "self": [(name, share(c)) for name, c in own.most_common(top)],
        "inclusive": [(name, share(c)) for name, c in incl.most_common(top)],
    }


def run_profile(scenario: str, seconds: float, opts: Options) -> dict[str, Any]:
    """Sample the server for *seconds* under the *scenario* load."""
    spy = require_tool("py-spy")
    spec_params = dict(SCENARIOS[scenario])
    target, mode = spec_params.pop("target"), spec_params.pop("mode")
    opts.profiles_dir.mkdir(parents=True, exist_ok=True)
    raw_path = opts.profiles_dir / f"{scenario}.collapsed.txt"
    with serving(target) as (spec, server):
        cmd = [
            spy, "record", "--pid", str(server.pid), "--rate", "250", "--format", "raw",
            "--duration", str(int(seconds) + 3), "--nonblocking", "-o", str(raw_path),
        ]  # fmt: skip
        spy_proc = procs.start(cmd, name="py-spy", stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            result = load(
                mode, spec, server, timeout=seconds + 120, duration=seconds, **spec_params
            )
        finally:
            try:
                spy_proc.popen.wait(timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                spy_proc.kill()
    summary = summarize_collapsed(raw_path.read_text() if raw_path.exists() else "")
    if opts.progress:
        log(f"profile {scenario}: {summary['samples']} samples")
        for name, pct in summary["self"][:15]:
            log(f"  {pct:5.1f}%  {name}")
    return {"scenario": scenario, "load": result, **summary}


def run(opts: Options, scenarios: list[str] | None = None, seconds: float = 5.0) -> dict[str, Any]:
    """Every scenario (or the given ones)."""
    if opts.quick:
        seconds = min(seconds, 1.0)
    names = scenarios or list(SCENARIOS)
    return {"bench": "profile", "profiles": [run_profile(n, seconds, opts) for n in names]}
