"""Run ``trio-cable`` as a real process and find the URL it listens on."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cli_command() -> list[str]:
    """The installed console script when there is one, else ``python -m trio_cable``."""
    script = Path(sys.executable).with_name("trio-cable")
    return [str(script)] if script.exists() else [sys.executable, "-m", "trio_cable"]


@contextmanager
def running_server(
    args: Sequence[str],
    env: dict[str, str | None] | None = None,
    timeout: float = 20.0,
    *,
    command: Sequence[str] | None = None,
    cwd: Path = ROOT,
) -> Iterator[tuple[str, subprocess.Popen[str], list[str]]]:
    """Start ``trio-cable <args>`` (or ``<command> <args>``, e.g. an example program) in
    *cwd*; yield (url, process, start-up log lines).

    *env* adds to this process's environment; a value of ``None`` removes the variable."""
    full_env = dict(os.environ)
    for name, value in (env or {}).items():
        if value is None:
            full_env.pop(name, None)
        else:
            full_env[name] = value
    proc = subprocess.Popen(
        [*(cli_command() if command is None else command), *args],
        cwd=cwd,
        env=full_env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        url = None
        for line in proc.stderr:
            lines.append(line)
            match = re.search(r"trio_cable listening on (wss?://\S+)", line)
            if match:
                url = match.group(1)
                break
        if url is None:
            proc.wait(timeout=timeout)
            raise AssertionError("server did not start:\n" + "".join(lines))
        yield url, proc, lines
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
