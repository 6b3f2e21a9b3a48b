"""The settings every Courier service shares.

Configuration is environment only, prefix ``COURIER_`` (see the run contract in
ARCHITECTURE.md). Each service subclasses :class:`CourierSettings`, builds it once in its
entry point and passes it down: there is no module-level settings object, so tests build
their own.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Literal
from urllib.parse import quote, unquote, urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from courier_common.messaging.retry import RetryPolicy
from courier_common.messaging.topology import (
    ARCHIVER_USER_EVENTS,
    NOTIFICATION_USER_EVENTS,
    Topology,
    WorkQueue,
)

Environment = Literal["development", "test", "production"]

#: Credentials that must never reach production: RabbitMQ's and the examples' defaults.
PLACEHOLDER_SECRETS = frozenset({"", "guest", "changeme", "change-me", "secret", "password"})


class CourierSettings(BaseSettings):
    """Settings shared by every service; services extend it with their own fields."""

    model_config = SettingsConfigDict(
        env_prefix="COURIER_",
        extra="ignore",
        frozen=True,
        validate_default=True,
        # A refused setting must not print its value: it may be a token or a URL password.
        hide_input_in_errors=True,
    )

    environment: Environment = Field(
        default="development",
        description="development and test allow the well-known local credentials; "
        "production refuses them.",
    )
    amqp_url: str = Field(
        default="amqp://guest:guest@127.0.0.1:5672/",
        description="RabbitMQ URL; the path is the vhost (percent-encoded, '/' is the default). "
        "A cluster: one URL per node, comma-separated, tried in turn at start and on every "
        "reconnect; all with the same user, password and vhost.",
    )
    amqp_management_url: str | None = Field(
        default=None,
        description="RabbitMQ management API base URL used to poll queue depth (a "
        "comma-separated list is tried in turn); derived from amqp_url when unset: each "
        "node's host, port 15672, the same credentials.",
    )
    quorum_initial_group_size: int = Field(
        default=3,
        ge=1,
        le=99,
        description="Members a quorum queue gets when it is created "
        "(x-quorum-initial-group-size); RabbitMQ caps it at the cluster's size, so 3 on one "
        "node is one member. Only used at creation: an existing queue keeps its members.",
    )
    amqp_heartbeat_seconds: int = Field(
        default=30,
        ge=0,
        le=600,
        description="AMQP heartbeat: a hung broker is detected after about twice this.",
    )
    amqp_prefetch: int = Field(
        default=32,
        ge=1,
        le=10_000,
        description="Messages a worker holds unacked, and so handles concurrently.",
    )
    redis_url: str = Field(default="redis://127.0.0.1:6379/0")
    redis_max_connections: int = Field(
        default=64,
        ge=2,
        le=10_000,
        description="Redis connections per process; past it a request waits, never fails.",
    )
    redis_prefix: str = Field(
        default="courier:",
        description="Prefix of every Redis key this deployment writes.",
    )
    http_host: str = Field(default="127.0.0.1")
    http_port: int = Field(default=8000, ge=0, le=65535)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["json", "console"] | None = Field(
        default=None,
        description="json or console; unset means console on a TTY, json otherwise.",
    )
    retry_delays_seconds: list[float] = Field(
        default=[5.0, 30.0, 300.0],
        min_length=1,
        description="One retry tier per delay (JSON list), strictly increasing. Every service "
        "must use the same value: they all declare the same topology.",
    )
    retry_max_attempts: int = Field(default=5, ge=1, le=100)
    delivery_limit: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="Deliveries of one message a worker may die on before the broker "
        "dead-letters it.",
    )
    work_queue_max_length: int | None = Field(
        default=None,
        ge=1,
        description="Cap of the work queue; past it publishes are refused (the outbox keeps "
        "the events), never dropped.",
    )
    drain_timeout_seconds: float = Field(
        default=25.0,
        gt=0,
        description="On SIGTERM, how long in-flight messages get to finish. Keep it below "
        "the pod's terminationGracePeriodSeconds.",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("amqp_url")
    @classmethod
    def _check_amqp_url(cls, value: str) -> str:
        urls = [part.strip() for part in value.split(",")]
        if not any(urls):
            raise ValueError("must look like amqp://user:password@host:5672/vhost")
        seen: tuple[str | None, str | None, str, str] | None = None
        for n, url in enumerate(urls, 1):
            where = f"URL {n} of {len(urls)}" if len(urls) > 1 else "the URL"
            try:
                parts = urlsplit(url)
                parts.port  # noqa: B018  # raises on a port that is not a number
            except ValueError:
                raise ValueError(f"{where} is not a URL") from None
            if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
                raise ValueError(
                    f"{where} must look like amqp://user:password@host:5672/vhost "
                    "(a cluster: one such URL per node, comma-separated)"
                )
            # One cluster: every node has the same users and vhosts. A list that mixes
            # them is a typo, and would make a reconnect land somewhere else.
            same = (parts.username, parts.password, parts.path.rstrip("/") or "/", parts.query)
            if seen is not None and same != seen:
                raise ValueError(
                    f"{where} differs from the first in user, password, vhost or query: every "
                    "URL of the list must name the same vhost with the same credentials "
                    "(one URL per node of one cluster)"
                )
            seen = same
        return ",".join(urls)

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss", "unix") or (
            parts.scheme != "unix" and not parts.hostname
        ):
            raise ValueError("must look like redis://host:6379/0")
        return value

    @field_validator("retry_delays_seconds")
    @classmethod
    def _check_delays(cls, value: list[float]) -> list[float]:
        if any(d <= 0 for d in value) or value != sorted(set(value)):
            raise ValueError("retry delays must be positive and strictly increasing")
        return value

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> CourierSettings:
        if self.environment != "production":
            return self
        first_amqp = self.amqp_url.split(",")[0]
        for name, url in (("amqp_url", first_amqp), ("redis_url", self.redis_url)):
            password = urlsplit(url).password
            if password is not None and unquote(password) in PLACEHOLDER_SECRETS:
                raise ValueError(
                    f"COURIER_{name.upper()} uses a placeholder password; "
                    "set a real secret for production"
                )
        return self

    def topology(self) -> Topology:
        """The one topology every service declares, built from these settings."""
        retry = RetryPolicy(
            delays=tuple(timedelta(seconds=d) for d in self.retry_delays_seconds),
            max_attempts=self.retry_max_attempts,
        )
        notification = WorkQueue(
            name=NOTIFICATION_USER_EVENTS.name,
            binding_keys=NOTIFICATION_USER_EVENTS.binding_keys,
            retry=retry,
            delivery_limit=self.delivery_limit,
            max_length=self.work_queue_max_length,
            initial_group_size=self.quorum_initial_group_size,
        )
        archiver = WorkQueue(
            name=ARCHIVER_USER_EVENTS.name,
            binding_keys=ARCHIVER_USER_EVENTS.binding_keys,
            retry=retry,
            delivery_limit=self.delivery_limit,
            initial_group_size=self.quorum_initial_group_size,
        )
        return Topology(
            work_queues=(notification, archiver),
            initial_group_size=self.quorum_initial_group_size,
        )

    @property
    def amqp_urls(self) -> tuple[str, ...]:
        """The node URLs of ``amqp_url``, in order."""
        return tuple(self.amqp_url.split(","))

    @property
    def amqp_vhost(self) -> str:
        """The vhost named by ``amqp_url`` ('/' when the path is empty; the same on every node)."""
        path = urlsplit(self.amqp_urls[0]).path
        return unquote(path[1:]) if len(path) > 1 else "/"

    @property
    def management_urls(self) -> tuple[str, ...]:
        """Base URLs of the management API, with credentials, no trailing slash.

        ``amqp_management_url`` when set (a comma-separated list is kept as a list); else one
        per AMQP node: its host, port 15672, the AMQP URL's credentials.
        """
        if self.amqp_management_url:
            return tuple(
                part.strip().rstrip("/")
                for part in self.amqp_management_url.split(",")
                if part.strip()
            )
        derived: list[str] = []
        for url in self.amqp_urls:
            parts = urlsplit(url)
            user = quote(unquote(parts.username or "guest"), safe="")
            password = quote(unquote(parts.password or "guest"), safe="")
            scheme = "https" if parts.scheme == "amqps" else "http"
            host = parts.hostname or "127.0.0.1"
            host = f"[{host}]" if ":" in host else host
            base = f"{scheme}://{user}:{password}@{host}:15672"
            if base not in derived:
                derived.append(base)
        return tuple(derived)

    @property
    def management_url(self) -> str:
        """The management API URLs as one comma-separated value (see ``management_urls``)."""
        return ",".join(self.management_urls)
