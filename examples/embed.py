"""Embedding trio_cable in a Trio program: start it in your nursery, broadcast from Python,
and drain on Ctrl-C / SIGTERM.  Run it from the repository's root with

    python examples/embed.py

It serves the chat application of ``examples/chat.py`` on ``ws://127.0.0.1:8080/cable``
(the ``TRIO_CABLE_*`` variables apply, e.g. ``TRIO_CABLE_PORT=0`` for a free port) and
broadcasts a clock tick to the ``lobby`` room every second.  The first Ctrl-C (or SIGTERM)
drains: new clients are refused, connected ones are told to reconnect elsewhere, spread over
``--drain-period`` (``TRIO_CABLE_DRAIN_PERIOD``, 10 s); a second one hurries the drain.
Then the program exits with status 0.
"""

from __future__ import annotations

import logging
import signal

import trio

from trio_cable import Server, load_config

try:  # run from a checkout: python examples/embed.py
    from chat import app
except ImportError:  # imported as examples.embed
    from examples.chat import app

log = logging.getLogger("embed")

# Only for the example: a real deployment sets TRIO_CABLE_SECRET (32+ random bytes, e.g.
# `python -c 'import secrets; print(secrets.token_hex(32))'`).
EXAMPLE_SECRET = "example-secret-do-not-use-in-production-0123456789"


async def clock(server: Server) -> None:
    """Your application's own work; here, a broadcast to the lobby every second."""
    tick = 0
    while True:
        await server.broadcast("chat:lobby", {"from": "clock", "text": f"tick {tick}"})
        tick += 1
        await trio.sleep(1)


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = load_config()  # defaults, then TRIO_CABLE_* variables
    if not config.secret:
        config.secret = EXAMPLE_SECRET
    # Open the signal receiver first: from here on Ctrl-C is a message, not KeyboardInterrupt.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(Server(config, app).serve)
            nursery.start_soon(clock, server)
            draining = False
            async for signum in signals:
                name = signal.Signals(signum).name
                if draining:
                    log.info("received %s again: disconnecting everybody now", name)
                    server.drain_now()
                    continue
                draining = True
                log.info("received %s: draining (send again to hurry)", name)

                async def drain_then_stop() -> None:
                    await server.drain()
                    nursery.cancel_scope.cancel()  # stops the server and the clock

                nursery.start_soon(drain_then_stop)


if __name__ == "__main__":
    trio.run(main)
