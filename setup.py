"""Build the optional Cython speedups.

``pip install .`` compiles ``_speedups/_speedups.pyx`` into ``trio_cable._speedups``.  When
there is no C compiler (or Cython), the build of the extension is skipped and trio_cable
runs on its pure-Python twin (``trio_cable/_speedups_py.py``), which has the same API; the
server says so once at start-up.  Set ``TRIO_CABLE_NO_EXTENSIONS=1`` to skip the build.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """A build_ext whose failure is a warning, not an error."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler, no Python headers ...
            self._warn(exc)

    def build_extension(self, ext) -> None:  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._warn(exc)

    @staticmethod
    def _warn(exc: BaseException) -> None:
        sys.stderr.write(
            f"WARNING: trio_cable speedups not compiled ({exc}); "
            "using the pure-Python implementation\n"
        )


def extensions() -> list:
    if os.environ.get("TRIO_CABLE_NO_EXTENSIONS"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        sys.stderr.write("WARNING: Cython not available; using the pure-Python implementation\n")
        return []
    from setuptools import Extension

    ext = Extension(
        "trio_cable._speedups",
        ["_speedups/_speedups.pyx"],
        extra_compile_args=["-O3"],
    )
    return cythonize(
        [ext],
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
        },
    )


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
