"""The site's ordinary Django views: a login form that sets the session, and a page saying
who is logged in, with a signed stream and a token for clients that use them."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth import get_user_model, login
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import get_token
from django.shortcuts import redirect
from django.utils.html import escape

from trio_cable.rpc import issue_token, sign_stream

FORM = """<!doctype html><title>Log in</title>
<form method="post"><input type="hidden" name="csrfmiddlewaretoken" value="{token}">
<input name="username" placeholder="your name"><button>Log in</button></form>"""


def login_view(request: HttpRequest) -> HttpResponse:
    """``GET``: the form; ``POST username=...``: log in as that user (created on first use,
    no password: this is an example) and go to ``/me``."""
    if request.method == "POST":
        name = request.POST.get("username", "").strip()[:150]
        if not name:
            return HttpResponse("a name, please", status=400)
        user, _ = get_user_model().objects.get_or_create(username=name)
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        return redirect("/me")
    return HttpResponse(FORM.format(token=escape(get_token(request))))


def me(request: HttpRequest) -> HttpResponse:
    """Who the session belongs to, a signed stream of the user's own (subscribe with
    ``$pubsub`` and ``signed_stream_name``) and a JWT (``?jid=`` skips the RPC connect)."""
    if not request.user.is_authenticated:
        return JsonResponse({"user": None}, status=401)
    identifiers = {"user_id": request.user.pk, "username": request.user.get_username()}
    return JsonResponse(
        {
            "user": request.user.get_username(),
            "signed_stream": sign_stream(settings.CABLE_SECRET, f"user/{request.user.pk}"),
            "token": issue_token(settings.CABLE_SECRET, identifiers, ttl=3600),
        }
    )
