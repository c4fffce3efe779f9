"""trio_cable: a Trio WebSocket server for Action Cable / AnyCable clients that rides out
connection avalanches."""

from trio_cable.channels import CableApp, Channel, ConnectRequest, Unauthorized
from trio_cable.config import Config, load_config
from trio_cable.server import Server

__version__ = "0.1.0"

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
