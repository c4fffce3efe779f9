"""Sans-I/O protocol layers: Action Cable commands and replies, WebSocket frames."""
