"""Fixtures for every test in the repository (libs, services and cross-service tests)."""

from pathlib import Path

import pytest

pytest_plugins = [
    "courier_testing.fixtures",
    "courier_testing.matrix",
    "courier_testing.private_services",
    "courier_testing.rabbitmq4",
    "tests.support.processes",
    "tests.support.stack",
    "tests.support.archiver",
    "tests.support.chain",
    "tests.support.faults",
    "tests.support.cluster",
]

#: `make test-images` runs these (after `make images`); `make test` never collects them.
IMAGE_TESTS = Path(__file__).resolve().parent / "tests" / "images"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Leave tests/images out unless the command line names it (or a path inside it)."""
    if collection_path != IMAGE_TESTS:
        return None
    for arg in config.args:
        named = Path(arg.split("::", 1)[0]).resolve()
        if named == IMAGE_TESTS or IMAGE_TESTS in named.parents:
            return None
    return True
