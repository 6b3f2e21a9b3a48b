"""The running Courier stack as tests drive it: clients, settings as environment, metrics."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from notification_service.config import Settings as NotifierSettings
from user_service.config import Settings as UserSettings


def service_env(settings: NotifierSettings | UserSettings) -> dict[str, str]:
    """The same settings as environment variables, for a service run as a process."""
    env = {
        "COURIER_AMQP_URL": settings.amqp_url,
        "COURIER_REDIS_URL": settings.redis_url,
        "COURIER_REDIS_PREFIX": settings.redis_prefix,
        "COURIER_RETRY_DELAYS_SECONDS": str(settings.retry_delays_seconds),
        "COURIER_RETRY_MAX_ATTEMPTS": str(settings.retry_max_attempts),
    }
    if isinstance(settings, NotifierSettings):
        env |= {
            "COURIER_SMTP_PORT": str(settings.smtp_port),
            "COURIER_SMS_URL": settings.sms_url,
            "COURIER_PUSH_URL": settings.push_url,
            "COURIER_SMS_TOKEN": settings.sms_token.get_secret_value(),
            "COURIER_PUSH_TOKEN": settings.push_token.get_secret_value(),
            "COURIER_IDEMPOTENCY_LEASE_SECONDS": str(settings.idempotency_lease_seconds),
        }
    else:
        env["COURIER_OUTBOX_BLOCK_MS"] = str(settings.outbox_block_ms)
    return env


@dataclass
class Stack:
    """user-service and notification-service in this process; ``users`` is the API client."""

    users: httpx.AsyncClient
    notifier: httpx.AsyncClient

    async def register(self, email: str, **extra: object) -> dict[str, object]:
        body = {"email": email, "display_name": "Ada", "locale": "en", **extra}
        response = await self.users.post("/v1/users", json=body)
        assert response.status_code == 201, response.text
        user: dict[str, object] = response.json()
        return user

    async def metric(self, name: str, **labels: str) -> float:
        """A sample from the notifier's /metrics (0 when the series does not exist yet)."""
        text = (await self.notifier.get("/metrics")).text
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith("#") or " " not in line:
                continue
            series, value = line.rsplit(" ", 1)
            metric, _, rest = series.partition("{")
            if metric != name:
                continue
            found = ",".join(sorted(p for p in rest.rstrip("}").split(",") if p))
            if found == wanted:
                return float(value)
        return 0.0
