"""Avalanche benchmarks and simulations (issue 6): what each technique buys, with numbers.

``main(["avalanche" | "celebrity" | "subscribe" | "backoff", ...])`` runs a scenario; see
``bench/avalanche/README.md``.  The command line lives in :mod:`bench.avalanche.cli`,
imported lazily so that the server and load-generator processes do not pay for it.
"""

from __future__ import annotations


def main(argv: list[str]) -> int:
    """Run an avalanche scenario from the command line; returns the exit status."""
    from bench.avalanche.cli import main as cli_main

    return cli_main(argv)


__all__ = ["main"]
