"""A small chat application: run it with

    trio-cable serve --channels examples.chat:app --secret change-me

A client subscribes with ``{"channel": "ChatChannel", "room": "lobby"}`` and performs
``speak`` with ``{"text": "..."}``; everybody in the room receives it.
"""

from __future__ import annotations

from typing import Any

from trio_cable import CableApp, Channel, ConnectRequest, Unauthorized

app = CableApp()


@app.connect
def connect(request: ConnectRequest) -> dict[str, Any]:
    # A real application checks a cookie or a header against its session store here.
    # (Clients that present a JWT skip this callback entirely.)
    name = request.query.get("name")
    if not name:
        raise Unauthorized()
    return {"name": name}


@app.channel
class ChatChannel(Channel):
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
