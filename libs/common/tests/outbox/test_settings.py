"""OutboxSettings: the relay's settings keep the environment names deployments already set."""

from __future__ import annotations

import pytest

from courier_common.settings import ConsumerSettings, OutboxSettings


def test_the_outbox_settings_are_read_from_their_courier_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in {
        "COURIER_OUTBOX_BATCH_SIZE": "50",
        "COURIER_OUTBOX_BLOCK_MS": "100",
        "COURIER_OUTBOX_CLAIM_IDLE_MS": "1000",
        "COURIER_OUTBOX_RETRY_MAX_SECONDS": "0.5",
        "COURIER_RELAY_ENABLED": "false",
    }.items():
        monkeypatch.setenv(name, value)
    settings = OutboxSettings()
    assert (
        settings.outbox_batch_size,
        settings.outbox_block_ms,
        settings.outbox_claim_idle_ms,
        settings.outbox_retry_max_seconds,
        settings.relay_enabled,
    ) == (50, 100, 1000, 0.5, False)


def test_a_service_that_also_consumes_combines_both() -> None:
    class Settings(OutboxSettings, ConsumerSettings):
        pass

    settings = Settings(outbox_batch_size=7, retry_max_attempts=3)
    assert (settings.outbox_batch_size, settings.retry_policy().max_attempts) == (7, 3)
