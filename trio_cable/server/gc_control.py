"""Keep the cyclic garbage collector's full passes small however many connections are open.

A full collection walks every tracked object: at 10,000-16,600 connections (about 33 objects
each, mostly Trio's task, nursery and cancel scopes) that stopped the event loop for 540-610 ms,
once every ~1,500 new connections.  Two things make it safe and cheap to stop doing that:

* A closed connection leaves no reference cycle (the transport lets go of its receiver and its
  nursery when it ends; ``tests/test_gc.py`` opens and closes connections with the collector
  off and checks that nothing is left for it), so reference counting frees it whether the
  collector has seen it or not.
* After each full collection the survivors are frozen (:func:`gc.freeze`): long-lived objects
  move to the permanent generation, and the next full pass walks only what was created since.

The price is that garbage cycles among frozen objects would never be collected; the first
point is what keeps that from happening for connections, the bulk of a server's objects.
Pause times are measured through :data:`gc.callbacks` and exported as metrics.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from trio_cable.metrics import Metrics

__all__ = ["GcControl"]


class GcControl:
    """Measures collector pauses and freezes the survivors of full collections.

    :meth:`install` hooks into :data:`gc.callbacks`; the node calls :meth:`tick` from its
    housekeeper, which freezes outside the collector's own callback.
    """

    def __init__(self, metrics: Metrics, *, freeze: bool = True) -> None:
        self.metrics = metrics
        self.freeze = freeze
        self._started = 0.0
        self._freeze_due = False
        #: The longest full-collection pause seen, in seconds.
        self.longest_full_pause = 0.0

    def install(self) -> None:
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def uninstall(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        if info.get("generation") != 2:
            return
        pause = time.perf_counter() - self._started
        self.metrics.gc_full_collections_total += 1
        self.metrics.observe("gc_full_pause_seconds", pause)
        self.longest_full_pause = max(self.longest_full_pause, pause)
        self._freeze_due = self.freeze

    def tick(self) -> None:
        """Freeze the survivors of the last full collection (if one ran since)."""
        if self._freeze_due:
            self._freeze_due = False
            gc.freeze()
