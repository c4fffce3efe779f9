"""``python -m bench fuzz``: a hypothesis fuzz campaign on the protocol layer and a live server.

Targets, run round-robin until the time is up (``--minutes``, default 10):

``decode-json`` / ``decode-msgpack``
    :func:`~trio_cable.protocol.cable.decode_command` on valid commands that were then mutated
    (bytes flipped, inserted, deleted, truncated, spliced with another command, nesting deepened,
    blown up past the size limits, odd tokens such as ``NaN``, lone surrogates, msgpack
    extension types and 4-GiB length prefixes dropped in), followed by
    :func:`~trio_cable.protocol.cable.parse_identifier` and
    :func:`~trio_cable.protocol.cable.parse_action` on what it accepted.  The only exception
    allowed is :class:`~trio_cable.protocol.cable.InvalidCommand`; accepted commands must be
    well-typed and re-encodable by both codecs (a whisper from a msgpack client may go to a
    JSON client); every call must return within :data:`HANG_SECONDS`.
``publications``
    :func:`~trio_cable.protocol.cable.parse_publications` on mutated broadcast bodies, then the
    server's fan-out encoding (:class:`~trio_cable.protocol.cable.BroadcastEncoder`) of every
    accepted publication in both codecs.
``frames``
    mutated streams of valid client frames (carrying the mutated commands above), cut into
    random chunks, fed to the compiled (``trio_cable._speedups``) and the pure
    (``trio_cable._speedups_py``) parser: both must agree on every event and error, whole or
    chunked, and keep RFC 6455's promises (close codes 1002/1007/1009 only, text is UTF-8,
    messages within the size limit).
``live``
    a real ``python -m trio_cable serve`` process; each example is a batch of connections that
    send mutated upgrade requests, frames and commands in random chunks over real sockets.
    After every batch a well-behaved client must still connect, subscribe and receive a
    broadcast; the server's RSS and open fds are sampled, its log is scanned for tracebacks,
    and close codes other than the ones the bad-input table promises (or 1011) count as
    failures.  Issue 14's shapes are among the connections: amplification frames
    (:mod:`~bench.fuzz.shapes`, also 1 in 10 of the decoder targets' inputs), requests that stop
    half-way (a partial ClientHello or nothing, sent to a ``--tls-cert`` twin of the server; a
    partial head, a body that never ends), which must be closed within
    :data:`~bench.fuzz.live.STALL_LIMIT`, and frames followed by the client's FIN, which must end
    the connection within :data:`~bench.fuzz.live.FIN_LIMIT`.

Results: ``fuzz.json``, ``fuzz.md`` (a Markdown section for ``bench/RESULTS-hardening.md``)
and ``plots/fuzz.png`` in ``--out DIR`` (default a fresh ``./bench-out/<time>-fuzz``), or the
committed ``bench/results`` and ``bench/plots`` with ``--update-results``.

The package: :mod:`~bench.fuzz.strategies` (hypothesis strategies and mutators of the inputs),
:mod:`~bench.fuzz.checks` (the contract each input is checked against), :mod:`~bench.fuzz.live`
(the live-server harness), :mod:`~bench.fuzz.campaign` (the time-sliced campaign),
:mod:`~bench.fuzz.report` (Markdown and plot) and :mod:`~bench.fuzz.cli`.
``tests/test_fuzz.py`` runs the same strategies and checks for a few seconds each.
"""

from __future__ import annotations


def main(argv: list[str]) -> int:
    """``python -m bench fuzz ...``; see :mod:`bench.fuzz.cli`."""
    from bench.fuzz.cli import main as cli_main

    return cli_main(argv)


__all__ = ["main"]
