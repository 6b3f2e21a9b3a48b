"""dlq-archiver settings: the shared ones plus the admin token, retention and replay limits."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator

from courier_common.settings import PLACEHOLDER_SECRETS, ConsumerSettings


class Settings(ConsumerSettings):
    """Environment: ``COURIER_*``. ``COURIER_ADMIN_TOKEN`` comes from a Kubernetes Secret."""

    http_port: int = Field(default=8002, ge=0, le=65535)
    admin_token: SecretStr = Field(
        description="Bearer token for everything that changes the archive or reveals PII.",
    )
    retention_max_age_days: float | None = Field(default=30.0, gt=0)
    retention_max_count: int | None = Field(default=1_000_000, ge=1)
    retention_interval_seconds: float = Field(default=300.0, gt=0)
    replay_rate_per_second: float = Field(
        default=50.0, gt=0, description="Default pace of a bulk replay."
    )
    replay_canary_wait_seconds: float = Field(
        default=30.0,
        ge=0,
        description="How long a bulk replay watches its canary for failures before going on.",
    )
    top_groups_metric: int = Field(
        default=10,
        ge=0,
        le=100,
        description="Failure groups exported as metric series (bounded label cardinality).",
    )
    gauges_interval_seconds: float = Field(default=10.0, gt=0)
    console_enabled: bool = Field(
        default=True,
        description="Serve the operator's web console at /console (its assets are packaged).",
    )

    @field_validator("admin_token")
    @classmethod
    def _real_token(cls, value: SecretStr) -> SecretStr:
        token = value.get_secret_value()
        if len(token) < 12 or token in PLACEHOLDER_SECRETS:
            raise ValueError(
                "COURIER_ADMIN_TOKEN must be at least 12 characters, not a placeholder"
            )
        return value
