"""Optional dependencies of the benchmarks: one clear line naming the extra, not a traceback.

The suite needs packages the server does not (the ``bench`` extra of pyproject, and
``coredis`` / ``hypothesis`` for the rollout and fuzz harnesses).  Every harness checks what
it needs before it starts a process (:func:`require`, :func:`require_tool`), and
:func:`bench.run_main` turns a :class:`MissingDependency` -- or a ``ModuleNotFoundError`` of
one of these packages met later -- into ``python -m bench: matplotlib is needed for plots:
pip install -e '.[bench]'`` and exit status 2.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

#: Module -> (the extra of pyproject that installs it, what the benchmarks use it for).
OPTIONAL: dict[str, tuple[str, str]] = {
    "matplotlib": ("bench", "plots"),
    "rich": ("bench", "progress bars (or pass --quiet)"),
    "picows": ("bench", "the load generator and the picows target"),
    "uvloop": ("bench", "the load generator and the asyncio targets"),
    "psutil": ("bench", "server memory and file descriptor samples"),
    "aiohttp": ("bench", "the aiohttp target"),
    "websockets": ("bench", "the websockets target and the micro benchmark"),
    "py-spy": ("bench", "profiles"),
    "coredis": ("redis", "the Redis broker (rollout)"),
    "hypothesis": ("dev", "the fuzz campaign"),
}


class MissingDependency(Exception):
    """An optional package (or tool) that a benchmark needs is not installed."""

    def __init__(self, name: str, purpose: str | None = None, install: str | None = None):
        extra, default_purpose = OPTIONAL.get(name, ("bench", "this benchmark"))
        self.name = name
        self.install = install or f"pip install -e '.[{extra}]'"
        super().__init__(f"{name} is needed for {purpose or default_purpose}: {self.install}")


def available(module: str) -> bool:
    """Whether *module* can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or ``sys.modules[x] = None``
        return False


def require(*modules: str, purpose: str | None = None) -> None:
    """Raise :class:`MissingDependency` for the first of *modules* that is not installed."""
    for module in modules:
        if not available(module):
            raise MissingDependency(module, purpose)


def find_tool(name: str) -> str | None:
    """The path of the program *name*: on ``PATH``, next to this interpreter, or in /usr/sbin."""
    for candidate in (shutil.which(name), Path(sys.executable).with_name(name),
                      Path("/usr/sbin") / name):  # fmt: skip
        if candidate and Path(candidate).exists():
            return str(candidate)
    return None


def require_tool(name: str, purpose: str | None = None, install: str | None = None) -> str:
    """The path of the program *name*, or :class:`MissingDependency`."""
    path = find_tool(name)
    if path is None:
        raise MissingDependency(name, purpose, install)
    return path


def from_import_error(exc: ModuleNotFoundError) -> MissingDependency | None:
    """The :class:`MissingDependency` behind *exc*, if it is one of :data:`OPTIONAL`."""
    root = (exc.name or "").split(".")[0]
    return MissingDependency(root) if root in OPTIONAL else None
