"""C1 to C3: a three-node RabbitMQ cluster loses a node while users register and mail goes out.

Every Courier queue is a quorum queue created with ``x-quorum-initial-group-size`` 3, so it
has a member on each node and survives losing any one of them (a majority, 2 of 3, stays).
The services know every node (``COURIER_AMQP_URL`` is the list): a service connected to the
node that dies reconnects to the next one, the outbox republishes what was not confirmed, and
the worker's unacked deliveries come back, so duplicates stay within the prefetch.
"""

from __future__ import annotations

import time

import pytest

from courier_testing.private_services import PrivateRabbitMQ
from tests.support.cluster import ClusterFaultStack, RabbitCluster
from tests.support.load import RegistrationLoad

pytestmark = pytest.mark.fault

WORK_QUEUE = "notification.user-events"
#: notification-service's default prefetch: the most deliveries one lost connection strands.
PREFETCH = 32
CHANNELS = ("email", "sms")


def wait_new_leader(cluster: RabbitCluster, old: PrivateRabbitMQ, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    leader = old.nodename
    while time.monotonic() < deadline:
        try:
            leader = str(cluster.queue(WORK_QUEUE)["leader"])
        except Exception:  # the API may be between nodes
            leader = old.nodename
        if leader != old.nodename and cluster.node(leader).running:
            return leader
        time.sleep(0.5)
    raise AssertionError(f"no new leader of {WORK_QUEUE} in {timeout} s (still {leader})")


def assert_three_members(cluster: RabbitCluster) -> None:
    for queue in (WORK_QUEUE, "courier.dead-letters", "dlq-archiver.user-events"):
        members = cluster.members(queue)
        assert sorted(members) == sorted(n.nodename for n in cluster.nodes), (queue, members)


def test_c1_sigkill_the_leader_of_the_work_queue(cluster_stack: ClusterFaultStack) -> None:
    cluster = cluster_stack.cluster
    ledger = cluster_stack.ledger(f"C1 cluster: SIGKILL the leader of {WORK_QUEUE}")
    assert_three_members(cluster)  # the initial group size followed the cluster
    load = RegistrationLoad(ledger, cluster_stack.users, channels=CHANNELS, pause=0.02).start()
    load.wait_for(40)
    leader = cluster.leader(WORK_QUEUE)
    leader.kill()
    killed_at = time.monotonic()
    new_leader = wait_new_leader(cluster, leader)
    load.wait_for(len(load.answers) + 60)  # registrations and sends go on
    load.stop()
    print(f"C1: {leader.nodename} led {WORK_QUEUE} and was SIGKILLed; {new_leader} took over")
    during = load.between(killed_at, time.monotonic())
    assert {a.status for a in during} == {201}
    cluster_stack.check(ledger, duplicate_bound=PREFETCH, recovery_started=killed_at)
    # The node comes back as a member of every queue it had.
    leader.start()
    cluster.wait_running(3)
    assert_three_members(cluster)


@pytest.mark.matrix
def test_c2_rolling_restart_of_every_node_under_load(cluster_stack: ClusterFaultStack) -> None:
    """What a StatefulSet upgrade does: one pod at a time, each after quorum + 1 is online."""
    cluster = cluster_stack.cluster
    ledger = cluster_stack.ledger("C2 cluster: rolling restart of all three nodes")
    load = RegistrationLoad(ledger, cluster_stack.users, channels=CHANNELS, pause=0.02).start()
    load.wait_for(30)
    restarted_at = time.monotonic()
    for node in reversed(cluster.nodes):  # a StatefulSet goes from the highest ordinal down
        cluster.wait_quorum_plus_one(node)
        node.stop()
        load.wait_for(len(load.answers) + 15)
        node.start()
        restarted_at = time.monotonic()
        cluster.wait_running(3)
        load.wait_for(len(load.answers) + 15)
    load.wait_for(len(load.answers) + 30)
    load.stop()
    assert {a.status for a in load.answers} == {201}
    cluster_stack.check(ledger, duplicate_bound=3 * PREFETCH, recovery_started=restarted_at)
    assert_three_members(cluster)


@pytest.mark.matrix
def test_c3_a_follower_stopped_for_a_minute(cluster_stack: ClusterFaultStack) -> None:
    cluster = cluster_stack.cluster
    ledger = cluster_stack.ledger("C3 cluster: a follower stopped for 60 s")
    load = RegistrationLoad(ledger, cluster_stack.users, channels=CHANNELS, pause=0.05).start()
    load.wait_for(30)
    leader = cluster.leader(WORK_QUEUE)
    follower = next(n for n in cluster.nodes if n is not leader)
    follower.stop()
    stopped_at = time.monotonic()
    while time.monotonic() - stopped_at < 60:
        time.sleep(1)
    during = load.between(stopped_at, time.monotonic())
    follower.start()
    started_at = time.monotonic()
    cluster.wait_running(3)
    load.wait_for(len(load.answers) + 30)
    load.stop()
    assert len(during) >= 100, f"only {len(during)} registrations while the follower was down"
    assert {a.status for a in load.answers} == {201}
    # The leader never changed: losing a follower costs nothing but redundancy.
    assert cluster.leader(WORK_QUEUE) is leader
    cluster_stack.check(ledger, duplicate_bound=PREFETCH, recovery_started=started_at)
    assert_three_members(cluster)
    print(f"C3: {follower.nodename} was stopped for 60 s; {len(during)} registrations meanwhile")
