"""The trio_cable client: an Action Cable / AnyCable client for Trio programs.

Reconnects with backoff and jitter (:mod:`~trio_cable.client.backoff`), honours the server's
advice (``reconnect: false``, ``reconnect_after``, ``Retry-After``), subscribes one at a time by
default, and on the extended protocols resumes sessions and fetches missed messages through
``history``; stored broadcasts reach the program in offset order, once: a gap is held and
fetched with ``history`` (:mod:`~trio_cable.client.state`).

::

    from trio_cable.client import open_cable

    async with open_cable("ws://localhost:8080/cable") as cable:
        room = await cable.subscribe("ChatChannel", {"room": "lobby"})
        await room.perform("speak", {"text": "hello"})
        async for message in room:
            print(message.data)
"""

from trio_cable.client.backoff import STRATEGIES, Backoff, BackoffTimer, compute_delay
from trio_cable.client.cable import (
    Cable,
    CableClosed,
    CableError,
    CableEvent,
    Message,
    MessagesDropped,
    MessagesMissing,
    SubscribeTimeout,
    Subscription,
    SubscriptionRejected,
    open_cable,
)
from trio_cable.client.sse import EventStream, open_event_stream

__all__ = [
    "STRATEGIES",
    "Backoff",
    "BackoffTimer",
    "Cable",
    "CableClosed",
    "CableError",
    "CableEvent",
    "EventStream",
    "Message",
    "MessagesDropped",
    "MessagesMissing",
    "SubscribeTimeout",
    "Subscription",
    "SubscriptionRejected",
    "compute_delay",
    "open_cable",
    "open_event_stream",
]
