"""Command-line arguments shared by the peer servers."""

from __future__ import annotations

import argparse

BROADCAST_PREFIX = "!b"


def parse(description: str) -> argparse.Namespace:
    """``--host``, ``--port`` and ``--compression`` (for the peers that can compress)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--compression", action="store_true", help="permessage-deflate")
    return parser.parse_args()
