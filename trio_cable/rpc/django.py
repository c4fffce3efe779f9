"""A Django view serving an :class:`~trio_cable.rpc.RPCApp`.

``urls.py``::

    from trio_cable.rpc.django import rpc_view
    from myapp.cable import rpc

    urlpatterns = [path("anycable/<str:method>", rpc_view(rpc))]

The view is exempt from CSRF checks (the caller is the real-time server, authenticated by the
RPC key, not a browser) and runs the callbacks in Django's request thread, so they may use the
ORM and ``SessionStore`` as any view does.
"""

from __future__ import annotations

from typing import Any

from trio_cable.rpc.app import RPCApp

__all__ = ["rpc_view"]


def rpc_view(app: RPCApp) -> Any:
    """A Django view function answering ``POST .../connect``, ``/command``, ``/disconnect``."""
    from django.http import HttpResponse
    from django.views.decorators.csrf import csrf_exempt

    @csrf_exempt
    def view(request: Any, method: str = "") -> Any:
        answer = app.handle(request.path, request.headers, request.body, http_method=request.method)
        response = HttpResponse(answer.body, status=answer.status, content_type=answer.content_type)
        return response

    return view
