"""user-service settings: the shared ones, the outbox's, and the API's limits."""

from __future__ import annotations

from pydantic import Field

from courier_common.settings import OutboxSettings


class Settings(OutboxSettings):
    """Environment: ``COURIER_*`` (see the run contract in the README)."""

    http_port: int = Field(default=8000, ge=0, le=65535)
    max_body_bytes: int = Field(
        default=64 * 1024,
        ge=1024,
        description="Request bodies larger than this get 413.",
    )
    idempotency_ttl_seconds: int = Field(
        default=24 * 3600,
        ge=60,
        description="How long an Idempotency-Key replays its first response.",
    )
