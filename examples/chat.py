"""A small chat application: run it from the repository's root with

    trio-cable serve --channels examples.chat:app

and connect to ``ws://127.0.0.1:8080/cable?name=ann``.  The query parameter ``name`` is the
name the others see; without it the connection is a guest (``guest-1a2b3c``), and a name
longer than 32 characters is refused (``{"type":"disconnect","reason":"unauthorized"}``):
that is where a real application checks a session cookie instead.

A client subscribes with ``{"channel": "ChatChannel", "room": "lobby"}`` and performs
``speak`` with ``{"text": "..."}``; everybody in the room receives
``{"from": "<name>", "text": "..."}``.
"""

from __future__ import annotations

from typing import Any

from trio_cable import CableApp, Channel, ConnectRequest, Unauthorized

app = CableApp()

MAX_NAME = 32


@app.connect
def connect(request: ConnectRequest) -> dict[str, Any]:
    """The connection's identifiers: ``{"name": ...}`` from ``?name=``, else a guest name.

    A real application checks a cookie or a header against its session store here and
    raises :class:`Unauthorized` for strangers.  (Clients that present a JWT skip this
    callback entirely.)"""
    name = request.query.get("name", "").strip()
    if len(name) > MAX_NAME:
        raise Unauthorized()
    return {"name": name or f"guest-{request.sid[:6]}"}


@app.channel
class ChatChannel(Channel):
    """One chat room per ``room`` parameter; ``speak`` broadcasts to the room."""

    def _stream(self) -> str:
        return f"chat:{self.params.get('room', 'lobby')}"

    async def subscribed(self) -> None:
        room = self.params.get("room")
        if not isinstance(room, str) or not room:
            self.reject()
            return
        self.stream_from(self._stream())

    async def speak(self, data: dict[str, Any]) -> None:
        text = str(data.get("text", ""))[:1000]
        await self.broadcast(self._stream(), {"from": self.identifiers["name"], "text": text})
