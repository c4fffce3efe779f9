from __future__ import annotations

from django.urls import path

from chatsite import views
from chatsite.cable import rpc
from trio_cable.rpc.django import rpc_view

urlpatterns = [
    path("login", views.login_view),
    path("me", views.me),
    # The real-time server's RPC calls: --rpc-host http://<this site>/anycable
    path("anycable/<str:method>", rpc_view(rpc)),
]
