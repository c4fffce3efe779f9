"""The conditions of a run: machine, versions, date, CPU pinning."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from typing import Any

from bench.procs import ROOT, cores

_PACKAGES = (
    "trio", "trio-websocket", "wsproto", "picows", "aiohttp", "websockets", "uvloop", "psutil",
)  # fmt: skip


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_rev() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True, text=True, timeout=5, check=False,
            cwd=ROOT,
        )  # fmt: skip
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def conditions() -> dict[str, Any]:
    """A dict describing where and with what the benchmarks ran."""
    from trio_cable.protocol.frames import SPEEDUPS

    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "missing"
    server_core, client_core = cores()
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{_cpu_model()}, {os.cpu_count()} vCPU, {mem_gib:.1f} GiB, "
        f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "trio_cable": _git_rev(),
        "speedups_compiled": SPEEDUPS,
        "versions": versions,
        "pinning": (
            f"server on core [{server_core}], load generator on core [{client_core}]"
            if server_core is not None and client_core is not None
            else "none (fewer than 2 cores)"
        ),
    }
