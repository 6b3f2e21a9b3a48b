"""Courier's test kit: what the library's tests, the services' tests, the cross-service tests
and the benchmark share.

It knows courier_common (its settings, events and messaging), the shared RabbitMQ and Redis,
and how to start, kill and stand in for the servers around them; it knows nothing of the
Courier stack itself (the services, the chain, the fault ledger: the repository's
``tests/support``). The pytest plugins among its modules (``fixtures``, ``matrix``,
``private_services``, ``rabbitmq4``) are loaded by a conftest's ``pytest_plugins``.
"""
