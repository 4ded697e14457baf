"""The receiver: webhooks in, monitor API and dashboard out (aiohttp)."""
