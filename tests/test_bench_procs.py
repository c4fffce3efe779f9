"""bench.procs, the one process helper of every harness: cores, pinning, the open-file limit,
ports, starting a child and waiting until it listens, stopping it, and the JSON-lines protocol
of the avalanche and soak children.  Real processes; bounded by events, not timings."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from bench import procs

ROOT = Path(__file__).resolve().parents[1]


def _http_server(port: int) -> list[str]:
    return [sys.executable, "-m", "http.server", "--bind", procs.HOST, str(port)]


def test_cores_are_the_first_and_last_available() -> None:
    server, client = procs.cores()
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        assert (server, client) == (None, None)
    else:
        assert (server, client) == (available[0], available[-1]) and server != client


def test_start_waits_until_listening_then_stop_ends_it() -> None:
    port = procs.free_port()
    server_core, _client = procs.cores()
    proc = procs.start(_http_server(port), name="http", port=port, core=server_core, nofile=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        assert proc.alive() and proc.port == port
        with socket.create_connection((procs.HOST, port), timeout=5):
            pass
        if server_core is not None:
            # Pinned before exec, not by the child itself.
            assert os.sched_getaffinity(proc.pid) == {server_core}
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        soft = next(ln for ln in limits.splitlines() if ln.startswith("Max open files")).split()[3]
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        assert int(soft) == (hard if hard != resource.RLIM_INFINITY else 1 << 20)
    finally:
        status = proc.stop(timeout=10)
    assert not proc.alive() and status is not None


def test_start_reports_a_child_that_dies_before_listening() -> None:
    port = procs.free_port()
    with pytest.raises(RuntimeError, match="exited early with code 3"):
        procs.start([sys.executable, "-c", "raise SystemExit(3)"], port=port)


def test_children_run_from_the_checkout_with_it_on_pythonpath(tmp_path: Path) -> None:
    # `bench` is not installed: children find it through the environment procs gives them,
    # wherever the orchestrator was started.
    out = procs.run_json(
        [sys.executable, "-c", "import json, bench, os; "
         "print(json.dumps({'bench': bench.__file__, 'cwd': os.getcwd()}))"],
        timeout=30,
    )  # fmt: skip
    assert Path(out["bench"]).resolve() == ROOT / "bench" / "__init__.py"
    assert Path(out["cwd"]).resolve() == ROOT


def test_a_tree_given_as_cwd_and_pythonpath_wins_over_the_checkout(tmp_path: Path) -> None:
    # How a baseline revision's server runs (bench.baseline): its trio_cable, not ours, even
    # though ours is installed in editable mode.
    (tmp_path / "trio_cable").mkdir()
    (tmp_path / "trio_cable" / "__init__.py").write_text("")
    proc = procs.start(
        [sys.executable, "-c", "import trio_cable; print(trio_cable.__file__)"],
        cwd=tmp_path, pythonpath=[tmp_path], stdout=subprocess.PIPE,
    )  # fmt: skip
    stdout, _ = proc.popen.communicate(timeout=30)
    assert Path(stdout.decode().strip()).resolve() == tmp_path / "trio_cable" / "__init__.py"


def test_raise_nofile_never_lowers_the_limit() -> None:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert procs.raise_nofile(16) == soft == resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def test_listen_sockets_share_a_port() -> None:
    port = procs.free_port()
    first = procs.listen_socket(port)
    second = procs.listen_socket(port)  # SO_REUSEPORT: a node handoff in one process
    try:
        assert first.getsockname() == second.getsockname() == (procs.HOST, port)
    finally:
        first.close()
        second.close()


async def test_json_lines_of_a_trio_child() -> None:
    code = (
        "from bench.procs import emit; import sys; emit('ready', port=1); "
        "print('not json'); emit('bye', n=2)"
    )
    process = await procs.open_trio([sys.executable, "-c", code])
    assert process.stdout is not None
    with trio.fail_after(30):
        events = [e async for e in procs.json_lines(process.stdout)]
        await process.wait()
    assert [(e["event"], e.get("port"), e.get("n")) for e in events] == [
        ("ready", 1, None),
        ("bye", None, 2),
    ]
    assert all(isinstance(e["t"], float) for e in events)
