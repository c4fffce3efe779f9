"""trio_cable's benchmark suite: a checkout-only package, run as ``python -m bench ...`` from
the repository (it is not installed with trio_cable).  See ``bench/README.md``.

Six harnesses: the comparative suite (:mod:`bench.cli`), avalanche (:mod:`bench.avalanche`),
rollout (:mod:`bench.rollout`), presence (:mod:`bench.presence`), soak (:mod:`bench.soak`) and
fuzz (:mod:`bench.fuzz`); they
share :mod:`bench.procs` (processes and pinning), :mod:`bench.output` (where results go) and
:mod:`bench.deps` (optional dependencies).  Everything is imported lazily, so that the load
generator and the peer servers do not pay for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

AVALANCHE_SCENARIOS = ("avalanche", "celebrity", "subscribe", "backoff")


def run_main(prog: str, fn: Callable[[list[str]], int], argv: Sequence[str]) -> int:
    """Run a harness's ``main(argv)``; a missing optional dependency or a refused command line
    is one line on stderr and exit status 2, not a traceback."""
    import sys

    from bench.deps import MissingDependency, from_import_error
    from bench.output import UsageError

    try:
        return fn(list(argv))
    except (MissingDependency, UsageError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        missing = from_import_error(exc)
        if missing is None:
            raise
        print(f"{prog}: {missing}", file=sys.stderr)
        return 2


def _dispatch(args: list[str]) -> int:
    if args and args[0] in AVALANCHE_SCENARIOS:
        from bench.avalanche.cli import main as avalanche_main

        return avalanche_main(args)
    if args and args[0] == "rollout":
        from bench.rollout import main as rollout_main

        return rollout_main(args[1:])
    if args and args[0] == "presence":
        from bench.presence import main as presence_main

        return presence_main(args[1:])
    if args and args[0] == "fuzz":
        from bench.fuzz.cli import main as fuzz_main

        return fuzz_main(args[1:])
    if args and args[0] == "soak":
        from bench.soak import main as soak_main

        return soak_main(args[1:])
    from bench.cli import main as cli_main

    return cli_main(args)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench ...``; returns the exit status.

    ``avalanche|celebrity|subscribe|backoff`` go to :mod:`bench.avalanche`, ``rollout`` to
    :mod:`bench.rollout`, ``fuzz`` and ``soak`` to :mod:`bench.fuzz` and :mod:`bench.soak`,
    everything else to :mod:`bench.cli`.
    """
    import sys

    return run_main("python -m bench", _dispatch, sys.argv[1:] if argv is None else argv)


__all__ = ["main", "run_main"]
