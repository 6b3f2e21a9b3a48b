"""Fixtures for every test in the repository (libs, services and cross-service tests)."""

pytest_plugins = [
    "tests.support.fixtures",
    "tests.support.private_services",
    "tests.support.processes",
    "tests.support.stack",
    "tests.support.archiver",
    "tests.support.chain",
    "tests.support.rabbitmq4",
    "tests.support.faults",
    "tests.support.cluster",
]
