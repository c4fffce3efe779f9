#!/usr/bin/env python
"""Django's command-line utility for the trio_cable.rpc example (see chatsite/cable.py)."""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
