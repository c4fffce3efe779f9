"""Bench 1: byte kernels in GB/s by payload size.

Compiled ``trio_cable._speedups`` vs its pure twin ``trio_cable._speedups_py`` vs
``websockets.speedups`` (masking) and the ``utf-8`` codec (validation); plus the whole
receive path of one masked text frame (``FrameParser``: header, unmask, UTF-8 check).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bench.options import Options
from bench.stats import summarize

SIZES = [16, 64, 256, 1024, 4096, 16384, 65536, 1 << 20]
QUICK_SIZES = [64, 4096, 65536]
_MASK = b"\x12\x34\x56\x78"
_MIXED = "héllo wörld ✓ 漢字 🎉 ".encode()


def _kernels() -> dict[str, Any]:
    from trio_cable import _speedups_py as pure

    impls: dict[str, Any] = {"pure": pure}
    try:
        from trio_cable import _speedups as compiled  # type: ignore[attr-defined]

        impls["compiled"] = compiled
    except ImportError:
        pass
    return impls


def _rate(fn: Callable[[], object], size: int, min_time: float) -> float:
    """GB/s of *fn* processing *size* bytes per call, timed for at least *min_time* s."""
    loops = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time or loops >= 1 << 24:
            return size * loops / elapsed / 1e9
        loops *= 2 if elapsed > min_time / 8 else 8


def _cases(size: int) -> list[tuple[str, str, Callable[[], object]]]:
    """(kernel, implementation, zero-argument call) for one payload size."""
    from websockets.speedups import apply_mask

    ascii_data = b"x" * size
    mixed = (_MIXED * (size // len(_MIXED) + 1))[:size]
    # Cut at a character boundary so the mixed text stays valid.
    mixed = mixed.decode("utf-8", "ignore").encode()
    cases: list[tuple[str, str, Callable[[], object]]] = []
    for impl, mod in _kernels().items():
        frame = mod.build_frame(1, ascii_data, mask=_MASK)

        def parse(mod: Any = mod, frame: bytes = frame) -> object:
            parser = mod.FrameParser(max(size * 2, 1 << 20))
            parser.feed(frame)
            return parser.next_message()

        cases += [
            ("unmask", impl, lambda mod=mod: mod.unmask(ascii_data, _MASK)),
            ("utf8 ascii", impl, lambda mod=mod: mod.validate_utf8(ascii_data)),
            ("utf8 mixed", impl, lambda mod=mod, m=mixed: mod.validate_utf8(m)),
            ("parse text frame", impl, parse),
        ]
    cases += [
        ("unmask", "websockets.speedups", lambda: apply_mask(ascii_data, _MASK)),
        ("utf8 ascii", "bytes.decode", lambda: ascii_data.decode()),
        ("utf8 mixed", "bytes.decode", lambda m=mixed: m.decode()),
    ]
    return cases


def run(opts: Options) -> dict[str, Any]:
    """Every kernel at every size, ``repeats`` times; GB/s median and min-max."""
    sizes = QUICK_SIZES if opts.quick else SIZES
    min_time = 0.01 if opts.quick else 0.05
    repeats = 1 if opts.quick else max(3, opts.repeats)
    rows = []
    for size in sizes:
        for kernel, impl, fn in _cases(size):
            rates = [_rate(fn, size, min_time) for _ in range(repeats)]
            rows.append({"kernel": kernel, "impl": impl, "size": size, "gbps": summarize(rates)})
    return {"bench": "micro", "rows": rows}
