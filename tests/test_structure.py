"""The shape of the package: no import cycles, and the light modules stay light.

An application (Django, Flask, a bot) imports the client, ``streams`` or ``identity``; none of
them may drag in the server, and the client must import on platforms without epoll.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "trio_cable"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    # The compiled kernels (built from _speedups/_speedups.pyx) import only the pure twin and
    # protocol.codes; both import nothing that could lead back.
    modules["trio_cable._speedups"] = ROOT / "_speedups" / "_speedups.pyx"
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The most specific trio_cable module *name* refers to (a submodule, or the package
    whose attribute it is); None outside trio_cable."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every trio_cable module *module* imports, anywhere in it: at module level, under
    ``if TYPE_CHECKING:``, and inside functions."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    if path.suffix == ".pyx":
        return {"trio_cable._speedups_py", "trio_cable.protocol.codes"}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from a import b` imports the module a.b when there is one, else a.
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name, modules)
            if target is not None and target != module:
                found.add(target)
    return found


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles_type_checking_imports_included() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # Importing a submodule runs its packages' __init__ first; that is not an edge (it holds
    # for every module), so the check is about what each module's own code imports.
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph) or [])


def test_the_cycle_finder_finds_cycles() -> None:
    # The check above passes on an acyclic graph; make sure it would fail on a cyclic one.
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    modules = _modules()
    assert "trio_cable.server.session" in _imports(
        "trio_cable.server.node", modules["trio_cable.server.node"], modules
    )


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_client_and_streams_import_without_epoll() -> None:
    # macOS and Windows have no select.epoll: the client needs none of the server.
    result = _run(
        "import select; del select.epoll\n"
        "import trio_cable.client, trio_cable.streams\n"
        "import sys\n"
        "print(sorted(m for m in sys.modules if m.startswith('trio_cable.server')))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_server_imports_without_epoll() -> None:
    result = _run(
        "import select; del select.epoll\n"
        "from trio_cable import Config, Server\n"
        "from trio_cable.server.reactor import reactor_available\n"
        "print(reactor_available())"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_the_server_serves_on_the_wait_readable_path() -> None:
    # Trio itself needs epoll on Linux, so there the path of platforms without it is taken
    # with TRIO_CABLE_NO_EPOLL=1 (CI runs the protocol, drain/resume and Autobahn suites so).
    code = (
        "import trio\n"
        "from trio_cable import Config, Server\n"
        "from trio_cable.client import open_cable\n"
        "async def main():\n"
        "    async with trio.open_nursery() as nursery:\n"
        "        server = await nursery.start(\n"
        "            Server(Config(port=0, public_streams=True)).serve)\n"
        "        print(server.reactor is None)\n"
        "        async with open_cable(server.url) as cable:\n"
        "            sub = await cable.subscribe('$pubsub', {'stream_name': 's'})\n"
        "            await server.broadcast('s', {'n': 1})\n"
        "            with trio.fail_after(30):\n"
        "                async for message in sub:\n"
        "                    print(message.data)\n"
        "                    break\n"
        "        nursery.cancel_scope.cancel()\n"
        "trio.run(main)\n"
    )
    env = {**os.environ, "TRIO_CABLE_NO_EPOLL": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "{'n':", "1}"]


@pytest.mark.parametrize("module", ["trio_cable.streams", "trio_cable.identity"])
def test_what_web_apps_import_stays_light(module: str) -> None:
    # Signing streams and minting tokens in a Django or Flask app loads no server, no Trio,
    # no HTTP parser and no metrics library.
    result = _run(
        f"import {module}, sys\n"
        "heavy = ('trio', 'h11', 'prometheus_client', 'trio_cable.server', 'trio_cable.client')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_client_loads_no_server() -> None:
    result = _run(
        "import trio_cable.client, sys\n"
        "heavy = ('prometheus_client', 'trio_cable.server', 'trio_cable.broker')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_top_level_names_still_import() -> None:
    import trio_cable

    assert trio_cable.Server.__name__ == "Server"
    assert set(trio_cable.__all__) >= {"CableApp", "Channel", "Config", "Server", "__version__"}
    with pytest.raises(AttributeError):
        _ = trio_cable.NoSuchThing  # type: ignore[attr-defined]
