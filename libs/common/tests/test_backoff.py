"""The one backoff sequence every retry loop uses."""

from __future__ import annotations

import pytest

from courier_common.backoff import Backoff


def test_waits_double_up_to_the_ceiling_and_start_over_after_a_reset() -> None:
    backoff = Backoff(initial=0.2, maximum=1.0)
    assert backoff.current == 0
    assert [backoff.next() for _ in range(5)] == [0.2, 0.4, 0.8, 1.0, 1.0]
    backoff.reset()
    assert backoff.next() == 0.2


def test_a_ceiling_can_be_raised_or_lowered_for_one_wait() -> None:
    backoff = Backoff(initial=1.0, maximum=2.0)
    assert [backoff.next(maximum=8.0) for _ in range(4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff.next() == 2.0  # back under the usual ceiling
    assert backoff.next(maximum=0.5) == 1.0  # never below the first wait


@pytest.mark.parametrize(
    "arguments", [{"initial": 0}, {"initial": 2, "maximum": 1}, {"factor": 0.5}]
)
def test_a_backoff_that_would_not_wait_or_shrink_is_refused(arguments: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="0 < initial <= maximum"):
        Backoff(**arguments)
