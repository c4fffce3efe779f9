"""Build the broker a configuration asks for."""

from __future__ import annotations

from trio_cable.broker import Broker
from trio_cable.config import Config, ConfigError


def create_broker(config: Config) -> Broker:
    """``--broker memory`` (embedded, the default) or ``--broker redis`` (``--redis-url``)."""
    if config.broker == "memory":
        from trio_cable.broker.memory import MemoryBroker

        return MemoryBroker(
            history_limit=config.history_limit,
            history_ttl=config.history_ttl,
            history_max_size=config.history_max_size,
            history_max_memory=config.history_max_memory,
            session_max_size=config.session_max_size,
            sessions_max_memory=config.sessions_max_memory,
        )
    if config.broker == "redis":
        try:
            from trio_cable.broker.redis import RedisBroker
        except ImportError as exc:
            raise ConfigError(
                f"broker redis: {exc}; install the redis extra from the trio_cable checkout: "
                f"pip install -e '.[redis]'"
            ) from None
        return RedisBroker(
            config.redis_url,
            history_limit=config.history_limit,
            history_ttl=config.history_ttl,
            session_max_size=config.session_max_size,
            broadcast_adapter=config.broadcast_adapter,
            anycable_channel=config.redis_channel,
            redisx_group=config.redisx_group,
        )
    raise ConfigError(f"broker: unknown broker {config.broker!r}")
