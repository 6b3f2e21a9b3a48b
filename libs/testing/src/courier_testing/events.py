"""Events as Courier's publishers would put them on the wire, for tests and the benchmark."""

from __future__ import annotations

from typing import Any

import aio_pika

from courier_common.events import USER_SERVICE_SOURCE, UserRegistered
from courier_common.messaging import Event, new_event, new_event_id


def user_registered(email: str, **contact: Any) -> Event[UserRegistered]:
    """A ``user.registered`` event as user-service emits it, for a contact nobody registered:
    a fresh user id, and Ada, ``en``, email only unless *contact* says otherwise."""
    fields: dict[str, Any] = {
        "user_id": new_event_id(),
        "email": email,
        "display_name": "Ada",
        "locale": "en",
        "channels": ("email",),
        **contact,
    }
    return new_event(UserRegistered(**fields), source=USER_SERVICE_SOURCE)


def message_for(event: Any, **headers: Any) -> aio_pika.Message:
    """An AMQP message as Courier's publisher would build it for ``event``."""
    return aio_pika.Message(
        body=event.encode(),
        content_type="application/json",
        message_id=str(event.id),
        type=event.type,
        headers=headers,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
