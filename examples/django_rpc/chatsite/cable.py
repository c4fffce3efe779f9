"""The site's real-time side, served over AnyCable RPC (mounted at ``/anycable/`` in urls.py).

A browser logs in with the site's ordinary login view, which sets Django's session cookie.
When it opens the WebSocket to the real-time server, the server calls ``/anycable/connect``
with the WebSocket request's cookies; :func:`connect` reads the same session Django's views
read, and the connection is that user's for its whole life: every later call
(``/anycable/command``) brings the identifiers back, and no WebSocket code touches the database
unless a channel's callback does.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, SESSION_KEY, get_user_model, load_backend

from trio_cable.rpc import Channel, Connection, HTTPBroadcaster, RPCApp, Unauthorized

SessionStore = import_module(settings.SESSION_ENGINE).SessionStore

rpc = RPCApp(
    secret=settings.CABLE_SECRET,
    broadcaster=HTTPBroadcaster(settings.CABLE_BROADCAST_URL, key=settings.CABLE_BROADCAST_KEY),
)


def user_from_session(session_key: str | None) -> Any:
    """The logged-in user of the session *session_key*, or None (what
    ``django.contrib.auth.get_user`` does for a request, from a bare session key)."""
    if not session_key:
        return None
    session = SessionStore(session_key=session_key)
    user_id, backend_path = session.get(SESSION_KEY), session.get(BACKEND_SESSION_KEY)
    if user_id is None or backend_path not in settings.AUTHENTICATION_BACKENDS:
        return None
    user = load_backend(backend_path).get_user(get_user_model()._meta.pk.to_python(user_id))
    return user if user is not None and user.is_active else None


@rpc.connect
def connect(conn: Connection) -> dict[str, Any]:
    user = user_from_session(conn.cookies.get(settings.SESSION_COOKIE_NAME))
    if user is None:
        raise Unauthorized()  # -> {"type":"disconnect","reason":"unauthorized","reconnect":false}
    return {"user_id": user.pk, "username": user.get_username()}


@rpc.channel
class ChatChannel(Channel):
    """``{"channel": "ChatChannel", "room": "lobby"}``; ``perform("speak", {"text": ...})``."""

    def subscribed(self) -> None:
        room = self.params.get("room")
        if not isinstance(room, str) or not room:
            self.reject()
            return
        self.stream_from(f"chat/{room}", whisper=True)  # typing indicators, client to client
        self.join_presence(self.identifiers["user_id"], {"name": self.identifiers["username"]})

    def speak(self, data: dict[str, Any]) -> None:
        text = str(data.get("text", ""))[:1000]
        self.broadcast(
            f"chat/{self.params['room']}", {"from": self.identifiers["username"], "text": text}
        )
