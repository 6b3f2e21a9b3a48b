"""The full matrix switch: ``@pytest.mark.matrix`` tests run only with ``--fault-matrix``.

The long runs of a scenario (RabbitMQ 4.0 in a chroot, the slow fault scenarios) are part of
``make faults``; ``make test`` deselects them (and says so in its summary), so it stays fast
without skipping anything silently. A pytest plugin: load it with ``pytest_plugins``.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("courier faults").addoption(
        "--fault-matrix",
        action="store_true",
        default=False,
        help="also run the full fault matrix (@pytest.mark.matrix); make faults sets it",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "matrix: part of the full fault matrix; only make faults (--fault-matrix)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--fault-matrix"):
        return
    deselected = [item for item in items if item.get_closest_marker("matrix")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("matrix")]
