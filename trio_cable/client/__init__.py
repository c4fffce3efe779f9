"""The trio_cable client (reconnect with backoff, linearized subscriptions, resume)."""
