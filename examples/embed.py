"""Embedding trio_cable in a Trio program: start it in your nursery, broadcast from Python.

python examples/embed.py
"""

from __future__ import annotations

import logging

import trio

from trio_cable import Config, Server

try:  # run from a checkout: python examples/embed.py
    from chat import app
except ImportError:  # imported as examples.embed
    from examples.chat import app


async def main() -> None:
    logging.basicConfig(level=logging.INFO)
    config = Config(port=8080, secret="change-me")
    async with trio.open_nursery() as nursery:
        server = await nursery.start(Server(config, app).serve)
        # Your application runs here; e.g. a clock that broadcasts every second.
        for tick in range(3600):
            await server.broadcast("chat:lobby", {"from": "clock", "text": f"tick {tick}"})
            await trio.sleep(1)
        nursery.cancel_scope.cancel()  # stops the server


if __name__ == "__main__":
    trio.run(main)
