"""Shared settings: environment only, validated, no placeholder secrets in production."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from courier_common.messaging import Topology
from courier_common.settings import ConsumerSettings, CourierSettings


def test_defaults_point_at_the_local_services(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("COURIER_AMQP_URL", "COURIER_REDIS_URL", "COURIER_ENVIRONMENT"):
        monkeypatch.delenv(name, raising=False)
    settings = CourierSettings()
    assert settings.amqp_url == "amqp://guest:guest@127.0.0.1:5672/"
    assert settings.amqp_vhost == "/"
    assert settings.management_url == "http://guest:guest@127.0.0.1:15672"


def test_environment_variables_with_the_courier_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COURIER_AMQP_URL", "amqps://app:s%40cret@mq.internal:5671/prod%2Fcourier")
    monkeypatch.setenv("COURIER_LOG_LEVEL", "debug")
    monkeypatch.setenv("COURIER_AMQP_PREFETCH", "64")
    settings = CourierSettings()
    assert settings.amqp_vhost == "prod/courier"
    assert settings.management_url == "https://app:s%40cret@mq.internal:15672"
    assert settings.log_level == "DEBUG"
    assert settings.amqp_prefetch == 64


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("amqp_url", "http://broker", "amqp://user:password@host"),
        ("redis_url", "localhost:6379", "redis://host:6379/0"),
        ("amqp_prefetch", 0, "greater than or equal to 1"),
        ("log_format", "xml", "'json' or 'console'"),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(
    field: str, value: object, message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        CourierSettings.model_validate({field: value})


def test_production_refuses_placeholder_passwords() -> None:
    with pytest.raises(ValidationError, match="COURIER_AMQP_URL uses a placeholder password"):
        CourierSettings(environment="production")
    settings = CourierSettings(
        environment="production",
        amqp_url="amqp://courier:Xy7-long-random@rabbitmq:5672/",
        redis_url="redis://:An0ther-secret@redis:6379/0",
    )
    assert settings.environment == "production"


def test_a_cluster_is_a_comma_separated_list_of_node_urls() -> None:
    settings = CourierSettings(
        amqp_url="amqp://app:s%40cret@mq-0:5672/prod, amqp://app:s%40cret@mq-1:5672/prod,"
        "amqp://app:s%40cret@mq-2/prod"
    )
    assert settings.amqp_urls == (
        "amqp://app:s%40cret@mq-0:5672/prod",
        "amqp://app:s%40cret@mq-1:5672/prod",
        "amqp://app:s%40cret@mq-2/prod",
    )
    assert settings.amqp_vhost == "prod"
    # The management API: one per node, tried in turn by the backlog monitor.
    assert settings.management_urls == (
        "http://app:s%40cret@mq-0:15672",
        "http://app:s%40cret@mq-1:15672",
        "http://app:s%40cret@mq-2:15672",
    )
    explicit = CourierSettings(amqp_management_url="http://m-0:15672/, http://m-1:15672")
    assert explicit.management_urls == ("http://m-0:15672", "http://m-1:15672")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("amqp://u:p@a/v,http://b/v", "URL 2 of 2 must look like amqp://"),
        ("amqp://u:p@a/v,amqp://u:p@b/w", "URL 2 of 2 differs from the first"),
        ("amqp://u:p@a/v,amqp://u:other@b/v", "same vhost with the same credentials"),
        ("amqp://u:p@a:notaport/v", "is not a URL"),
        (",", "must look like amqp://"),
    ],
)
def test_a_bad_url_list_names_the_url_and_never_shows_a_password(value: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message) as info:
        CourierSettings(amqp_url=value)
    assert "other" not in str(info.value)
    assert ":p@" not in str(info.value)


def test_production_checks_the_password_of_a_url_list() -> None:
    with pytest.raises(ValidationError, match="placeholder password"):
        CourierSettings(
            environment="production",
            amqp_url="amqp://guest:guest@mq-0/,amqp://guest:guest@mq-1/",
            redis_url="redis://:An0ther-secret@redis:6379/0",
        )


def test_the_initial_group_size_goes_to_every_quorum_queue() -> None:
    settings = ConsumerSettings(quorum_initial_group_size=5)
    work = settings.work_queue("courier-test.work", ("test.*",))
    assert work.arguments()["x-quorum-initial-group-size"] == 5
    for delay in work.retry.delays:
        assert work.retry_arguments(delay)["x-quorum-initial-group-size"] == 5
    topology = Topology(work_queues=(work,), initial_group_size=settings.quorum_initial_group_size)
    assert topology.dead_letter_queue_arguments["x-quorum-initial-group-size"] == 5
    assert CourierSettings().quorum_initial_group_size == 3
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        CourierSettings(quorum_initial_group_size=0)


@pytest.mark.parametrize(
    ("delays", "message"),
    [
        ([30.0, 5.0], "retry delays must be strictly increasing"),
        ([5.0, 5.0], "retry delays must be strictly increasing"),
        ([0.0, 5.0], "retry delays must be positive"),
    ],
)
def test_a_bad_retry_policy_is_refused_by_the_policy_itself(
    delays: list[float], message: str
) -> None:
    """The settings ask RetryPolicy, so a service's environment and the library agree."""
    with pytest.raises(ValidationError, match=f"COURIER_RETRY_DELAYS_SECONDS.*{message}"):
        ConsumerSettings(retry_delays_seconds=delays)
    assert ConsumerSettings(retry_delays_seconds=[1.0, 2.0]).retry_policy().delays[1].seconds == 2
