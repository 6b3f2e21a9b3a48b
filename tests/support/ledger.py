"""The ledger oracle of the fault suite: what was accepted against what was sent or kept.

A = every (user, channel) a registration answered 201 for: a notification Courier owes.
S = sends the sinks recorded, by (user, channel): SMTP messages by recipient, SMS by phone,
    push by device token (each registration gets its own address, number and token).
D = users with a dead letter in the archive: every channel of theirs that was not sent is
    accounted for there, waiting for an operator.

lost = A − (S ∪ D) must be empty; unexpected = S − A must be empty; duplicates (an effect
delivered twice) are counted and must stay within what was in flight at a crash.
HTTP providers see Courier's Idempotency-Key, so a re-sent SMS or push is the provider's
replay, not a second delivery; those replays are counted apart (``provider_replays``).
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from courier_sinks.http import HttpSink
from courier_sinks.smtp import SmtpSink
from tests.support.archiver import ADMIN

Key = tuple[str, str]  # (user id, channel)
CHANNELS = ("email", "sms", "push")

_serial = itertools.count(1)


@dataclass(frozen=True)
class Contact:
    user_id: str
    email: str
    phone: str
    push_token: str
    channels: tuple[str, ...]


@dataclass
class Tally:
    """One scenario's row in the report."""

    scenario: str
    accepted: int
    sent: int
    dead_lettered: int
    lost: int
    unexpected: int
    duplicates: int
    provider_replays: int = 0
    #: Registrations answered 503 or cut off (outcome unknown) whose welcome went out anyway.
    in_doubt_sent: int = 0
    recovery_seconds: float | None = None
    lost_keys: list[Key] = field(default_factory=list)
    unexpected_keys: list[Key] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("lost_keys")
        data.pop("unexpected_keys")
        return data


class Ledger:
    """Registers users through user-service and keeps A; `tally` reads S and D."""

    def __init__(self, scenario: str) -> None:
        self.scenario = scenario
        self.accepted: dict[str, Contact] = {}
        self.refused: list[tuple[int, str]] = []
        #: Registrations whose outcome the client cannot know: answered 503 (the store
        #: stopped answering, maybe after applying the write) or cut off by a transport error.
        self.in_doubt: list[dict[str, Any]] = []
        self._by_address: dict[tuple[str, str], str] = {}

    def new_payload(self, channels: tuple[str, ...] = ("email",)) -> dict[str, Any]:
        """A registration body with an address, number and token nobody else has."""
        n = next(_serial)
        return {
            "email": f"ledger-{n}-{time.monotonic_ns()}@example.com",
            "display_name": f"User {n}",
            "locale": "en",
            "channels": list(channels),
            "phone": f"+1555{n:07d}"[:16],
            "push_token": f"ledger-token-{n}-{time.monotonic_ns()}",
        }

    def record(self, payload: dict[str, Any], response: httpx.Response) -> Contact | None:
        """Note the answer to a registration: a 201 enters A, anything else is kept apart.

        A 503 is also in doubt (see `record_in_doubt`): Redis may have applied the write and
        died before it answered, and then the welcome is owed to a user the client was told
        to retry for.
        """
        if response.status_code != 201:
            self.refused.append((response.status_code, response.text[:200]))
            if response.status_code == 503:
                self.record_in_doubt(payload)
            return None
        user_id = str(response.json()["id"])
        contact = Contact(
            user_id=user_id,
            email=payload["email"].lower(),
            phone=payload["phone"],
            push_token=payload["push_token"],
            channels=tuple(payload["channels"]),
        )
        self.accepted[user_id] = contact
        self._by_address[("email", contact.email)] = user_id
        self._by_address[("sms", contact.phone)] = user_id
        self._by_address[("push", contact.push_token)] = user_id
        return contact

    def record_in_doubt(self, payload: dict[str, Any]) -> None:
        """A registration with no definite answer: its sends are neither owed nor unexpected.

        They are counted apart (``in_doubt_sent``), under the user id ``~<serial>``.
        """
        doubt_id = f"~{len(self.in_doubt)}"
        self.in_doubt.append(payload)
        self._by_address.setdefault(("email", payload["email"].lower()), doubt_id)
        self._by_address.setdefault(("sms", payload["phone"]), doubt_id)
        self._by_address.setdefault(("push", payload["push_token"]), doubt_id)

    def register(
        self, client: httpx.Client, channels: tuple[str, ...] = ("email",)
    ) -> Contact | None:
        payload = self.new_payload(channels)
        return self.record(payload, client.post("/v1/users", json=payload))

    @property
    def owed(self) -> set[Key]:
        return {(c.user_id, ch) for c in self.accepted.values() for ch in c.channels}

    # --- S and D ------------------------------------------------------------------------------

    def sends(self, smtp: SmtpSink, http: HttpSink) -> tuple[Counter[Key], int]:
        """Deliveries by (user, channel), and the provider-side idempotent replays.

        An address nobody registered counts under the user id ``?<address>``.
        """
        sent: Counter[Key] = Counter()
        for message in smtp.messages:
            for rcpt in message["rcpt_tos"]:
                email = rcpt.lower()
                sent[(self._by_address.get(("email", email), f"?{email}"), "email")] += 1
        replays = 0
        for request in http.requests:
            channel = request["path"].strip("/")
            if channel not in ("sms", "push") or request["status"] != 202:
                continue
            if request["replay"]:
                replays += 1
                continue
            body = request["body"] if isinstance(request["body"], dict) else {}
            address = str(body.get("to" if channel == "sms" else "token", ""))
            sent[(self._by_address.get((channel, address), f"?{address}"), channel)] += 1
        return sent, replays

    @staticmethod
    def dead_letter_users(archiver_url: str) -> set[str]:
        """User ids of every archived dead letter (paged through the archiver's API)."""
        users: set[str] = set()
        cursor: str | None = None
        with httpx.Client(base_url=archiver_url, headers=ADMIN, timeout=30) as client:
            while True:
                params: dict[str, Any] = {"limit": 500}
                if cursor:
                    params["cursor"] = cursor
                page = client.get("/v1/dead-letters", params=params)
                page.raise_for_status()
                body = page.json()
                users.update(str(i["user_id"]) for i in body["items"] if i.get("user_id"))
                cursor = body.get("next_cursor")
                if not cursor:
                    return users

    def tally(
        self,
        *,
        smtp: SmtpSink,
        http: HttpSink,
        archiver_url: str,
        recovery_seconds: float | None = None,
    ) -> Tally:
        sent, replays = self.sends(smtp, http)
        dead_users = self.dead_letter_users(archiver_url)
        owed = self.owed
        delivered = set(sent)
        lost = sorted(k for k in owed - delivered if k[0] not in dead_users)
        in_doubt = {k for k in delivered if k[0].startswith("~")}
        unexpected = sorted(delivered - owed - in_doubt)
        return Tally(
            scenario=self.scenario,
            accepted=len(owed),
            sent=len(delivered & owed),
            dead_lettered=len({k for k in owed - delivered if k[0] in dead_users}),
            lost=len(lost),
            unexpected=len(unexpected),
            duplicates=sum(n - 1 for n in sent.values() if n > 1),
            provider_replays=replays,
            in_doubt_sent=len({user for user, _ in in_doubt}),
            recovery_seconds=recovery_seconds,
            lost_keys=lost,
            unexpected_keys=unexpected,
        )

    def settle(
        self,
        *,
        smtp: SmtpSink,
        http: HttpSink,
        archiver_url: str,
        timeout: float = 120,
        recovery_seconds: float | None = None,
    ) -> Tally:
        """Wait until nothing is lost (or *timeout*), then give the final tally."""
        deadline = time.monotonic() + timeout
        tally = self.tally(smtp=smtp, http=http, archiver_url=archiver_url)
        while tally.lost and time.monotonic() < deadline:
            time.sleep(0.5)
            tally = self.tally(smtp=smtp, http=http, archiver_url=archiver_url)
        tally.recovery_seconds = recovery_seconds
        return tally
