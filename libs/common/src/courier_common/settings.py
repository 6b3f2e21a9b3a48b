"""The settings every Courier service shares.

Configuration is environment only, prefix ``COURIER_`` (see the README's "Configuration";
docs/architecture.md). Each service subclasses :class:`CourierSettings`, builds it once in its
entry point and passes it down: there is no module-level settings object, so tests build
their own.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Literal
from urllib.parse import quote, unquote, urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from courier_common.messaging.retry import RetryPolicy
from courier_common.messaging.topology import WorkQueue
from courier_common.redis import Durability, RedisTarget, parse_sentinels

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
    # --- Redis through Sentinel, and replicated writes (courier_common.redis) ---------------
    redis_sentinels: str = Field(
        default="",
        description="Comma-separated host:port of the Redis Sentinels ([v6]:port for IPv6). "
        "Set with redis_sentinel_service to reach the primary through Sentinel; redis_url's "
        "host and port are then not used (its scheme, credentials and db still are).",
    )
    redis_sentinel_service: str = Field(
        default="",
        max_length=200,
        description="The master name the Sentinels monitor ('sentinel monitor <name> ...').",
    )
    redis_sentinel_username: str | None = Field(
        default=None, description="ACL user for the Sentinels (their own, not the data nodes')."
    )
    redis_sentinel_password: SecretStr | None = Field(
        default=None, description="Password for the Sentinels (requirepass of sentinel.conf)."
    )
    redis_sentinel_tls: bool = Field(
        default=False, description="Talk TLS to the Sentinels (the data nodes: rediss://)."
    )
    redis_min_replicas: int | None = Field(
        default=None,
        ge=0,
        le=16,
        description="Replicas that must confirm a write (WAIT) before it is acknowledged: a "
        "201, an archived dead letter, an erased-user mark. Unset: 1 with Sentinel, 0 without.",
    )
    redis_replica_timeout_ms: int = Field(
        default=1000,
        ge=1,
        le=5000,
        description="How long a write waits for its replicas before the answer is a 503 "
        "'may have been applied'. Keep it well below the Redis socket timeout (10 s).",
    )
    http_host: str = Field(default="127.0.0.1")
    http_port: int = Field(default=8000, ge=0, le=65535)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["json", "console"] | None = Field(
        default=None,
        description="json or console; unset means console on a TTY, json otherwise.",
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

    @field_validator("redis_sentinels")
    @classmethod
    def _check_sentinels(cls, value: str) -> str:
        if not value.strip():
            return ""
        try:
            addresses = parse_sentinels(value)
        except ValueError as exc:
            raise ValueError(f"must be host:port,host:port: {exc}") from None
        return ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in addresses)

    @model_validator(mode="after")
    def _check_sentinel_settings(self) -> CourierSettings:
        if bool(self.redis_sentinels) != bool(self.redis_sentinel_service):
            raise ValueError(
                "COURIER_REDIS_SENTINELS and COURIER_REDIS_SENTINEL_SERVICE go together: "
                "set both to use Redis Sentinel, or neither"
            )
        if self.redis_sentinels and urlsplit(self.redis_url).scheme == "unix":
            raise ValueError(
                "COURIER_REDIS_URL is a unix socket, which Sentinel cannot point at: use "
                "redis:// or rediss:// (its host and port are not used with Sentinel)"
            )
        password = self.redis_sentinel_password
        if (
            self.environment == "production"
            and password is not None
            and password.get_secret_value() in PLACEHOLDER_SECRETS
        ):
            raise ValueError(
                "COURIER_REDIS_SENTINEL_PASSWORD is a placeholder; set a real secret for production"
            )
        return self

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

    @property
    def redis_replicas_required(self) -> int:
        """``redis_min_replicas``, or its default: 1 behind Sentinel, 0 on a single node."""
        if self.redis_min_replicas is not None:
            return self.redis_min_replicas
        return 1 if self.redis_sentinels else 0

    def redis_target(self) -> RedisTarget:
        """Where `courier_common.redis.connect` finds Redis: the URL, or the Sentinels."""
        password = self.redis_sentinel_password
        return RedisTarget(
            url=self.redis_url,
            sentinels=parse_sentinels(self.redis_sentinels) if self.redis_sentinels else (),
            service=self.redis_sentinel_service or None,
            sentinel_username=self.redis_sentinel_username,
            sentinel_password=None if password is None else password.get_secret_value(),
            sentinel_tls=self.redis_sentinel_tls,
        )

    def redis_durability(self) -> Durability:
        """How many replicas confirm a write, and for how long it waits for them."""
        return Durability(
            min_replicas=self.redis_replicas_required,
            timeout_ms=self.redis_replica_timeout_ms,
            fence_key=f"{self.redis_prefix}replication-fence",
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


class ConsumerSettings(CourierSettings):
    """The settings of a service that consumes work queues: their retry policy and limits.

    The service defines its work queues beside its handlers and builds them with
    :meth:`work_queue`, so its queues, their tiers and its runner agree by construction.
    """

    retry_delays_seconds: list[float] = Field(
        default=[5.0, 30.0, 300.0],
        min_length=1,
        description="One retry tier per delay (JSON list), strictly increasing.",
    )
    retry_max_attempts: int = Field(default=5, ge=1, le=100)
    delivery_limit: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="Deliveries of one message a worker may die on before the broker "
        "dead-letters it.",
    )
    backlog_poll_seconds: float = Field(
        default=5.0, gt=0, description="How often the work queues' depth is read for the gauges."
    )
    work_queue_max_length: int | None = Field(
        default=None,
        ge=1,
        description="Cap of the work queue; past it publishes are refused (the outbox keeps "
        "the events), never dropped.",
    )

    @model_validator(mode="after")
    def _check_retry_policy(self) -> ConsumerSettings:
        try:
            self.retry_policy()  # the policy validates itself; settings add only the names
        except ValueError as exc:
            raise ValueError(
                f"COURIER_RETRY_DELAYS_SECONDS / COURIER_RETRY_MAX_ATTEMPTS: {exc}"
            ) from None
        return self

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            delays=tuple(timedelta(seconds=d) for d in self.retry_delays_seconds),
            max_attempts=self.retry_max_attempts,
        )

    def work_queue(
        self, name: str, binding_keys: tuple[str, ...], *, capped: bool = True
    ) -> WorkQueue:
        """A work queue of this service bound to ``courier.events`` with ``binding_keys``.

        ``capped``: apply ``work_queue_max_length`` (a queue that must never refuse a publish,
        such as an erasure queue, says False).
        """
        return WorkQueue(
            name=name,
            binding_keys=binding_keys,
            retry=self.retry_policy(),
            delivery_limit=self.delivery_limit,
            max_length=self.work_queue_max_length if capped else None,
            initial_group_size=self.quorum_initial_group_size,
        )


class OutboxSettings(CourierSettings):
    """The settings of a service that emits events through the outbox and runs its relay.

    A service that also consumes combines it with `ConsumerSettings`
    (``class Settings(OutboxSettings, ConsumerSettings)``).
    """

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
