"""Shared settings: environment only, validated, no placeholder secrets in production."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from courier_common.settings import CourierSettings


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
