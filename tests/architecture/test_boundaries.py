"""The layering the code promises: AMQP lives in courier_common, routes live in the services."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from courier_common.messaging import WorkQueue

REPO = Path(__file__).resolve().parents[2]
SERVICE_SOURCES = sorted(REPO.glob("services/*/src/**/*.py"))
LIBRARY_SOURCES = sorted((REPO / "libs" / "common" / "src").rglob("*.py"))
AMQP_LIBRARIES = {"aio_pika", "aiormq", "pamqp"}
#: Every consuming service's routes module, and what it defines.
ROUTES = ("notification_service.routes", "dlq_archiver.routes")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_the_sources_are_where_the_test_looks() -> None:
    assert len(SERVICE_SOURCES) > 20
    assert any(p.name == "loop.py" for p in LIBRARY_SOURCES)


@pytest.mark.parametrize("path", SERVICE_SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_service_module_imports_an_amqp_library(path: Path) -> None:
    assert not imported_modules(path) & AMQP_LIBRARIES, (
        f"{path.relative_to(REPO)} imports an AMQP library: use courier_common.messaging "
        "(Delivery, DeliveryLoop, the settlements) instead"
    )


def service_queue_names() -> set[str]:
    names: set[str] = set()
    for module_name in ROUTES:
        module = importlib.import_module(module_name)
        for value in vars(module).values():
            if isinstance(value, str) and re.fullmatch(r"[a-z-]+\.[a-z.-]+", value):
                names.add(value)
            if isinstance(value, WorkQueue):
                names.add(value.name)
    return names


def test_the_library_names_no_service_queue() -> None:
    names = service_queue_names()
    assert {"notification.user-events", "dlq-archiver.user-events"} <= names
    for path in LIBRARY_SOURCES:
        text = path.read_text()
        for name in names:
            assert name not in text, f"{path.relative_to(REPO)} names {name!r}, a service's queue"
