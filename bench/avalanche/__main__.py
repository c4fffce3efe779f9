"""``python -m bench.avalanche ...`` (the same as ``python -m bench ...``): see
:mod:`bench.avalanche.cli`."""

import sys

from bench import run_main
from bench.avalanche import main

sys.exit(run_main("python -m bench.avalanche", main, sys.argv[1:]))
