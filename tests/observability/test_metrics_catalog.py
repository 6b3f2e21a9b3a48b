"""Each running service exposes exactly the families docs/metrics.md lists for it, lint-free.

The services run as processes (the console scripts), get real traffic (a welcome sent, a
permanent failure dead-lettered, archived and replayed) so labelled families have samples, and
their ``/metrics`` is compared with the catalog: family names and types, and the label names of
every sample. ``promtool check metrics`` then lints each exposition.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from courier_sinks.smtp import SmtpSink
from tests.support.archiver import ADMIN
from tests.support.chain import SERVICES, Chain
from tests.support.prometheus import require_binary

CATALOG = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
SERVICE_CODES = {"U": "user-service", "N": "notification-service", "A": "dlq-archiver"}
ROW = re.compile(
    r"^\| `(?P<name>[a-z_:]+)` \| (?P<type>counter|gauge|histogram|summary) "
    r"\| (?P<labels>[^|]*) \| (?P<services>[UNA ]+) \| [^|]+ \|$"
)
#: Labels the client library adds to samples of some types.
SAMPLE_LABELS = {"histogram": {"le"}, "summary": {"quantile"}}


def catalog() -> dict[str, dict[str, tuple[str, frozenset[str]]]]:
    """service → {family: (type, label names)} from the catalog's service tables."""
    entries: dict[str, dict[str, tuple[str, frozenset[str]]]] = {s: {} for s in SERVICES}
    for line in CATALOG.read_text().splitlines():
        match = ROW.match(line.strip())
        if match is None:
            continue
        labels = frozenset(re.findall(r"`([a-z_]+)`", match["labels"]))
        for code in match["services"].split():
            entries[SERVICE_CODES[code]][match["name"]] = (match["type"], labels)
    return entries


def exposed(text: str) -> dict[str, tuple[str, set[frozenset[str]]]]:
    """family → (type, the label-name sets its samples carry) as the client exposes them."""
    families: dict[str, tuple[str, set[frozenset[str]]]] = {}
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.MULTILINE))
    for family in text_string_to_metric_families(text):
        # The parser strips _total from counters; the exposition's TYPE line keeps the name.
        name = family.name + "_total" if family.type == "counter" else family.name
        assert types.get(name) == family.type, (name, family.type)
        extra = SAMPLE_LABELS.get(family.type, set())
        label_sets = {frozenset(set(sample.labels) - extra) for sample in family.samples}
        families[name] = (family.type, label_sets)
    return families


def test_the_catalog_parses() -> None:
    entries = catalog()
    assert all(entries.values()), "every service has catalogued families"
    assert "courier_outbox_backlog" in entries["user-service"]
    assert "courier_notifications_total" in entries["notification-service"]
    assert "courier_dead_letters_archived_total" in entries["dlq-archiver"]


def drive_traffic(chain: Chain, smtp_sink: SmtpSink) -> None:
    """A welcome sent, and one permanent failure archived and replayed."""
    chain.register("ada@example.com")
    smtp_sink.fail_next(1, 550, "5.1.1 mailbox unknown")
    chain.register("bob@example.com")
    archiver = httpx.Client(base_url=chain.url("dlq-archiver"), headers=ADMIN, timeout=10)
    deadline = time.monotonic() + 60
    items: list[dict[str, object]] = []
    while time.monotonic() < deadline and not (items and smtp_sink.messages):
        items = archiver.get("/v1/dead-letters").json()["items"]
        time.sleep(0.2)
    assert items, "the permanent failure was archived"
    assert smtp_sink.messages, "a welcome was sent"
    replayed = archiver.post(f"/v1/dead-letters/{items[0]['id']}/replay")
    assert replayed.status_code in (200, 202), replayed.text

    def settled() -> bool:
        text = chain.metrics_text("dlq-archiver")
        return "courier_replays_total{" in text and "courier_dead_letter_group_size{" in text

    while time.monotonic() < deadline and not settled():
        time.sleep(0.2)
    assert settled(), "the archiver counted the replay and refreshed its group gauge"


def test_each_service_exposes_exactly_its_catalogued_families(
    chain: Chain, smtp_sink: SmtpSink
) -> None:
    tool = require_binary("promtool")
    drive_traffic(chain, smtp_sink)
    expected = catalog()
    for service in SERVICES:
        text = chain.metrics_text(service)
        families = exposed(text)
        want = expected[service]
        assert set(families) == set(want), (
            f"{service}: exposed but not catalogued {sorted(set(families) - set(want))}; "
            f"catalogued but not exposed {sorted(set(want) - set(families))}"
        )
        for name, (kind, label_sets) in families.items():
            want_kind, want_labels = want[name]
            assert kind == want_kind, f"{service} {name}: type {kind}, catalog says {want_kind}"
            for labels in label_sets:
                assert labels == want_labels, (
                    f"{service} {name}: labels {sorted(labels)}, catalog says {sorted(want_labels)}"
                )
        lint = subprocess.run(
            [tool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
        )
        problems = f"{lint.stdout}{lint.stderr}".strip()
        assert lint.returncode == 0, f"promtool check metrics on {service}:\n{problems}"
        assert not problems, f"promtool check metrics on {service}:\n{problems}"
