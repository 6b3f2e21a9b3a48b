"""B3: properties of the envelope codec and the retry schedule, over generated inputs.

test_envelope.py and test_retry.py pin the behaviour on chosen examples; these state the
rules for every input hypothesis can think of:

* codec: any valid event survives encode/decode unchanged; anything else (bytes, JSON of any
  shape, a valid envelope with one attribute spoiled) raises EnvelopeError and nothing else;
* retry: the delay never shrinks as attempts grow, never exceeds the last tier, is None exactly
  when the budget is spent, and honours Retry-After with the first tier long enough.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import UUID

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from courier_common.messaging.envelope import (
    EnvelopeError,
    Event,
    EventCatalog,
    new_event,
)
from courier_common.messaging.retry import RetryPolicy, format_delay
from courier_testing.events import Pinged

#: The machine is shared with heavy tests: no per-example deadline.
relaxed = settings(deadline=None)

MAX_BODY = 64 * 1024
CATALOG = EventCatalog([Pinged], max_body_bytes=MAX_BODY)
REQUIRED = ("specversion", "id", "source", "type", "time", "version", "data")

# --- strategies -------------------------------------------------------------------------------

offsets = st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)
aware_times = st.datetimes(
    min_value=datetime(1970, 1, 2), max_value=datetime(9999, 12, 30), timezones=offsets
)
pings = st.builds(
    Pinged,
    n=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    note=st.text(max_size=200),
)
events = st.builds(
    lambda data, source, event_id, time: new_event(
        data, source=source, event_id=event_id, time=time
    ),
    pings,
    st.text(min_size=1, max_size=512),
    st.uuids(),
    aware_times,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
content_types = st.sampled_from(["application/json", "APPLICATION/JSON", "application/json; x=y"])


def decode(body: bytes, content_type: str | None = "application/json") -> Event[Any] | None:
    """The decoded event, or None when it raised EnvelopeError (anything else propagates)."""
    try:
        return CATALOG.decode(body, content_type=content_type)
    except EnvelopeError as exc:
        reason = exc.reason
    assert reason, "an EnvelopeError always says why"
    return None


# --- the codec --------------------------------------------------------------------------------


@relaxed
@given(events, content_types)
def test_every_valid_event_round_trips(event: Event[Pinged], content_type: str) -> None:
    decoded = CATALOG.decode(event.encode(), content_type=content_type)
    assert decoded == event
    assert decoded.encode() == event.encode()


@relaxed
@given(st.binary(max_size=2048), st.none() | st.text(max_size=40) | content_types)
def test_arbitrary_bytes_raise_only_envelope_error(body: bytes, content_type: str | None) -> None:
    decode(body, content_type)


@relaxed
@given(json_values)
def test_arbitrary_json_raises_only_envelope_error(document: Any) -> None:
    assert decode(json.dumps(document).encode()) is None  # no JSON value here is an envelope


@relaxed
@given(events, st.sampled_from(REQUIRED))
def test_an_envelope_missing_any_required_attribute_is_refused(
    event: Event[Pinged], name: str
) -> None:
    document = json.loads(event.encode())
    document.pop(name)  # specversion too: required on the wire, though new_event fills it in
    assert decode(json.dumps(document).encode()) is None


@relaxed
@given(events, st.sampled_from([*REQUIRED, "datacontenttype"]), json_values)
def test_a_spoiled_attribute_raises_only_envelope_error(
    event: Event[Pinged], name: str, value: Any
) -> None:
    document = json.loads(event.encode())
    document[name] = value
    decoded = decode(json.dumps(document).encode())
    if decoded is not None:  # the new value happened to be valid: then it is what we get
        assert decoded.id == UUID(str(document["id"]))
        assert decoded.data == Pinged.model_validate(document["data"])


@relaxed
@given(events, st.integers(min_value=1, max_value=64))
def test_a_truncated_envelope_is_refused(event: Event[Pinged], cut: int) -> None:
    body = event.encode()
    assume(cut < len(body))
    assert decode(body[:-cut]) is None


@relaxed
@given(st.integers(min_value=MAX_BODY + 1, max_value=MAX_BODY + 4096))
def test_a_body_over_the_limit_is_refused_unread(size: int) -> None:
    with pytest.raises(EnvelopeError, match="exceeds the limit"):
        CATALOG.decode(b"\xff" * size, content_type="application/json")


# --- the retry schedule -----------------------------------------------------------------------


@st.composite
def policies(draw: st.DrawFn, min_attempts: int = 1) -> RetryPolicy:
    """Strictly increasing tiers at millisecond resolution, as settings produce them."""
    milliseconds = draw(
        st.lists(
            st.integers(min_value=1, max_value=86_400_000), min_size=1, max_size=6, unique=True
        )
    )
    return RetryPolicy(
        delays=tuple(timedelta(milliseconds=ms) for ms in sorted(milliseconds)),
        max_attempts=draw(st.integers(min_value=min_attempts, max_value=20)),
    )


@st.composite
def policy_and_attempt(draw: st.DrawFn) -> tuple[RetryPolicy, int]:
    """A policy and an attempt that still has a retry left (drawn, not filtered: filtering
    rejected most examples and tripped hypothesis' health check on a loaded machine)."""
    policy = draw(policies(min_attempts=2))
    return policy, draw(st.integers(min_value=1, max_value=policy.max_attempts - 1))


retry_afters = st.none() | st.floats(min_value=0, max_value=200_000, allow_nan=False)


@relaxed
@given(policies(), retry_afters)
def test_delays_never_shrink_and_stop_at_the_budget(
    policy: RetryPolicy, retry_after: float | None
) -> None:
    schedule = [
        policy.next_delay(attempt, retry_after=retry_after)
        for attempt in range(1, policy.max_attempts + 3)
    ]
    waits = schedule[: policy.max_attempts - 1]
    assert all(delay is not None for delay in waits)
    assert all(delay is None for delay in schedule[policy.max_attempts - 1 :])
    assert waits == sorted(waits)  # type: ignore[type-var]
    assert all(delay in policy.delays for delay in waits)


@relaxed
@given(policy_and_attempt())
def test_late_attempts_wait_in_the_last_tier(drawn: tuple[RetryPolicy, int]) -> None:
    policy, attempt = drawn
    delay = policy.next_delay(attempt)
    assert delay is not None
    assert delay <= policy.delays[-1]
    if attempt >= len(policy.delays):
        assert delay == policy.delays[-1]
    else:
        assert delay == policy.delays[attempt - 1]


@relaxed
@given(policy_and_attempt(), retry_afters)
def test_retry_after_picks_the_first_tier_long_enough(
    drawn: tuple[RetryPolicy, int], retry_after: float | None
) -> None:
    policy, attempt = drawn
    base = policy.next_delay(attempt)
    delay = policy.next_delay(attempt, retry_after=retry_after)
    assert base is not None
    assert delay is not None
    assert delay >= base  # Retry-After only ever lengthens the wait
    if retry_after is None:
        assert delay == base
        return
    wanted = timedelta(seconds=retry_after)
    assert delay >= wanted or delay == policy.delays[-1]  # long enough, or the longest there is
    shorter = [t for t in policy.delays if base <= t < delay]
    assert all(t < wanted for t in shorter), "a shorter tier was long enough"


@relaxed
@given(policy_and_attempt(), retry_afters, retry_afters)
def test_a_longer_retry_after_never_shortens_the_wait(
    drawn: tuple[RetryPolicy, int], first: float | None, second: float | None
) -> None:
    policy, attempt = drawn
    low, high = sorted((first or 0.0, second or 0.0))
    shorter = policy.next_delay(attempt, retry_after=low)
    longer = policy.next_delay(attempt, retry_after=high)
    assert shorter is not None
    assert longer is not None
    assert shorter <= longer


@relaxed
@given(
    st.integers(min_value=1, max_value=10**9),
    st.integers(min_value=1, max_value=10**9),
)
def test_distinct_delays_get_distinct_queue_names(first_ms: int, second_ms: int) -> None:
    """Each tier is a queue named by its delay: two tiers must never share one."""
    first, second = timedelta(milliseconds=first_ms), timedelta(milliseconds=second_ms)
    assert (format_delay(first) == format_delay(second)) == (first_ms == second_ms)
