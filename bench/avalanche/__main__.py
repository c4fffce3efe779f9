"""``python -m bench.avalanche ...``: see :mod:`bench.avalanche.cli`."""

import sys

from bench.avalanche import main

sys.exit(main(sys.argv[1:]))
