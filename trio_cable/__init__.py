"""trio_cable: a Trio WebSocket server for Action Cable / AnyCable clients that rides out
connection avalanches.

The names below are imported on first use (PEP 562), so that ``import trio_cable.client``,
``trio_cable.streams`` or ``trio_cable.identity`` (what a Django or Flask application imports
to sign streams and mint tokens) loads neither the server nor its dependencies.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module that defines it.
_EXPORTS = {
    "CableApp": "trio_cable.channels",
    "Channel": "trio_cable.channels",
    "ConnectRequest": "trio_cable.channels",
    "Unauthorized": "trio_cable.channels",
    "Config": "trio_cable.config",
    "load_config": "trio_cable.config",
    "Server": "trio_cable.server.node",
}

__all__ = [
    "CableApp",
    "Channel",
    "Config",
    "ConnectRequest",
    "Server",
    "Unauthorized",
    "__version__",
    "load_config",
]

if TYPE_CHECKING:
    from trio_cable.channels import CableApp, Channel, ConnectRequest, Unauthorized
    from trio_cable.config import Config, load_config
    from trio_cable.server.node import Server


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'trio_cable' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
