"""Transports: one module each, every one implementing :class:`~trio_cable.server.transport.
Transport` and driving a :class:`~trio_cable.server.transport.Receiver`."""
