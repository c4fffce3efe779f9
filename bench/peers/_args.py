"""Command-line arguments shared by the peer servers."""

from __future__ import annotations

import argparse

BROADCAST_PREFIX = "!b"


def parse(description: str) -> argparse.Namespace:
    """``--host`` and ``--port``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    return parser.parse_args()
