"""The environment a Courier service gets when a test or the benchmark runs it as a process.

The names are courier_common's base settings (``CourierSettings``, prefix ``COURIER_``), which
every service extends; what one service alone reads, its caller adds.
"""

from __future__ import annotations


def backing_env(amqp_url: str, redis_url: str, redis_prefix: str) -> dict[str, str]:
    """Where the service's broker and Redis are, and the key prefix that is its own."""
    return {
        "COURIER_AMQP_URL": amqp_url,
        "COURIER_REDIS_URL": redis_url,
        "COURIER_REDIS_PREFIX": redis_prefix,
    }


def process_env(port: int, *, environment: str = "test") -> dict[str, str]:
    """HTTP on 127.0.0.1:*port*, JSON log lines, no trace export."""
    return {
        "COURIER_HTTP_HOST": "127.0.0.1",
        "COURIER_HTTP_PORT": str(port),
        "COURIER_LOG_FORMAT": "json",
        "COURIER_ENVIRONMENT": environment,
        "OTEL_TRACES_EXPORTER": "none",
    }
