"""``GET /asyncapi.json``: the events user-service publishes, as an AsyncAPI 3.0 document.

Built at start from the same catalog and topology the service publishes with
(:func:`courier_common.asyncapi.contract_document`), so it cannot drift from what goes on the
wire. The platform's document, with every consumer's route as well, is ``docs/asyncapi.yaml``
in the repository (``make asyncapi``).
"""

from __future__ import annotations

import functools
from importlib.metadata import version
from typing import Any

from fastapi import APIRouter

from courier_common.asyncapi import contract_document
from courier_common.events import USER_EVENTS

SERVICE = "user-service"
TITLE = "Courier user events"

router = APIRouter()


@functools.cache
def document() -> dict[str, Any]:
    """user-service's AsyncAPI document: the user events it publishes on ``courier.events``."""
    return contract_document(USER_EVENTS, title=TITLE, version=version(SERVICE), publisher=SERVICE)


@router.get("/asyncapi.json", include_in_schema=False)
async def asyncapi() -> dict[str, Any]:
    return document()
