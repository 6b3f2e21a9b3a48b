"""The messaging tests' own topology (in-process and in worker processes).

A work queue of the tests' own, bound to the events exchange, with the production shape (retry
tiers, a delivery limit) and short delays, so a retry test takes about a second. No service's
names: these tests prove the library, not a deployment of it.
"""

from __future__ import annotations

from datetime import timedelta

from courier_common.messaging import RetryPolicy, Topology, WorkQueue

#: Short tiers so retry tests take about a second, the same shape as production.
FAST_RETRY = RetryPolicy(
    delays=(timedelta(milliseconds=300), timedelta(milliseconds=600)), max_attempts=3
)
WORK = WorkQueue(
    name="courier-test.work",
    binding_keys=("user.*", "test.*"),
    retry=FAST_RETRY,
    delivery_limit=3,
)
TOPOLOGY = Topology(work_queues=(WORK,))
