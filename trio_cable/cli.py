"""Command line: ``trio-cable serve | sign | token``.

Every ``serve`` flag is generated from :data:`trio_cable.config.SETTINGS` and can also be set
as a ``TRIO_CABLE_<NAME>`` environment variable or in a TOML file (``--config``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import trio

from trio_cable.channels import CableApp
from trio_cable.config import SETTINGS, Config, ConfigError, load_config

log = logging.getLogger("trio_cable")


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    for setting in SETTINGS:
        default = setting.default
        shown = (
            "" if setting.secret or default in (None, [], "") else f" (default: {_show(default)})"
        )
        help_text = f"{setting.help}{shown} [env {setting.env}]"
        if setting.kind == "bool":
            parser.add_argument(
                setting.flag,
                dest=setting.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            parser.add_argument(setting.flag, dest=setting.name, default=None, help=help_text)


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(value)
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    """The ``trio-cable`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="trio-cable",
        description="A Trio WebSocket server for Action Cable / AnyCable clients.",
    )
    sub = parser.add_subparsers(dest="command")

    serve = sub.add_parser("serve", help="run the server (the default command)")
    serve.add_argument("--config", metavar="FILE", help="TOML file with settings")
    _add_setting_flags(serve)

    sign = sub.add_parser("sign", help="sign a stream name for $pubsub / Turbo Streams")
    sign.add_argument("stream", help="the stream name")
    sign.add_argument(
        "--secret", help="streams secret [env TRIO_CABLE_STREAMS_SECRET or TRIO_CABLE_SECRET]"
    )

    sub.add_parser(
        "bench",
        help="benchmarks and avalanche simulations (see bench/README.md)",
        add_help=False,
    )

    token = sub.add_parser("token", help="issue a JWT identifying a connection")
    token.add_argument(
        "identifiers", help="connection identifiers as JSON, e.g. '{\"user_id\": 42}'"
    )
    token.add_argument(
        "--secret", help="JWT secret [env TRIO_CABLE_JWT_SECRET or TRIO_CABLE_SECRET]"
    )
    token.add_argument(
        "--ttl", type=float, default=3600.0, help="seconds until it expires (default 3600)"
    )
    return parser


def load_app(spec: str | None) -> CableApp:
    """Import ``module:attribute`` and turn it into a :class:`CableApp`."""
    if not spec:
        return CableApp()
    module_name, _, attribute = spec.partition(":")
    if not module_name:
        raise ConfigError(f"channels: {spec!r} is not module:attribute")
    # Like `python -m`, let the current directory's modules be found.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"channels: cannot import {module_name!r}: {exc}") from None
    obj: Any = module
    for part in (attribute or "app").split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"channels: {module_name!r} has no attribute {part!r}") from None
    try:
        return CableApp.coerce(obj)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None


async def run_server(config: Config, app: CableApp) -> None:
    """Serve until a signal.  SIGTERM / SIGINT start a slow drain; a second signal drains
    the rest at once; a third stops without waiting."""
    from trio_cable.server import Server

    server = Server(config, app)
    server.bind()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)

            async def drain_then_stop() -> None:
                await server.drain()
                nursery.cancel_scope.cancel()

            received = 0
            async for signum in signals:
                received += 1
                name = signal.Signals(signum).name
                if received == 1:
                    log.info("received %s: draining (send again to hurry)", name)
                    nursery.start_soon(drain_then_stop)
                elif received == 2:
                    log.info("received %s again: disconnecting everybody now", name)
                    server.drain_now()
                else:
                    log.info("received %s a third time: stopping", name)
                    nursery.cancel_scope.cancel()
                    break


def _secret(flag: str | None, *names: str) -> str:
    value = flag or next((os.environ[n] for n in names if os.environ.get(n)), None)
    if not value:
        raise ConfigError(f"a secret is needed: --secret or {' / '.join(names)}")
    return value


def _bench(argv: list[str]) -> int:
    # The benchmark suite lives in the repository's bench/ package (installed with the
    # project); its dependencies are the `bench` extra.
    try:
        import bench
    except ImportError as exc:
        print(
            f"trio-cable bench: {exc}; install with: pip install 'trio-cable[bench]'",
            file=sys.stderr,
        )
        return 2
    return bench.main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``trio-cable`` and ``python -m trio_cable``."""
    parser = build_parser()
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or (args_list[0].startswith("-") and args_list[0] not in ("-h", "--help")):
        args_list.insert(0, "serve")
    if args_list[0] == "bench":
        return _bench(args_list[1:])
    args = parser.parse_args(args_list)
    try:
        if args.command == "sign":
            from trio_cable.streams import sign_stream

            secret = _secret(args.secret, "TRIO_CABLE_STREAMS_SECRET", "TRIO_CABLE_SECRET")
            print(sign_stream(secret, args.stream))
            return 0
        if args.command == "token":
            from trio_cable.identity import issue_token

            secret = _secret(args.secret, "TRIO_CABLE_JWT_SECRET", "TRIO_CABLE_SECRET")
            try:
                identifiers = json.loads(args.identifiers)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"identifiers: not JSON: {exc}") from None
            if not isinstance(identifiers, dict):
                raise ConfigError("identifiers: must be a JSON object")
            print(issue_token(secret, identifiers, ttl=args.ttl))
            return 0
        flags = {s.name: getattr(args, s.name) for s in SETTINGS}
        config = load_config(flags, toml_path=args.config)
        logging.basicConfig(
            level=config.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        app = load_app(config.channels)
        try:
            trio.run(run_server, config, app)
        except BaseExceptionGroup as group:
            # A broker that cannot start (e.g. Redis unreachable) fails inside the nursery:
            # report it like any other configuration error, in one line.
            config_errors, _rest = group.split(ConfigError)
            if config_errors is None:
                raise
            first: BaseException = config_errors
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        return 0
    except ConfigError as exc:
        print(f"trio-cable: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"trio-cable: {exc}", file=sys.stderr)
        return 1
