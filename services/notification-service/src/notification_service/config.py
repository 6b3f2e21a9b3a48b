"""notification-service settings: the shared ones plus SMTP and the HTTP providers."""

from __future__ import annotations

from pydantic import Field, SecretStr, model_validator

from courier_common.settings import PLACEHOLDER_SECRETS, ConsumerSettings


class Settings(ConsumerSettings):
    """Environment: ``COURIER_*``. Provider tokens come from a Kubernetes Secret."""

    http_port: int = Field(default=8001, ge=0, le=65535)
    smtp_host: str = "127.0.0.1"
    smtp_port: int = Field(default=1025, ge=1, le=65535)
    smtp_from: str = Field(default="Courier <welcome@courier.local>")
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_starttls: bool | None = Field(
        default=None, description="None: use STARTTLS when the server offers it."
    )
    smtp_timeout_seconds: float = Field(default=10.0, gt=0)
    sms_url: str = "http://127.0.0.1:8030/sms"
    push_url: str = "http://127.0.0.1:8030/push"
    sms_token: SecretStr = SecretStr("dev-sms-token")
    push_token: SecretStr = SecretStr("dev-push-token")
    provider_timeout_seconds: float = Field(default=10.0, gt=0)
    idempotency_lease_seconds: float = Field(
        default=60.0,
        gt=0,
        description="How long a claim on a send protects it; longer than the slowest send.",
    )
    idempotency_retention_seconds: int = Field(
        default=7 * 24 * 3600,
        ge=60,
        description="How long a done send is remembered (longer than any redelivery).",
    )
    erased_user_retention_seconds: int = Field(
        default=30 * 24 * 3600,
        ge=60,
        description="How long a deleted user's id is remembered so late retries send nothing.",
    )

    @model_validator(mode="after")
    def _real_tokens_in_production(self) -> Settings:
        if self.environment == "production":
            for name in ("sms_token", "push_token"):
                token = getattr(self, name).get_secret_value()
                if token in PLACEHOLDER_SECRETS or token.startswith("dev-"):
                    raise ValueError(f"COURIER_{name.upper()} must be a real secret in production")
        return self
