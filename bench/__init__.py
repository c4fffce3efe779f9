"""trio_cable's side-by-side benchmark suite (issue 3).

Run ``python -m bench --help`` (or ``trio-cable bench --help``); see ``bench/README.md``.
The entry point is :func:`bench.main` (defined in :mod:`bench.cli`, imported lazily so that
the load generator and the peer servers do not pay for it).
"""

from __future__ import annotations

AVALANCHE_SCENARIOS = ("avalanche", "celebrity", "subscribe", "backoff")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark command line; returns the exit status.

    ``avalanche|celebrity|subscribe|backoff`` go to :mod:`bench.avalanche` (issue 6),
    ``rollout`` to :mod:`bench.rollout` (issue 7), ``fuzz`` and ``soak`` to :mod:`bench.fuzz`
    and :mod:`bench.soak` (issue 8), everything else to :mod:`bench.cli`.
    """
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in AVALANCHE_SCENARIOS:
        from bench.avalanche import main as avalanche_main

        return avalanche_main(args)
    if args and args[0] == "rollout":
        from bench.rollout import main as rollout_main

        return rollout_main(args[1:])
    if args and args[0] == "fuzz":
        from bench.fuzz import main as fuzz_main

        return fuzz_main(args[1:])
    if args and args[0] == "soak":
        from bench.soak import main as soak_main

        return soak_main(args[1:])
    from bench.cli import main as cli_main

    return cli_main(args)


__all__ = ["main"]
