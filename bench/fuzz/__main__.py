"""``python -m bench.fuzz ...`` (the same as ``python -m bench fuzz ...``)."""

import sys

from bench import run_main
from bench.fuzz.cli import main

sys.exit(run_main("python -m bench.fuzz", main, sys.argv[1:]))
