"""Opening the client's WebSocket: trio-websocket, with permessage-deflate when asked.

trio-websocket has no way to offer a WebSocket extension, although wsproto, under it,
implements permessage-deflate.  So with compression on, the connection is opened the way
trio-websocket's own ``connect_websocket`` does it, with wsproto's ``PerMessageDeflate`` added
to the opening request before the reader task sends it.  That touches three private names of
trio-websocket (``_initial_request``, ``_reader_task`` and ``_open_handshake``), kept to this
module; without compression the public ``connect_websocket_url`` is used unchanged.
"""

from __future__ import annotations

import dataclasses
import ssl

import trio
from trio_websocket import WebSocketConnection, connect_websocket_url
from trio_websocket._impl import _url_to_host  # the same URL rules as connect_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.extensions import PerMessageDeflate

__all__ = ["connect"]


async def connect(
    nursery: trio.Nursery,
    url: str,
    *,
    subprotocols: list[str],
    extra_headers: list[tuple[bytes, bytes]],
    max_message_size: int,
    compression: bool = False,
) -> WebSocketConnection:
    """An open WebSocket client connection to *url* (``ws:`` or ``wss:``), its background
    tasks in *nursery*.  With *compression*, permessage-deflate is offered (the server may
    decline; then the connection is plain)."""
    if not compression:
        return await connect_websocket_url(
            nursery,
            url,
            subprotocols=subprotocols,
            extra_headers=extra_headers,
            max_message_size=max_message_size,
        )
    host, port, resource, use_ssl = _url_to_host(url, None)
    stream: trio.abc.Stream
    if use_ssl:
        context = use_ssl if isinstance(use_ssl, ssl.SSLContext) else ssl.create_default_context()
        stream = await trio.open_ssl_over_tcp_stream(
            host, port, ssl_context=context, https_compatible=True
        )
    else:
        stream = await trio.open_tcp_stream(host, port)
    host_header = host if port in (80, 443) else f"{host}:{port}"
    connection = WebSocketConnection(
        stream,
        WSConnection(ConnectionType.CLIENT),
        host=host_header,
        path=resource,
        client_subprotocols=subprotocols,
        client_extra_headers=extra_headers,
        max_message_size=max_message_size,
    )
    request = connection._initial_request
    assert request is not None  # a client connection always has its request
    # No context takeover asked of the server: every message it sends stands alone, which is
    # what lets it compress a broadcast once for everybody.
    connection._initial_request = dataclasses.replace(
        request, extensions=[PerMessageDeflate(server_no_context_takeover=True)]
    )
    nursery.start_soon(connection._reader_task)
    await connection._open_handshake.wait()
    return connection
