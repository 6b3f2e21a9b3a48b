"""The retry schedule: tiers by attempt, Retry-After honoured, budget capped."""

from __future__ import annotations

from datetime import timedelta

import pytest

from courier_common.messaging.retry import RetryPolicy, format_delay

S = timedelta(seconds=1)


def test_each_attempt_waits_in_the_next_tier_then_the_last_one() -> None:
    policy = RetryPolicy(delays=(5 * S, 30 * S, 300 * S), max_attempts=6)
    assert [policy.next_delay(a) for a in range(1, 7)] == [
        5 * S,
        30 * S,
        300 * S,
        300 * S,
        300 * S,
        None,
    ]


def test_budget_of_one_attempt_never_retries() -> None:
    assert RetryPolicy(max_attempts=1).next_delay(1) is None


def test_retry_after_picks_the_first_tier_long_enough() -> None:
    policy = RetryPolicy(delays=(5 * S, 30 * S, 300 * S), max_attempts=5)
    assert policy.next_delay(1, retry_after=20) == 30 * S
    assert policy.next_delay(1, retry_after=5) == 5 * S
    assert policy.next_delay(1, retry_after=10_000) == 300 * S
    assert policy.next_delay(3, retry_after=1) == 300 * S


@pytest.mark.parametrize(
    "delays",
    [(), (10 * S, 5 * S), (5 * S, 5 * S), (timedelta(0),)],
)
def test_bad_schedules_are_refused(delays: tuple[timedelta, ...]) -> None:
    with pytest.raises(ValueError, match="delay"):
        RetryPolicy(delays=delays)


@pytest.mark.parametrize(
    ("delay", "name"),
    [
        (timedelta(milliseconds=250), "250ms"),
        (timedelta(seconds=5), "5s"),
        (timedelta(seconds=90), "90s"),
        (timedelta(minutes=5), "5m"),
        (timedelta(hours=1), "1h"),
        (timedelta(milliseconds=1500), "1500ms"),
    ],
)
def test_delay_names(delay: timedelta, name: str) -> None:
    assert format_delay(delay) == name
