"""``python -m trio_cable`` is ``trio-cable``."""

from trio_cable.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
