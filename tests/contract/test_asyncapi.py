"""The event contract: docs/asyncapi.yaml is what the code generates, valid AsyncAPI 3.0, and
true to what the code puts on the wire; user-service serves its half of it."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import jsonschema
import pytest
import yaml

from courier_common.asyncapi import message_key
from courier_common.events import (
    USER_EVENTS,
    USER_SERVICE_SOURCE,
    UserDeleted,
    UserRegistered,
    UserUpdated,
)
from courier_common.messaging import EventData, new_event
from scripts import asyncapi as generator
from user_service.api.contract import document as served_document
from user_service.config import Settings
from user_service.main import create_app

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "asyncapi.yaml"
SCHEMA = ROOT / "tests/contract/node_modules/@asyncapi/specs/schemas/3.0.0-without-$id.json"


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    """The official AsyncAPI 3.0.0 JSON Schema (npm @asyncapi/specs, installed by make setup)."""
    if not SCHEMA.exists():
        pytest.fail(
            f"the AsyncAPI 3.0 schema is missing ({SCHEMA.relative_to(ROOT)}): `make setup` "
            "installs it (npm ci in tests/contract). The contract tests fail instead of skipping.",
            pytrace=False,
        )
    schema = json.loads(SCHEMA.read_text())
    assert schema["properties"]["asyncapi"]["const"] == "3.0.0"
    return jsonschema.Draft7Validator(schema)


@pytest.fixture(scope="module")
def committed() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(DOC.read_text())
    return loaded


def test_the_committed_document_is_what_the_code_generates() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/asyncapi.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert DOC.read_text().startswith(generator.HEADER)


def test_a_drifted_document_is_named_with_its_diff(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    drifted = tmp_path / "asyncapi.yaml"
    drifted.write_text(generator.render().replace("user.registered", "user.signed-up", 1))
    monkeypatch.setattr(generator, "OUT", drifted)
    monkeypatch.setattr(generator, "ROOT", tmp_path)
    monkeypatch.setattr(sys, "argv", ["asyncapi.py", "--check"])
    assert generator.main() == 1
    err = capsys.readouterr().err
    assert "+++ generated" in err
    assert "user.signed-up" in err
    assert "run make asyncapi" in err


def test_the_document_is_valid_asyncapi_3(
    validator: jsonschema.Draft7Validator, committed: dict[str, Any]
) -> None:
    errors = [
        f"{list(e.absolute_path)}: {e.message[:200]}" for e in validator.iter_errors(committed)
    ]
    assert errors == []


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("operations", "publish.user.registered.v1", "action"), "publish"),  # AsyncAPI 2 verb
        (("channels", "courierEvents", "bindings", "amqp", "exchange", "type"), "bogus"),
        (("asyncapi",), "2.6.0"),
    ],
)
def test_the_validator_refuses_what_is_not_asyncapi_3(
    validator: jsonschema.Draft7Validator,
    committed: dict[str, Any],
    path: tuple[str, ...],
    value: str,
) -> None:
    broken = copy.deepcopy(committed)
    target = broken
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert not validator.is_valid(broken)


def _sample(data_type: type[EventData]) -> EventData:
    contact = {
        "user_id": uuid4(),
        "email": "ada@example.com",
        "display_name": "Ada",
        "locale": "en-GB",
        "channels": ("email", "sms"),
        "phone": "+441234567890",
    }
    if data_type is UserRegistered:
        return UserRegistered(**contact)
    if data_type is UserUpdated:
        return UserUpdated(**contact, previous_channels=("email",), changed=("channels",))
    assert data_type is UserDeleted
    return UserDeleted(user_id=uuid4())


def _payload_validator(document: dict[str, Any], key: str) -> jsonschema.Draft7Validator:
    payload = document["components"]["messages"][key]["payload"]
    return jsonschema.Draft7Validator(
        {**payload, "components": document["components"]},
        format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER,
    )


@pytest.mark.parametrize("data_type", USER_EVENTS, ids=lambda t: t.event_type)
def test_what_the_code_publishes_matches_its_message(
    committed: dict[str, Any], data_type: type[EventData]
) -> None:
    wire = json.loads(new_event(_sample(data_type), source=USER_SERVICE_SOURCE).encode())
    _payload_validator(committed, message_key(data_type)).validate(wire)
    assert committed["components"]["messages"][message_key(data_type)]["name"] == wire["type"]


def test_a_message_schema_refuses_another_event(committed: dict[str, Any]) -> None:
    deleted = json.loads(new_event(_sample(UserDeleted), source=USER_SERVICE_SOURCE).encode())
    registered = _payload_validator(committed, message_key(UserRegistered))
    assert not registered.is_valid(deleted)
    wrong_type = {**deleted, "type": "user.registered"}  # right type, wrong payload
    assert not registered.is_valid(wrong_type)


def test_every_route_receives_what_its_bindings_route_to_it(committed: dict[str, Any]) -> None:
    channels = committed["channels"]
    assert set(channels["notificationUserEvents"]["messages"]) == {
        message_key(t) for t in USER_EVENTS
    }
    assert set(channels["dlqArchiverUserEvents"]["messages"]) == {message_key(UserDeleted)}
    tiers = [tier["queue"] for tier in channels["notificationUserEvents"]["x-courier-retry-tiers"]]
    assert tiers == [
        "notification.user-events.retry.5s",
        "notification.user-events.retry.30s",
        "notification.user-events.retry.5m",
    ]


async def test_user_service_serves_the_publishing_half(
    validator: jsonschema.Draft7Validator, committed: dict[str, Any]
) -> None:
    app = create_app(Settings(environment="test"))  # no lifespan: the route needs no backend
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://user-service"
    ) as client:
        response = await client.get("/asyncapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    served = response.json()
    assert served == json.loads(json.dumps(served_document()))
    assert validator.is_valid(served)
    assert served["channels"] == {"courierEvents": committed["channels"]["courierEvents"]}
    assert served["components"] == {
        "messages": {
            key: message
            for key, message in committed["components"]["messages"].items()
            if key != "deadLetter"
        },
        "schemas": committed["components"]["schemas"],
    }
    assert served["operations"] == {
        key: op for key, op in committed["operations"].items() if key.startswith("publish.")
    }
