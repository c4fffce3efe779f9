"""Executors: how a session's commands reach the application.

The session decides *what* happens (the protocol); the executor runs the application's part
of it: identify a connection, confirm or reject a subscription, run an action, say goodbye.
:class:`ChannelExecutor` runs in-process :class:`~trio_cable.channels.Channel` classes on this
Trio loop; :class:`~trio_cable.server.rpc_executor.RpcExecutor` asks an application over
AnyCable's HTTP RPC, behind the same :class:`Executor` protocol.

Two policies live here, once:

* **Concurrency.** Every application callback runs under one server-wide
  ``trio.CapacityLimiter`` (``--callback-concurrency``, shrunk by adaptive admission while the
  loop lags), so a reconnect storm queues in front of the application instead of stampeding
  its database.  Built-in channels that run no application code skip it.
* **Errors.** A callback that raises is logged with the connection and the callback's name
  and counted (``callback_errors_total``); it costs that command, never the connection or the
  server.  What a failure means is the caller's: a refused connection, a rejected
  subscription, an action that did nothing.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from trio_cable.channels import (
    CableApp,
    Channel,
    ChannelHost,
    ConnectRequest,
    Unauthorized,
    maybe_await,
)
from trio_cable.metrics import Metrics
from trio_cable.protocol.codes import CloseCode, DisconnectReason
from trio_cable.server.transport import Work

__all__ = ["ChannelExecutor", "Connected", "Connection", "Executor", "Refused"]

log = logging.getLogger("trio_cable.executor")


@dataclass(frozen=True, slots=True)
class Connected:
    """The application accepted a connection."""

    identifiers: dict[str, Any]
    #: Messages for the client, sent after its welcome.
    transmissions: Sequence[dict[str, Any]] = ()


@dataclass(frozen=True, slots=True)
class Refused:
    """The application did not accept a connection: the session closes it so."""

    reason: DisconnectReason = DisconnectReason.UNAUTHORIZED
    reconnect: bool = False
    code: int = CloseCode.NORMAL
    #: The ``reconnect_after`` advice (ms), for a refusal that says "come back later".
    reconnect_after_ms: int | None = None


#: What an executor's connect says: the unauthorized refusal is the common one.
UNAUTHORIZED = Refused()


class Connection(ChannelHost, Protocol):
    """What an executor may use of a connection (the session implements it)."""

    #: The client's IP address.
    ip: str
    #: The executor's own state for this connection (from :meth:`Executor.open`).
    app_state: Any

    @property
    def is_open(self) -> bool:
        """True until the connection starts closing."""
        ...

    def send(self, message: dict[str, Any]) -> None:
        """Send an Action Cable message to the client."""

    def close(
        self,
        reason: DisconnectReason | None = None,
        *,
        reconnect: bool = True,
        code: int = CloseCode.NORMAL,
        reconnect_after_ms: int | None = None,
    ) -> None:
        """End the connection (after the command being handled)."""


class Executor(Protocol):
    """What a session needs from the application side."""

    #: The server-wide limit on application callbacks running at once.
    limiter: trio.CapacityLimiter

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The executor's background work, for the node's nursery (started once)."""

    async def flush(self) -> None:
        """Return once the work owed for ended connections is done (a drain waits for it,
        within its shutdown timeout)."""

    def open(self, request: ConnectRequest, conn: Connection) -> Any:
        """The executor's state for a new connection (kept as ``conn.app_state``)."""

    def resume(self, state: Any, saved: Any) -> Any:
        """The state of a restored connection: *state* from :meth:`open`, updated with what
        :meth:`saved` returned for the session that is being restored."""

    def saved(self, state: Any) -> Any:
        """*state* as plain data stored with a resumable session (None: nothing to keep)."""

    def channel(
        self, host: ChannelHost, identifier: str, name: str, params: dict[str, Any]
    ) -> Channel | None:
        """A new subscription object for channel *name*, or None for an unknown channel.
        No application code runs (a restored session uses this without callbacks)."""
        ...

    async def connect(self, request: ConnectRequest, conn: Connection) -> Connected | Refused:
        """Identify a new connection (not called for JWT-identified or restored ones)."""
        ...

    async def subscribe(self, channel: Channel) -> bool:
        """Run the subscription's ``subscribed``; True when it was confirmed."""
        ...

    async def confirmed(self, channel: Channel) -> None:
        """The client got its ``confirm_subscription`` (and the history it asked): do what
        must come after it (an RPC answer's presence join)."""

    async def unsubscribe(self, channel: Channel) -> None:
        """Run ``unsubscribed`` (its streams are already stopped)."""

    def perform_now(self, channel: Channel, action: str, data: dict[str, Any]) -> bool | Work:
        """Run an action without awaiting, if it can be: True when it ran, False when it
        must go through :meth:`perform` instead (nothing ran), or the work still to await
        (a plain function that returned an awaitable)."""
        ...

    async def perform(self, channel: Channel, action: str, data: dict[str, Any]) -> None:
        """Run an action."""

    async def disconnect(self, conn: Connection, channels: Sequence[Channel]) -> None:
        """The connection has ended; *channels* were its subscriptions (their streams are
        already stopped), most recent first."""


class ChannelExecutor:
    """Runs in-process channel classes: the registry and its callbacks."""

    def __init__(
        self,
        app: CableApp,
        channels: Mapping[str, type[Channel]],
        limiter: trio.CapacityLimiter,
        metrics: Metrics,
    ) -> None:
        """*channels* maps the names clients subscribe with to channel classes (the
        built-ins and the application's)."""
        self.app = app
        self.channels = dict(channels)
        self.limiter = limiter
        self.metrics = metrics

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()  # nothing runs in the background

    async def flush(self) -> None:
        return None  # callbacks run before a connection is gone

    def open(self, request: ConnectRequest, conn: Connection) -> None:
        return None  # in-process callbacks read the request itself

    def resume(self, state: Any, saved: Any) -> None:
        return None

    def saved(self, state: Any) -> None:
        return None

    def lookup(self, name: str) -> type[Channel] | None:
        """The channel class clients reach with ``"channel": name``."""
        return self.channels.get(name)

    def channel(
        self, host: ChannelHost, identifier: str, name: str, params: dict[str, Any]
    ) -> Channel | None:
        cls = self.channels.get(name)
        return None if cls is None else cls(host, identifier, params)

    # -- callbacks ---------------------------------------------------------------------------

    async def _call(
        self, limited: bool, what: Callable[[], str], fn: Callable[[], Any]
    ) -> tuple[bool, Any]:
        """Run one callback (under the limiter when *limited*): ``(True, result)``, or
        ``(False, None)`` when it raised (logged as *what*, counted)."""
        try:
            if limited:
                async with self.limiter:
                    return True, await maybe_await(fn())
            return True, await maybe_await(fn())
        except Exception:
            log.exception("%s raised", what())
            self.metrics.callback_errors_total += 1
            return False, None

    async def connect(self, request: ConnectRequest, conn: Connection) -> Connected | Refused:
        callback = self.app.connect_callback
        if callback is None:
            return Connected({})

        async def identify() -> Any:
            try:
                return await maybe_await(callback(request))
            except Unauthorized:
                return False  # a refusal, not an error

        ok, result = await self._call(True, lambda: f"{conn!r}: connect callback", identify)
        if not ok or result is False:
            return UNAUTHORIZED
        return Connected(dict(result or {}))

    async def subscribe(self, channel: Channel) -> bool:
        ok, _ = await self._call(
            type(channel).app_callbacks,
            lambda: f"{channel.host!r}: {type(channel).__name__}.subscribed",
            channel.subscribed,
        )
        return ok and not channel.rejected

    async def confirmed(self, channel: Channel) -> None:
        return None  # an in-process channel joins presence itself

    async def unsubscribe(self, channel: Channel) -> None:
        await self._call(
            type(channel).app_callbacks,
            lambda: f"{channel.host!r}: {type(channel).__name__}.unsubscribed",
            channel.unsubscribed,
        )

    async def perform(self, channel: Channel, action: str, data: dict[str, Any]) -> None:
        ok, found = await self._call(
            type(channel).app_callbacks,
            lambda: f"{channel.host!r}: {type(channel).__name__}.{action}",
            lambda: channel.perform(action, data),
        )
        if ok and not found:
            log.info("%r: %s has no action %r", channel.host, type(channel).__name__, action[:100])

    async def disconnect(self, conn: Connection, channels: Sequence[Channel]) -> None:
        for channel in channels:
            await self.unsubscribe(channel)

    def perform_now(self, channel: Channel, action: str, data: dict[str, Any]) -> bool | Work:
        method = channel.sync_action(action)
        if method is None:
            return False
        token = None
        if type(channel).app_callbacks:
            # The limiter without waiting: when it is full, the action goes the slow way.
            token = object()
            try:
                self.limiter.acquire_on_behalf_of_nowait(token)
            except trio.WouldBlock:
                return False
        try:
            result = method(data)
        except Exception:
            log.exception("%r: %s.%s raised", channel.host, type(channel).__name__, action)
            self.metrics.callback_errors_total += 1
            result = None
        finally:
            if token is not None:
                self.limiter.release_on_behalf_of(token)
        if result is not None and inspect.isawaitable(result):
            awaitable: Awaitable[Any] = result

            async def rest() -> None:
                # A plain function that returned a coroutine: the connection's task awaits
                # it (outside the limiter, as the function itself already returned).
                await self._call(
                    False,
                    lambda: f"{channel.host!r}: {type(channel).__name__}.{action}'s awaitable",
                    lambda: awaitable,
                )

            return rest
        return True
