"""How long Courier's retry loops wait between attempts: one policy, written once.

Every loop that retries an outside system — connecting to the broker, storing a dead letter
while Redis is away, publishing outbox entries the broker refused, restarting a crashed
background task — waits ``initial`` seconds after its first failure, then twice as long
after each further one, up to a ceiling, and starts again from ``initial`` after a success.
The loops differ in what they retry and when they give up, which is why they stay loops
(tenacity's retry-a-call control flow fits none of them: they watch stop events, rotate
nodes, rate-limit warnings); what they share is this sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Backoff:
    """Doubling waits: ``initial``, ``2·initial``, … capped at ``maximum`` (seconds).

    >>> backoff = Backoff(initial=0.2, maximum=1.0)
    >>> [backoff.next() for _ in range(5)]
    [0.2, 0.4, 0.8, 1.0, 1.0]
    >>> backoff.reset(); backoff.next()
    0.2
    """

    initial: float = 0.2
    maximum: float = 5.0
    factor: float = 2.0
    _current: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.maximum < self.initial or self.factor < 1:
            raise ValueError("a backoff needs 0 < initial <= maximum and factor >= 1")

    @property
    def current(self) -> float:
        """The last wait :meth:`next` gave; 0 before the first failure or after a reset."""
        return self._current

    def next(self, *, maximum: float | None = None) -> float:
        """The wait before the next attempt; ``maximum`` overrides the ceiling for this one.

        A loop whose ceiling depends on the failure (the broker refusing us is waited out
        longer than the broker being away) passes it here.
        """
        ceiling = self.maximum if maximum is None else maximum
        grown = self.initial if self._current == 0 else self._current * self.factor
        self._current = max(self.initial, min(grown, ceiling))
        return self._current

    def reset(self) -> None:
        """After a success: the next failure waits ``initial`` again."""
        self._current = 0.0
