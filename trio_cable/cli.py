"""Command line: ``trio-cable serve | sign | token``, and ``trio-cable --version``.

Every ``serve`` flag is generated from :data:`trio_cable.config.SETTINGS` and can also be set
as a ``TRIO_CABLE_<NAME>`` environment variable or in a TOML file (``--config``).

A user's mistake (a bad value, an unknown flag, a config file that is missing or not TOML, a
``--channels`` module that does not import, a port in use, unreadable TLS files) is one line
on stderr naming what was wrong, never a traceback: exit status 2 for configuration errors,
1 for a server that could not start (port in use), 130 for Ctrl-C before it started.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import importlib.metadata
import json
import logging
import math
import os
import sys
import sysconfig
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import trio

from trio_cable.channels import CableApp
from trio_cable.config import (
    ENV_PREFIX,
    MIN_SECRET_BYTES,
    SETTINGS,
    Config,
    ConfigError,
    load_config_and_sources,
)
from trio_cable.supervisor import Supervisor, run_worker, serve_node, worker_spec

log = logging.getLogger("trio_cable")


def package_version() -> str:
    """The installed distribution's version (``trio_cable.__version__`` in a bare checkout)."""
    try:
        return importlib.metadata.version("trio-cable")
    except importlib.metadata.PackageNotFoundError:
        from trio_cable import __version__

        return __version__


class _Parser(argparse.ArgumentParser):
    """argparse, with errors in one line (the usage of ``serve`` is forty lines long) and
    a suggestion for a misspelt flag."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            unknown = [a.split("=", 1)[0] for a in message.split(":", 1)[1].split()]
            flags = self._all_flags()
            for arg in unknown:
                close = difflib.get_close_matches(arg, flags, n=1) if arg.startswith("-") else []
                if close:
                    message += f" (did you mean {close[0]}?)"
                    break
        if "invalid choice: 'bench'" in message:
            message += " (the benchmarks run from a checkout: python -m bench)"
        self.exit(2, f"{self.prog}: {message}; see {self.prog} --help\n")

    def _all_flags(self) -> list[str]:
        flags = list(self._option_string_actions)
        for sub in _subparsers(self).values():
            flags.extend(sub._option_string_actions)
        return flags


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommands' parsers, by name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


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


def _ttl(raw: str) -> float:
    """``token --ttl``: a finite number of seconds > 0 (an expired token is of no use)."""
    try:
        ttl = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number of seconds") from None
    if not math.isfinite(ttl) or ttl <= 0:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds > 0, not {raw!r} (the token would be born expired)"
        )
    return ttl


def build_parser() -> argparse.ArgumentParser:
    """The ``trio-cable`` argument parser."""
    parser = _Parser(
        prog="trio-cable",
        description="A Trio WebSocket server for Action Cable / AnyCable clients.",
    )
    version = f"trio-cable {package_version()}"
    parser.add_argument("--version", action="version", version=version)
    sub = parser.add_subparsers(dest="command")

    serve = sub.add_parser("serve", help="run the server (the default command)")
    # `trio-cable --port 1 --version` is `trio-cable serve --port 1 --version`.
    serve.add_argument("--version", action="version", version=version)
    serve.add_argument("--config", metavar="FILE", help="TOML file with settings")
    _add_setting_flags(serve)

    sign = sub.add_parser("sign", help="sign a stream name for $pubsub / Turbo Streams")
    sign.add_argument("stream", help="the stream name")
    sign.add_argument(
        "--secret", help="streams secret [env TRIO_CABLE_STREAMS_SECRET or TRIO_CABLE_SECRET]"
    )

    token = sub.add_parser("token", help="issue a JWT identifying a connection")
    token.add_argument(
        "identifiers", help="connection identifiers as JSON, e.g. '{\"user_id\": 42}'"
    )
    token.add_argument(
        "--secret", help="JWT secret [env TRIO_CABLE_JWT_SECRET or TRIO_CABLE_SECRET]"
    )
    token.add_argument(
        "--ttl", type=_ttl, default=3600.0, help="seconds until it expires, > 0 (default 3600)"
    )
    return parser


def load_app(spec: str | None, source: str = "channels") -> CableApp:
    """Import ``module:attribute`` and turn it into a :class:`CableApp`.

    *source* says where *spec* came from (``--channels``, ``TRIO_CABLE_CHANNELS`` or
    ``cable.toml: channels``).  A module that cannot be imported, fails while importing or
    has a syntax error is a :class:`ConfigError` naming the user's file and line."""
    if not spec:
        return CableApp()
    if source.startswith("--"):
        label = f"{source} {spec}"
    elif source.startswith(ENV_PREFIX):
        label = f"{source}={spec}"
    else:
        label = f"{source} = {spec!r}"
    module_name, _, attribute = spec.partition(":")
    if not module_name:
        raise ConfigError(f"{label}: not module:attribute")
    # Like `python -m`, let the current directory's modules be found.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise ConfigError(
                f"{label}: cannot import {module_name!r}: no module named {missing!r} "
                f"(run from the directory that holds it, or set PYTHONPATH)"
            ) from None
        raise ConfigError(f"{label}: {_where(exc)}") from None
    except SyntaxError as exc:
        place = f"{_show_path(exc.filename)} line {exc.lineno}" if exc.filename else module_name
        raise ConfigError(f"{label}: {place}: {type(exc).__name__}: {exc.msg}") from None
    except Exception as exc:
        raise ConfigError(f"{label}: {_where(exc)}") from None
    obj: Any = module
    for part in (attribute or "app").split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{label}: {module_name!r} has no attribute {part!r}") from None
    try:
        return CableApp.coerce(obj)
    except TypeError as exc:
        raise ConfigError(f"{label}: {exc}") from None


def _library_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths}
    dirs.add(str(Path(__file__).resolve().parent))  # trio_cable itself
    return tuple(os.path.join(d, "") for d in dirs)


def _where(exc: BaseException) -> str:
    """``file line N: Type: message`` for an exception raised while importing: the innermost
    frame of the user's own code (not the standard library, an installed package or
    importlib's frozen frames)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<")]
    libraries = _library_dirs()
    own = [f for f in frames if not os.path.abspath(f.filename).startswith(libraries)]
    what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    chosen = own or frames
    if not chosen:
        return what
    return f"{_show_path(chosen[-1].filename)} line {chosen[-1].lineno}: {what}"


def _show_path(filename: str) -> str:
    """*filename* relative to the current directory when it is below it."""
    try:
        return str(Path(filename).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return filename


async def run_server(config: Config, app: CableApp) -> None:
    """Serve until a signal.  SIGTERM / SIGINT start a slow drain; a second signal drains
    the rest at once; a third stops without waiting."""
    from trio_cable.server import Server

    server = Server(config, app)
    server.bind()
    await serve_node(server)


def _secret(flag: str | None, *names: str) -> str:
    value = flag or next((os.environ[n] for n in names if os.environ.get(n)), None)
    if not value:
        raise ConfigError(f"a secret is needed: --secret or {' / '.join(names)}")
    if len(value.encode()) < MIN_SECRET_BYTES:
        print(f"trio-cable: warning: {_short_secret_advice(len(value.encode()))}", file=sys.stderr)
    return value


def _short_secret_advice(length: int) -> str:
    return (
        f"the secret is {length} bytes; HMAC-SHA256 keys should be {MIN_SECRET_BYTES}+ random "
        f"bytes (e.g. python -c 'import secrets; print(secrets.token_hex(32))')"
    )


def _serve(args: argparse.Namespace, argv: Sequence[str]) -> int:
    flags = {s.name: getattr(args, s.name) for s in SETTINGS}
    config, sources = load_config_and_sources(flags, toml_path=args.config)
    spec = worker_spec()
    if spec is not None:
        # The supervisor resolved the port (--port 0 is one port for all its workers).
        config = dataclasses.replace(config, port=spec.port)
    who = "" if spec is None else f"[worker {spec.index}]"
    logging.basicConfig(
        level=config.log_level.upper(),
        format=f"%(asctime)s %(levelname)s %(name)s{who}: %(message)s",
    )
    if spec is None and config.workers > 1:
        # The workers check secrets and load the application; the supervisor runs them.
        return trio.run(Supervisor(config, argv).run)
    if spec is None or spec.index == 0:
        for name in config.short_secrets():
            value: str = getattr(config, name)
            advice = _short_secret_advice(len(value.encode()))
            log.warning("%s: %s", sources.get(name, name), advice)
    app = load_app(config.channels, sources.get("channels", "channels"))
    try:
        if spec is None:
            trio.run(run_server, config, app)
        else:
            trio.run(run_worker, config, app, spec)
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``trio-cable`` and ``python -m trio_cable``."""
    parser = build_parser()
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or (
        args_list[0].startswith("-") and args_list[0] not in ("-h", "--help", "--version")
    ):
        args_list.insert(0, "serve")
    args, extras = parser.parse_known_args(args_list)
    if extras:
        # Reported by the subcommand's parser: it knows the flags to suggest and its --help.
        subparser = _subparsers(parser).get(args.command, parser)
        subparser.error(f"unrecognized arguments: {' '.join(extras)}")
    try:
        if args.command == "sign":
            from trio_cable.streams import sign_stream

            secret = _secret(args.secret, "TRIO_CABLE_STREAMS_SECRET", "TRIO_CABLE_SECRET")
            print(sign_stream(secret, args.stream))
            return 0
        if args.command == "token":
            from jwt.warnings import InsecureKeyLengthWarning

            from trio_cable.identity import issue_token

            secret = _secret(args.secret, "TRIO_CABLE_JWT_SECRET", "TRIO_CABLE_SECRET")
            try:
                identifiers = json.loads(args.identifiers)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"identifiers: not JSON: {exc}") from None
            if not isinstance(identifiers, dict):
                raise ConfigError("identifiers: must be a JSON object")
            with warnings.catch_warnings():
                # _secret said it in one line; PyJWT's InsecureKeyLengthWarning says it again.
                warnings.simplefilter("ignore", InsecureKeyLengthWarning)
                print(issue_token(secret, identifiers, ttl=args.ttl))
            return 0
        return _serve(args, args_list)
    except ConfigError as exc:
        print(f"trio-cable: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"trio-cable: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C before the server's own signal handling started (e.g. while importing).
        print("trio-cable: interrupted", file=sys.stderr)
        return 130
