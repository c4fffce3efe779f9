"""Channels: the application's side of a subscription, and the built-in channels.

An application subclasses :class:`Channel` and registers it on a :class:`CableApp`::

    app = CableApp()

    @app.channel
    class ChatChannel(Channel):
        async def subscribed(self) -> None:
            self.stream_from(f"chat_{self.params['room']}")

        async def speak(self, data: dict) -> None:
            await self.broadcast(f"chat_{self.params['room']}", {"text": data["text"]})

A client message ``{"action": "speak", ...}`` calls ``speak`` with the whole decoded object.
Callbacks may be ``async def`` or plain ``def``.  This module knows nothing about sockets:
the server hands each channel a :class:`ChannelHost` to act through.
"""

from __future__ import annotations

import difflib
import inspect
import warnings
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from trio_cable.protocol.cable import is_stream_name
from trio_cable.streams import verify_stream


class Unauthorized(Exception):
    """Raise from a connect callback to refuse the connection (``reason: unauthorized``)."""


@dataclass
class ConnectRequest:
    """What a connect callback knows about a new connection."""

    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    remote: str
    subprotocol: str
    sid: str
    #: The request target as the client sent it (path and query string).
    target: str = ""

    @property
    def cookies(self) -> dict[str, str]:
        """Cookies of the request (``Cookie`` header), parsed leniently."""
        out: dict[str, str] = {}
        for part in self.headers.get("cookie", "").split(";"):
            name, sep, value = part.strip().partition("=")
            if sep:
                out[name] = value
        return out


ConnectCallback = Callable[
    [ConnectRequest], "Awaitable[Mapping[str, Any] | None] | Mapping[str, Any] | None"
]


class ChannelHost(Protocol):
    """What a channel may ask of the connection it lives on (implemented by the server)."""

    sid: str
    identifiers: dict[str, Any]

    @property
    def settings(self) -> Any: ...

    def transmit(self, identifier: str, message: Any) -> None: ...

    def add_stream(self, identifier: str, stream: str) -> None: ...

    def remove_stream(self, identifier: str, stream: str) -> None: ...

    async def broadcast(self, stream: str, data: Any) -> None: ...

    async def join_presence(self, channel: Channel, stream: str, pid: str, info: Any) -> None: ...

    async def leave_presence(self, channel: Channel) -> None: ...


class BaseChannel:
    """What every kind of channel shares: its name, the callbacks an application overrides,
    and which methods are actions.  :class:`Channel` runs in the server's process;
    :class:`trio_cable.rpc.Channel` in an application answering AnyCable RPC."""

    #: Name clients use in the identifier's ``channel`` field; defaults to the class name.
    channel_name: ClassVar[str | None] = None
    #: The class whose methods are the framework's, not actions (each kind's base sets it).
    _framework_class: ClassVar[type[BaseChannel]]

    __slots__ = ()

    @classmethod
    def name(cls) -> str:
        """The channel name clients subscribe with."""
        return cls.channel_name or cls.__name__

    def subscribed(self) -> Awaitable[None] | None:
        """Called when a client subscribes; call ``reject()`` to refuse."""
        return None

    def unsubscribed(self) -> Awaitable[None] | None:
        """Called when the subscription ends (unsubscribe or disconnect)."""
        return None

    def receive(self, data: dict[str, Any]) -> Awaitable[None] | None:
        """Called for messages whose action is ``receive`` (or that have no action)."""
        return None

    @classmethod
    def action_names(cls) -> frozenset[str]:
        """Public methods a client may call as actions: none of the framework's but
        ``receive``."""
        cached = cls.__dict__.get("_action_names")
        if cached is None:
            base = set(dir(cls._framework_class)) - {"receive"}
            cached = frozenset(
                name
                for name in dir(cls)
                if not name.startswith("_")
                and name not in base
                and callable(getattr(cls, name))
                and not isinstance(inspect.getattr_static(cls, name), (classmethod, staticmethod))
            )
            cls._action_names = cached  # type: ignore[attr-defined]
        return cached


class Channel(BaseChannel):
    """Base class of application channels.

    One instance per subscription.  ``identifier`` is the client's identifier string (echoed
    byte for byte), ``params`` its decoded fields without ``channel``, ``identifiers`` the
    connection's identity (from JWT or the connect callback).
    """

    #: False for built-ins that run no application code: they skip the callback limiter.
    app_callbacks: ClassVar[bool] = True

    # Slots keep the built-in channels small (a server holds one per subscription); an
    # application's subclass gets a __dict__ as usual unless it declares slots itself.
    __slots__ = (
        "_state",
        "host",
        "identifier",
        "params",
        "presence",
        "presence_stream",
        "rejected",
        "streams",
        "whisper_stream",
    )

    def __init__(self, host: ChannelHost, identifier: str, params: dict[str, Any]) -> None:
        self.host = host
        self.identifier = identifier
        self.params = params
        self.streams: list[str] = []
        self.rejected = False
        self._state: dict[str, Any] | None = None
        #: The stream this subscription's whispers go to (AnyCable's ``$w``), or None: it
        #: may not whisper.
        self.whisper_stream: str | None = None
        #: The stream whose presence this subscription may join and ask (``$p``), or None.
        self.presence_stream: str | None = None
        #: ``(presence id, info)`` while this subscription is present on presence_stream.
        self.presence: tuple[str, Any] | None = None

    @property
    def state(self) -> dict[str, Any]:
        """Free-form, JSON-serializable per-subscription state (kept on session resume)."""
        if self._state is None:
            self._state = {}
        return self._state

    @state.setter
    def state(self, value: dict[str, Any]) -> None:
        self._state = value

    @property
    def identifiers(self) -> dict[str, Any]:
        """The connection's identifiers."""
        return self.host.identifiers

    # -- what a channel can do -----------------------------------------------------------------

    def transmit(self, message: Any) -> None:
        """Send *message* to this subscription's client only."""
        self.host.transmit(self.identifier, message)

    def stream_from(self, stream: str, *, whisper: bool = False) -> None:
        """Deliver broadcasts on *stream* to this subscription; with *whisper*, let its
        client whisper to *stream*'s other subscribers.  Raises ``ValueError`` for a name no
        broker can carry (empty, or a lone surrogate: the subscription is rejected)."""
        if not is_stream_name(stream):
            raise ValueError(f"not a usable stream name: {stream[:100]!r}")
        if stream not in self.streams:
            self.streams.append(stream)
            self.host.add_stream(self.identifier, stream)
        if whisper:
            self.whisper_stream = stream

    def stop_stream_from(self, stream: str) -> None:
        """Stop delivering broadcasts on *stream* (and whispering to it)."""
        if stream in self.streams:
            self.streams.remove(stream)
            self.host.remove_stream(self.identifier, stream)
        if self.whisper_stream == stream:
            self.whisper_stream = None

    async def join_presence(self, stream: str, pid: str, info: Any = None) -> None:
        """Make this subscription present on *stream* as *pid* (a user id: one user's
        sessions count once) with *info* (any JSON value), and let its client ask and
        change its presence there.  *stream*'s subscribers hear ``join`` when *pid* is new.
        """
        if not is_stream_name(stream):
            raise ValueError(f"not a usable stream name: {stream[:100]!r}")
        await self.host.join_presence(self, stream, str(pid), info)

    async def leave_presence(self) -> None:
        """End this subscription's presence (its stream hears ``leave`` when it was the
        last session of its id)."""
        await self.host.leave_presence(self)

    def stop_all_streams(self) -> None:
        """Stop every stream of this subscription."""
        for stream in list(self.streams):
            self.stop_stream_from(stream)

    def reject(self) -> None:
        """Refuse the subscription (only meaningful inside :meth:`subscribed`)."""
        self.rejected = True

    async def broadcast(self, stream: str, data: Any) -> None:
        """Broadcast *data* (any JSON value) to every subscriber of *stream*."""
        await self.host.broadcast(stream, data)

    # -- dispatch ----------------------------------------------------------------------------

    async def perform(self, action: str, data: dict[str, Any]) -> bool:
        """Run the method named *action*; return False when there is no such action."""
        if action not in self.action_names():
            return False
        await maybe_await(getattr(self, action)(data))
        return True

    def sync_action(self, action: str) -> Callable[[dict[str, Any]], Any] | None:
        """The action as a plain (non-``async``) method the server may call without
        awaiting, or None (then it goes through :meth:`perform`)."""
        cls = type(self)
        if cls.perform is not Channel.perform or action not in cls.action_names():
            return None
        if inspect.iscoroutinefunction(getattr(cls, action)):
            return None
        method: Callable[[dict[str, Any]], Any] = getattr(self, action)
        return method


Channel._framework_class = Channel


async def maybe_await(value: Any) -> Any:
    """Await *value* if it is awaitable: callbacks may be sync or async."""
    if inspect.isawaitable(value):
        return await value
    return value


# -- built-in channels ----------------------------------------------------------------------


class PubSubChannel(Channel):
    """``$pubsub``: subscribe to a signed stream (or a public one when enabled), no app code."""

    __slots__ = ()
    channel_name = "$pubsub"
    app_callbacks = False

    def subscribed(self) -> None:
        settings = self.host.settings
        signed = self.params.get("signed_stream_name")
        if isinstance(signed, str):
            secret = settings.effective_streams_secret
            stream = verify_stream(secret, signed) if secret else None
        elif settings.public_streams:
            stream = self.params.get("stream_name")
            if not isinstance(stream, str):
                stream = None
        else:
            stream = None
        if stream is None or not is_stream_name(stream):
            self.reject()
        else:
            # Public streams may always whisper, signed ones with --streams-whisper.
            self.stream_from(
                stream, whisper=not isinstance(signed, str) or settings.streams_whisper
            )
            self.presence_stream = stream


class TurboStreamsChannel(PubSubChannel):
    """``Turbo::StreamsChannel``: Turbo Streams' signed stream subscriptions."""

    __slots__ = ()
    channel_name = "Turbo::StreamsChannel"

    def subscribed(self) -> None:
        secret = self.host.settings.effective_streams_secret
        signed = self.params.get("signed_stream_name")
        stream = verify_stream(secret, signed) if secret and isinstance(signed, str) else None
        if stream is None or not is_stream_name(stream):
            self.reject()
        else:
            self.stream_from(stream)


class BenchmarkChannel(Channel):
    """The channel websocket-bench style tools expect (enabled by ``--benchmark-channel``)."""

    __slots__ = ()
    app_callbacks = False

    def _stream(self) -> str:
        return f"all{self.params.get('id', '')}"

    def subscribed(self) -> None:
        self.stream_from(self._stream())

    def echo(self, data: dict[str, Any]) -> None:
        self.transmit(data)

    async def broadcast_action(self, data: dict[str, Any]) -> None:
        await self.broadcast(self._stream(), data)
        self.transmit({**data, "action": "broadcastResult"})

    def sync_action(self, action: str) -> Callable[[dict[str, Any]], Any] | None:
        return self.echo if action == "echo" else None

    async def perform(self, action: str, data: dict[str, Any]) -> bool:
        # "broadcast" is both an action name and Channel.broadcast: route it explicitly.
        if action == "broadcast":
            await self.broadcast_action(data)
            return True
        if action == "echo":
            self.echo(data)
            return True
        return False


# -- load-time checks ---------------------------------------------------------------------------

#: The callbacks the server calls by name; a method named close to one is probably a typo.
CALLBACK_NAMES = ("subscribed", "unsubscribed", "receive")


class CallbackNameWarning(UserWarning):
    """A channel method's name is a near miss of a callback name (``subscribe`` for
    ``subscribed``, ``recieve`` for ``receive``...): the server will never call it as that
    callback.  Silence a deliberate name with ``warnings.filterwarnings("ignore",
    category=CallbackNameWarning)``."""


_checked: weakref.WeakSet[type[BaseChannel]] = weakref.WeakSet()


def warn_callback_near_misses(cls: type[BaseChannel]) -> None:
    """Warn (:class:`CallbackNameWarning`, once per class) about each method of *cls* whose
    name is close to, but not, one of :data:`CALLBACK_NAMES`.  The warning points at the
    method's own file and line."""
    if cls in _checked:
        return
    _checked.add(cls)
    seen: set[str] = set()
    for klass in cls.__mro__:
        if klass in cls._framework_class.__mro__:
            continue
        for name, value in vars(klass).items():
            if name in seen or name.startswith("_") or name in CALLBACK_NAMES:
                continue
            seen.add(name)
            if hasattr(cls._framework_class, name) or not callable(value):
                continue
            close = difflib.get_close_matches(name.lower(), CALLBACK_NAMES, n=1, cutoff=0.85)
            if not close or not _callable_as(value, close[0]):
                continue  # e.g. an action ``subscribers(self, data)``: not a misspelt callback
            message = (
                f"{cls.__name__}.{name} is not a channel callback: did you mean {close[0]!r}? "
                f"The server never calls it by this name."
            )
            code = getattr(inspect.unwrap(value), "__code__", None)
            if code is None:
                warnings.warn(message, CallbackNameWarning, stacklevel=3)
            else:
                warnings.warn_explicit(
                    message,
                    CallbackNameWarning,
                    code.co_filename,
                    code.co_firstlineno,
                    module=klass.__module__,
                )


def _callable_as(method: Any, callback: str) -> bool:
    """Whether *method* accepts the arguments the server passes to *callback* (self, and
    ``data`` for ``receive``); True when its signature cannot be read."""
    try:
        signature = inspect.signature(method)
    except (TypeError, ValueError):
        return True
    args = (None, None) if callback == "receive" else (None,)
    try:
        signature.bind(*args)
    except TypeError:
        return False
    return True


@dataclass
class CableApp:
    """An application: its channels and an optional connect callback."""

    channels: dict[str, type[Channel]] = field(default_factory=dict)
    connect_callback: ConnectCallback | None = None

    def channel(self, cls: type[Channel]) -> type[Channel]:
        """Register a channel class (usable as a decorator).

        A method named like a misspelt callback (``subscribe``, ``recieve``...) gets a
        :class:`CallbackNameWarning` here, once per class."""
        if not (isinstance(cls, type) and issubclass(cls, Channel)):
            raise TypeError(f"{cls!r} is not a Channel subclass")
        warn_callback_near_misses(cls)
        self.channels[cls.name()] = cls
        return cls

    def connect(self, fn: ConnectCallback) -> ConnectCallback:
        """Register the connect callback (usable as a decorator).

        It receives a :class:`ConnectRequest` and returns the connection's identifiers (a
        dict, possibly empty) or raises :class:`Unauthorized` (returning ``False`` also
        refuses).  It is not called for connections identified by JWT or restored sessions.
        """
        self.connect_callback = fn
        return fn

    def lookup(self, name: str) -> type[Channel] | None:
        """The channel class registered under *name*."""
        return self.channels.get(name)

    @classmethod
    def coerce(cls, obj: Any) -> CableApp:
        """Accept a CableApp, a Channel subclass or an iterable of them (``--channels``)."""
        if isinstance(obj, CableApp):
            return obj
        app = cls()
        items: Iterable[Any] = [obj] if isinstance(obj, type) else obj
        try:
            for item in items:
                app.channel(item)
        except TypeError:
            raise TypeError(
                f"--channels must name a CableApp, a Channel subclass or a list of them, "
                f"not {obj!r}"
            ) from None
        return app


BUILTIN_CHANNELS: tuple[type[Channel], ...] = (PubSubChannel, TurboStreamsChannel)
