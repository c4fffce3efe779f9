"""``python -m bench``."""

from __future__ import annotations

import sys

from bench import main

sys.exit(main())
