"""Issue 13, "the first hour": what a new user meets first, each over real processes, sockets and
a real redis-server where it needs one."""

from __future__ import annotations

import ast
import json
import logging
import math
import re
import sys
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.procs import ROOT, running_server
from tests.redis_support import REDIS_SERVER, SKIP_REASON, RedisProcess
from trio_cable import CableApp, Channel, Config, Server
from trio_cable.channels import CallbackNameWarning
from trio_cable.config import MIN_SECRET_BYTES
from trio_cable.identity import JWTIdentifier, issue_token
from trio_cable.protocol import frames

README = (ROOT / "README.md").read_text()

# -- near misses of callback names warn once, at load time --------------------------------------


def channel_with(method: str, params: str = "self") -> type[Channel]:
    namespace: dict[str, Any] = {"Channel": Channel}
    exec(f"class Chat(Channel):\n    async def {method}({params}):\n        pass\n", namespace)
    cls: type[Channel] = namespace["Chat"]
    return cls


@pytest.mark.parametrize(
    ("method", "params", "meant"),
    [
        ("subscribe", "self", "subscribed"),
        ("unsubscribe", "self", "unsubscribed"),
        ("subscribe_", "self", "subscribed"),
        ("Subscribed", "self", "subscribed"),
        ("unsubcribed", "self", "unsubscribed"),
        ("subscibed", "self", "subscribed"),
        ("recieve", "self, data", "receive"),
        ("Receive", "self, data", "receive"),
        ("recive", "self, data=None", "receive"),
    ],
)
def test_a_near_miss_of_a_callback_name_warns_when_registered(method, params, meant) -> None:
    cls = channel_with(method, params)
    with pytest.warns(CallbackNameWarning) as record:
        CableApp().channel(cls)
    assert len(record) == 1
    assert str(record[0].message).startswith(
        f"Chat.{method} is not a channel callback: did you mean {meant!r}?"
    )


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("subscribed", "self"),
        ("receive", "self, data"),
        ("speak", "self, data"),
        ("subscribers", "self, data"),  # an action: subscribed takes no data
        ("_subscribe", "self"),  # private helpers are nobody's callback
        ("describe", "self"),
    ],
)
def test_callbacks_and_actions_do_not_warn(method, params) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CableApp().channel(channel_with(method, params))


def test_the_warning_points_at_the_method_and_comes_once_per_class() -> None:
    class Room(Channel):
        def subscribe(self) -> None:  # the typo
            pass

    line = Room.subscribe.__code__.co_firstlineno
    with pytest.warns(CallbackNameWarning) as record:
        CableApp().channel(Room)
        CableApp.coerce([Room])  # --channels with a list: the same class again
    assert len(record) == 1
    assert (Path(record[0].filename), record[0].lineno) == (Path(__file__), line)
    # A subclass is checked on its own: it inherits the typo.
    with pytest.warns(CallbackNameWarning, match=r"Lobby\.subscribe "):
        CableApp.coerce(type("Lobby", (Room,), {}))


def test_the_warning_reaches_a_trio_cable_serve_user(tmp_path: Path) -> None:
    (tmp_path / "myapp.py").write_text(
        "from trio_cable import CableApp, Channel\n\napp = CableApp()\n\n\n@app.channel\n"
        "class ChatChannel(Channel):\n    async def unsubscribe(self):\n        pass\n"
    )
    args = ["serve", "--port", "0", "--channels", "myapp:app"]
    with running_server(args, cwd=tmp_path) as (_url, _proc, lines):
        text = "".join(lines)
        assert "myapp.py:8: CallbackNameWarning: ChatChannel.unsubscribe is not a channel " in text
        assert "did you mean 'unsubscribed'?" in text


# -- why the pure-Python kernels run ------------------------------------------------------------

_BLOCKED = (
    "import sys; sys.modules['trio_cable._speedups'] = None\n"  # as if never compiled
    "from trio_cable.cli import main; raise SystemExit(main())\n"
)


def _startup_lines(command: list[str], env: dict[str, str | None]) -> tuple[list[str], Any]:
    """Start a server, return its log up to "listening" and its /health."""
    with running_server([], env, command=command) as (url, _proc, lines):
        address = url.split("/")[2]
        with urllib.request.urlopen(f"http://{address}/health", timeout=20) as response:
            return lines, json.loads(response.read())


def test_disabled_speedups_say_they_are_disabled_not_missing() -> None:
    env: dict[str, str | None] = {"TRIO_CABLE_NO_EXTENSIONS": "1", "TRIO_CABLE_PORT": "0"}
    lines, health = _startup_lines([sys.executable, "-m", "trio_cable"], env)
    notice = [line for line in lines if "pure-Python frame kernels" in line]
    assert len(notice) == 1
    assert notice[0].rstrip().endswith("speedups disabled by TRIO_CABLE_NO_EXTENSIONS=1")
    assert health["speedups"] is False


def test_missing_speedups_say_why() -> None:
    env: dict[str, str | None] = {"TRIO_CABLE_NO_EXTENSIONS": None, "TRIO_CABLE_PORT": "0"}
    lines, health = _startup_lines([sys.executable, "-c", _BLOCKED], env)
    notice = [line for line in lines if "pure-Python frame kernels" in line]
    assert len(notice) == 1 and "speedups not compiled (" in notice[0], notice
    assert "halted; None in sys.modules" in notice[0]  # the ImportError's own words
    assert health["speedups"] is False


@pytest.mark.skipif(not frames.SPEEDUPS, reason="the Cython speedups are not compiled here")
def test_compiled_speedups_are_quiet() -> None:
    assert frames.SPEEDUPS_STATUS == "compiled"
    with running_server(["serve", "--port", "0"], env={"TRIO_CABLE_NO_EXTENSIONS": None}) as (
        _url,
        _proc,
        lines,
    ):
        assert not any("pure-Python" in line for line in lines)


# -- tokens that would be born expired ----------------------------------------------------------

SECRET = "a-test-secret-that-is-long-enough-for-hs256!"


@pytest.mark.parametrize("ttl", [0, -5, -0.0, math.nan, math.inf, -math.inf])
def test_issue_token_refuses_a_ttl_that_is_not_positive_and_finite(ttl: float) -> None:
    with pytest.raises(ValueError, match="ttl must be a finite number of seconds > 0"):
        issue_token(SECRET, {"user_id": 1}, ttl=ttl)


def test_issue_token_still_takes_short_and_no_ttls() -> None:
    for ttl in (0.5, None):
        assert JWTIdentifier(SECRET).verify(issue_token(SECRET, {"u": 1}, ttl=ttl)) == {"u": 1}


# -- the README, the examples and the repository ----------------------------------------------


def test_install_commands_work_from_a_checkout() -> None:
    sources = [README, *(p.read_text() for p in (ROOT / "trio_cable").rglob("*.py"))]
    for text in sources:
        assert "pip install 'trio-cable[" not in text  # trio-cable is on no index
        assert "pip install trio-cable" not in text
    assert "pip install -e '.[redis]'" in README
    assert "Python 3.11 or newer" in README


def test_the_readme_links_only_files_of_the_repository() -> None:
    assert "../shared" not in README
    for target in re.findall(r"\]\(((?!https?:)[^)#]+)\)", README):
        assert (ROOT / target).exists(), target
    assert "docs/architecture.md" in README
    text = (ROOT / "docs" / "architecture.md").read_text()
    assert text.startswith("# trio_cable architecture") and len(text.splitlines()) > 20


def test_license_matches_pyproject() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) 2026 the trio_cable authors\n")
    assert 'license = { text = "MIT" }' in (ROOT / "pyproject.toml").read_text()


def _string_constants(path: Path) -> list[str]:
    return [
        node.value
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]


def test_example_secrets_are_long_enough_for_pyjwt() -> None:
    # No literal secret in the README: every example reads $TRIO_CABLE_SECRET.
    assert not re.search(r"--secret\s+(?!\")\S", README)
    assert not re.search(r"Bearer [^$\s]", README.replace("Bearer <key>", ""))
    for path in (ROOT / "examples").glob("*.py"):
        for value in _string_constants(path):
            if "secret" in value and " " not in value:
                assert len(value.encode()) >= MIN_SECRET_BYTES, (path, value)
    from examples.embed import EXAMPLE_SECRET

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # InsecureKeyLengthWarning would be an error
        JWTIdentifier(EXAMPLE_SECRET).verify(issue_token(EXAMPLE_SECRET, {"u": 1}))


# -- one line per Redis event ----------------------------------------------------------------


@pytest.mark.skipif(REDIS_SERVER is None, reason=SKIP_REASON)
@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG], ids=["info", "debug"])
async def test_a_redis_outage_is_one_clear_line_per_event(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, level: int
) -> None:
    pytest.importorskip("coredis")
    from trio_cable.broker.redis import RedisBroker

    redis = RedisProcess(tmp_path)
    redis.start()
    caplog.set_level(level)

    def messages(since: int) -> list[str]:
        return [
            f"{r.levelname} {r.name}: {r.getMessage()}"
            for r in caplog.records[since:]
            if r.levelno >= logging.INFO
        ]

    async def logged(fragment: str, since: int) -> None:
        with trio.fail_after(30):
            while not any(fragment in m for m in messages(since)):
                await trio.sleep(0.02)

    try:
        async with trio.open_nursery() as nursery:
            broker = RedisBroker(redis.url, heartbeat=0.2, command_timeout=0.5, connect_timeout=0.5)
            await nursery.start(Server(Config(port=0), CableApp(), broker=broker).serve)
            mark = len(caplog.records)
            redis.stop()
            await logged("redis link lost", mark)
            redis.start()
            await logged("redis link back", mark)
            nursery.cancel_scope.cancel()
        events = messages(mark)
        assert len(events) == 2, events
        assert events[0].startswith("WARNING trio_cable.broker.redis: redis link lost (")
        assert events[1].startswith("WARNING trio_cable.broker.redis: redis link back after ")
        assert "NoneType: None" not in caplog.text
        coredis_records = [r for r in caplog.records if r.name.startswith("coredis")]
        assert all(r.levelno == logging.DEBUG for r in coredis_records)
        if level == logging.DEBUG:
            # Still there for whoever debugs, without the empty traceback.
            assert any("Connection closed unexpectedly" in r.getMessage() for r in coredis_records)
    finally:
        redis.stop()
