"""Settings of the example Django site whose users chat over a trio_cable (or anycable-go)
WebSocket server, identified by their Django session over AnyCable RPC.

Everything that differs between machines comes from the environment:

* ``TRIO_CABLE_SECRET``: the secret the real-time server runs with (``trio-cable serve
  --secret``, anycable-go's ``--secret``).  The RPC key is derived from it as both servers do.
* ``CABLE_BROADCAST_URL`` / ``CABLE_BROADCAST_KEY``: where broadcasts go, with which key
  (trio_cable: ``http://<host>:8080/_broadcast`` and its secret, the default; anycable-go: its
  broadcast endpoint and ``derived_key(secret, "broadcast")``).
* ``DJANGO_RPC_DB``: the SQLite file (default ``db.sqlite3`` beside ``manage.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

# A development key: set DJANGO_SECRET_KEY anywhere else.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "django-insecure-trio-cable-example-only")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]
ROOT_URLCONF = "chatsite.urls"
WSGI_APPLICATION = "chatsite.wsgi.application"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("DJANGO_RPC_DB", str(BASE_DIR / "db.sqlite3")),
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True

# -- the real-time server -------------------------------------------------------------------

CABLE_SECRET = os.environ.get("TRIO_CABLE_SECRET", "dev-secret-change-me-0123456789abcdef")
CABLE_BROADCAST_URL = os.environ.get("CABLE_BROADCAST_URL", "http://127.0.0.1:8080/_broadcast")
CABLE_BROADCAST_KEY = os.environ.get("CABLE_BROADCAST_KEY", CABLE_SECRET)
