"""user-service settings: the shared ones plus the outbox and the API's limits."""

from __future__ import annotations

from pydantic import Field

from courier_common.settings import CourierSettings


class Settings(CourierSettings):
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
    outbox_batch_size: int = Field(default=200, ge=1, le=10_000)
    outbox_block_ms: int = Field(
        default=1000,
        ge=10,
        description="How long the relay waits on an empty outbox before looking again.",
    )
    outbox_claim_idle_ms: int = Field(
        default=30_000,
        ge=100,
        description="Outbox entries held this long by a replica that stopped acknowledging "
        "them (it died) are taken over by another.",
    )
    outbox_retry_max_seconds: float = Field(
        default=5.0,
        gt=0,
        description="Longest pause between publish attempts while the broker is down.",
    )
    relay_enabled: bool = Field(
        default=True,
        description="Run the outbox relay in this process (turn off for API-only replicas).",
    )
