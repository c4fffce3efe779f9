"""bench/ is a checkout-only suite: the wheel installs trio_cable and nothing named ``bench``
(a top-level ``bench`` in site-packages is a name clash waiting to happen)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_lists_no_bench_package() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = config["tool"]["setuptools"]["packages"]
    assert "trio_cable" in packages
    assert all(p == "trio_cable" or p.startswith("trio_cable.") for p in packages), packages
    # Every subpackage of trio_cable is listed (a missing one would be left out of the wheel).
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "trio_cable").rglob("__init__.py")
    }
    assert found == set(packages)


@pytest.mark.slow
def test_the_wheel_has_no_bench_package(tmp_path: Path) -> None:
    # A real build of a copy of the checkout (bench/ included, as a source tree has it), without
    # the Cython step: which packages go in does not depend on it.
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns(
        ".*", "__pycache__", "*.so", "build", "*.egg-info", "bench-out", "node_modules"
    )
    shutil.copytree(ROOT, src, ignore=ignore)
    env = {**os.environ, "TRIO_CABLE_NO_EXTENSIONS": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    dist = tmp_path / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)],
        capture_output=True, text=True, timeout=600, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = dist.glob("trio_cable-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"trio_cable", next(t for t in tops if t.endswith(".dist-info"))}, tops
    assert not [n for n in names if n.startswith("bench") or "/bench/" in n]
    assert "trio_cable/server/node.py" in names and "trio_cable/client/cable.py" in names
