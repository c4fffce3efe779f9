"""trio_cable.rpc: the application side of AnyCable's HTTP RPC, for any Python web stack.

A real-time server that speaks AnyCable's RPC (trio_cable with ``--rpc-host``, or anycable-go)
keeps the WebSockets; a Django, Flask, FastAPI or Starlette application answers who connects
and what each command does::

    from trio_cable.rpc import Channel, HTTPBroadcaster, RPCApp, Unauthorized

    rpc = RPCApp(secret=SECRET, broadcaster=HTTPBroadcaster("http://cable:8080/_broadcast",
                                                            key=SECRET))

    @rpc.connect
    def connect(conn):
        user = user_from_session(conn.cookies.get("sessionid"))   # your code
        if user is None:
            raise Unauthorized()
        return {"user_id": user.id}

    @rpc.channel
    class ChatChannel(Channel):
        def subscribed(self):
            self.stream_from(f"chat/{self.params['room']}", whisper=True)

        def speak(self, data):
            self.broadcast(f"chat/{self.params['room']}", {"text": data["text"]})

    application = rpc.wsgi          # or rpc.asgi; mount it under e.g. /anycable

Nothing here imports Trio, an event loop library or a web framework: the WSGI path runs in
the server's threads, the ASGI path on whatever loop serves it (asyncio or Trio).  Stream
signing and token minting (:func:`sign_stream`, :func:`issue_token`) are re-exported for views
that hand clients signed streams and tokens.
"""

from __future__ import annotations

from trio_cable.identity import issue_token
from trio_cable.rpc.app import (
    ERROR,
    FAILURE,
    SUCCESS,
    Channel,
    Connection,
    RPCApp,
    RPCResponse,
    Unauthorized,
    derived_key,
)
from trio_cable.rpc.broadcast import (
    BroadcastError,
    HTTPBroadcaster,
    RedisBroadcaster,
    publication,
    remote_disconnect,
)
from trio_cable.rpc.web import ASGIApp, WSGIApp
from trio_cable.streams import sign_stream, verify_stream

__all__ = [
    "ERROR",
    "FAILURE",
    "SUCCESS",
    "ASGIApp",
    "BroadcastError",
    "Channel",
    "Connection",
    "HTTPBroadcaster",
    "RPCApp",
    "RPCResponse",
    "RedisBroadcaster",
    "Unauthorized",
    "WSGIApp",
    "derived_key",
    "issue_token",
    "publication",
    "remote_disconnect",
    "sign_stream",
    "verify_stream",
]
