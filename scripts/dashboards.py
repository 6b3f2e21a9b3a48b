"""Generate Courier's Grafana dashboards into charts/courier/dashboards.

Dashboards are code (grafana-foundation-sdk, Grafana 11.6 schema); the JSON files are its
output, committed so the chart ships them as ConfigMaps for the Grafana sidecar. Never edit
the JSON by hand: change this file and run `make dashboards`.

Every query uses only the families in docs/metrics.md, selects a service with
`courier_service` and the namespaces with `namespace=~"$namespace"`; RabbitMQ's own series
are selected by `vhost=~"$vhost"` and `queue` (the broker may run in another namespace).

    uv run python scripts/dashboards.py           # rewrite charts/courier/dashboards
    uv run python scripts/dashboards.py --check   # exit 1 when a committed file drifted
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders import bargauge, common, stat, timeseries
from grafana_foundation_sdk.builders import dashboard as builder
from grafana_foundation_sdk.builders import prometheus as prom
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_model
from grafana_foundation_sdk.models import dashboard as model

from notification_service.routes import USER_EVENTS_QUEUE

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "charts" / "courier" / "dashboards"

USER_SERVICE = "user-service"
NOTIFICATION_SERVICE = "notification-service"
DLQ_ARCHIVER = "dlq-archiver"

#: The work queue whose depth drives notification-service's HPA (chart: autoscaling.queue).
WORK_QUEUE = USER_EVENTS_QUEUE
#: Default of the `messages_per_replica` constant: the chart's autoscaling.messagesPerReplica.
MESSAGES_PER_REPLICA = "100"

RATE_INTERVAL = "$__rate_interval"
NAMESPACE = 'namespace=~"$namespace"'
VHOST = 'vhost=~"$vhost"'
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")

#: Panel sizes on Grafana's 24-column grid.
THIRD, HALF, FULL = 8, 12, 24
HEIGHT = 8


# --- PromQL ---------------------------------------------------------------------------------


def service(name: str, *matchers: str) -> str:
    """Label matchers for one Courier service's series in the selected namespaces."""
    return "{" + ", ".join((f'courier_service="{name}"', NAMESPACE, *matchers)) + "}"


def rate(metric: str, selector: str) -> str:
    """Per-second rate of a counter over Grafana's rate interval."""
    return f"rate({metric}{selector}[{RATE_INTERVAL}])"


def quantile(q: float, histogram: str, selector: str, by: str = "") -> str:
    """The q-quantile of a histogram family, aggregated over everything but `by` and `le`."""
    group = ", ".join(("le", by)) if by else "le"
    return f"histogram_quantile({q}, sum by ({group}) ({rate(f'{histogram}_bucket', selector)}))"


def ratio(counter: str, part: str, whole: str, by: str = "") -> str:
    """Rate of a counter's `part` series over the rate of its `whole` series, per `by`.

    The `or` makes it 0 rather than empty while no series matches `part` yet (a labelled
    counter's series only appears once it is first incremented).
    """
    total = f"sum by ({by}) " if by else "sum"
    denominator = f"{total}({rate(counter, whole)})"
    numerator = f"{total}({rate(counter, part)})"
    fallback = f"0 * {denominator}" if by else "vector(0)"
    return f"({numerator} or {fallback}) / {denominator}"


# --- Panels ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Query:
    """One PromQL target and the legend of its series."""

    expr: str
    legend: str


def _target(query: Query, ref_id: str, *, instant: bool = False) -> prom.Dataquery:
    target = (
        prom.Dataquery()
        .ref_id(ref_id)
        .datasource(DATASOURCE)
        .expr(query.expr)
        .legend_format(query.legend)
    )
    return target.instant() if instant else target.range()


def _ref_id(index: int) -> str:
    return chr(ord("A") + index)


def graph(
    title: str,
    description: str,
    unit: str,
    *queries: Query,
    width: int = THIRD,
) -> timeseries.Panel:
    """A time series panel: the default for rates, ratios, latencies and gauges over time."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .min(0)
        .span(width)
        .height(HEIGHT)
        .fill_opacity(10)
        .line_width(1)
        .show_points(common_model.VisibilityMode.NEVER)
        .legend(
            common.VizLegendOptions()
            .display_mode(common_model.LegendDisplayMode.LIST)
            .placement(common_model.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
        .tooltip(
            common.VizTooltipOptions()
            .mode(common_model.TooltipDisplayMode.MULTI)
            .sort(common_model.SortOrder.DESCENDING)
        )
    )
    for index, query in enumerate(queries):
        panel = panel.with_target(_target(query, _ref_id(index)))
    return panel


def single(title: str, description: str, unit: str, query: Query, width: int = THIRD) -> stat.Panel:
    """A stat panel: one current value with its recent trend."""
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(width)
        .height(HEIGHT)
        .graph_mode(common_model.BigValueGraphMode.AREA)
        .color_mode(common_model.BigValueColorMode.VALUE)
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .with_target(_target(query, "A"))
    )


def ranking(
    title: str, description: str, unit: str, query: Query, width: int = HALF
) -> bargauge.Panel:
    """A horizontal bar gauge of the current value of each series (an instant query)."""
    return (
        bargauge.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .min(0)
        .span(width)
        .height(HEIGHT)
        .orientation(common_model.VizOrientation.HORIZONTAL)
        .display_mode(common_model.BarGaugeDisplayMode.BASIC)
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .with_target(_target(query, "A", instant=True))
    )


PanelBuilder = timeseries.Panel | stat.Panel | bargauge.Panel


def latency(title: str, description: str, histogram: str, selector: str) -> timeseries.Panel:
    """p50, p95 and p99 of a duration histogram."""
    return graph(
        title,
        description,
        "s",
        *(Query(quantile(q, histogram, selector), f"p{round(q * 100)}") for q in (0.5, 0.95, 0.99)),
    )


# --- Dashboards -----------------------------------------------------------------------------


def _datasource_variable() -> builder.DatasourceVariable:
    return builder.DatasourceVariable("datasource").label("Data source").type("prometheus")


def _query_variable(
    name: str, label: str, query: str, *, all_values: bool
) -> builder.QueryVariable:
    variable = (
        builder.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(query)
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
    )
    if all_values:
        variable = (
            variable.multi(True)
            .include_all(True)
            .all_value(".*")
            .current(model.VariableOption(selected=True, text=["All"], value=["$__all"]))
        )
    return variable


def namespace_variable() -> builder.QueryVariable:
    """Namespaces with a Courier service (all by default)."""
    return _query_variable(
        "namespace",
        "Namespace",
        "label_values(courier_http_requests_total, namespace)",
        all_values=True,
    ).description("Namespaces Courier runs in (every Courier series has a namespace label).")


def vhost_variable() -> builder.QueryVariable:
    """RabbitMQ virtual hosts seen by the broker's detailed queue metrics."""
    return _query_variable(
        "vhost",
        "RabbitMQ vhost",
        "label_values(rabbitmq_detailed_queue_messages, vhost)",
        all_values=False,
    ).description("The RabbitMQ virtual host Courier's queues live in.")


def messages_per_replica_variable() -> builder.ConstantVariable:
    """The HPA's per-replica queue depth target, as a hidden constant."""
    return (
        builder.ConstantVariable("messages_per_replica")
        .label("Messages per replica")
        .description(
            "Queue depth one notification-service replica should handle: keep equal to the "
            "chart value autoscaling.messagesPerReplica."
        )
        .value(MESSAGES_PER_REPLICA)
    )


class Board:
    """One dashboard under construction: rows, panels and their ids, in reading order."""

    def __init__(
        self,
        uid: str,
        title: str,
        description: str,
        variables: Sequence[builder.QueryVariable | builder.ConstantVariable],
    ) -> None:
        self.uid = uid
        self._next_id = 1
        self._dashboard = (
            builder.Dashboard(title)
            .uid(uid)
            .description(description)
            .tags(["courier"])
            .editable()
            .tooltip(model.DashboardCursorSync.CROSSHAIR)
            .time("now-1h", "now")
            .refresh("30s")
            .timezone("browser")
            .annotation(
                builder.AnnotationQuery()
                .name("Annotations & Alerts")
                .datasource(model.DataSourceRef(type_val="grafana", uid="-- Grafana --"))
                .enable(True)
                .hide(True)
                .icon_color("rgba(0, 211, 255, 1)")
                .type("dashboard")
                .built_in(1)
            )
            .with_variable(_datasource_variable())
            .link(
                builder.DashboardLink("Courier dashboards")
                .type(model.DashboardLinkType.DASHBOARDS)
                .tags(["courier"])
                .as_dropdown(True)
                .include_vars(True)
                .keep_time(True)
            )
        )
        for variable in variables:
            self._dashboard = self._dashboard.with_variable(variable)

    def _id(self) -> int:
        panel_id, self._next_id = self._next_id, self._next_id + 1
        return panel_id

    def row(self, title: str, *panels: PanelBuilder) -> Board:
        """An expanded row followed by its panels (laid out left to right, then down)."""
        self._dashboard = self._dashboard.with_row(builder.Row(title).id(self._id()))
        for panel in panels:
            self._dashboard = self._dashboard.with_panel(panel.id(self._id()))
        return self

    def to_json(self) -> str:
        """Pretty, deterministic JSON (sorted keys, trailing newline)."""
        text = json.dumps(self._dashboard.build(), cls=JSONEncoder, indent=2, sort_keys=True)
        return text + "\n"


def saturation_row(board: Board, name: str, *in_flight: Query) -> Board:
    """In-flight work, CPU and resident memory per instance of one service."""
    selector = service(name)
    return board.row(
        "Saturation",
        graph(
            "In flight",
            "Work this service holds right now, per instance.",
            "short",
            *in_flight,
        ),
        graph(
            "CPU",
            "CPU used per instance, from process_cpu_seconds_total (100% = one core).",
            "percentunit",
            Query(
                f"sum by (instance) ({rate('process_cpu_seconds_total', selector)})",
                "{{instance}}",
            ),
        ),
        graph(
            "Resident memory",
            "Resident set size (RSS) per instance.",
            "bytes",
            Query(
                f"sum by (instance) (process_resident_memory_bytes{selector})",
                "{{instance}}",
            ),
        ),
    )


def http_row(board: Board, name: str) -> Board:
    """Rate, errors and duration of one service's HTTP API."""
    selector = service(name)
    requests = "courier_http_requests_total"
    return board.row(
        "HTTP requests (RED)",
        graph(
            "Requests by route",
            "HTTP requests answered per second, by method and route template.",
            "reqps",
            Query(
                f"sum by (method, route) ({rate(requests, selector)})",
                "{{method}} {{route}}",
            ),
        ),
        graph(
            "5xx ratio by route",
            "Share of requests answered with a 5xx status, per route.",
            "percentunit",
            Query(
                ratio(requests, service(name, 'status=~"5.."'), selector, by="route"),
                "{{route}}",
            ),
        ),
        latency(
            "Request duration",
            "p50, p95 and p99 of the time to handle one request, over every route.",
            "courier_http_request_duration_seconds",
            selector,
        ),
    )


def overview() -> Board:
    """The whole chain: registrations in, events through the queues, notifications out."""
    users = service(USER_SERVICE)
    notifications = service(NOTIFICATION_SERVICE)
    archiver = service(DLQ_ARCHIVER)
    everyone = "{" + NAMESPACE + "}"
    registrations = service(USER_SERVICE, 'method="POST"', 'route="/v1/users"', 'status="201"')
    event_age = "courier_event_age_seconds"
    send_lag = "courier_notification_event_age_seconds"
    board = Board(
        "courier-overview",
        "Courier overview",
        "Registrations in, events through RabbitMQ, notifications out: throughput, backlog, "
        "lag, failures, the outbox, dead letters and scaling.",
        [namespace_variable(), vhost_variable(), messages_per_replica_variable()],
    )
    board.row(
        "Throughput",
        graph(
            "Registrations",
            "Users registered per second: POST /v1/users answered 201 by user-service.",
            "reqps",
            Query(f"sum({rate('courier_http_requests_total', registrations)})", "registrations"),
        ),
        graph(
            "Publishes by service and outcome",
            "Messages published per second by broker outcome. user-service relays its outbox, "
            "notification-service publishes retries and dead letters, dlq-archiver replays. "
            "Anything but confirmed needs a look.",
            "ops",
            Query(
                "sum by (courier_service, outcome) "
                f"({rate('courier_messages_published_total', everyone)})",
                "{{courier_service}} {{outcome}}",
            ),
        ),
        graph(
            "Consumes by queue and outcome",
            "Deliveries per second by the runner's decision (acked, retried, dead_lettered, "
            "duplicate), per queue.",
            "ops",
            Query(
                f"sum by (queue, outcome) ({rate('courier_messages_consumed_total', everyone)})",
                "{{queue}} {{outcome}}",
            ),
        ),
    )
    board.row(
        "Backlog, lag and failures",
        graph(
            "Backlog per queue",
            "Ready plus unacked messages in the work queue, its retry tiers "
            "(notification.user-events.retry.*) and courier.dead-letters, polled from the "
            "management API by notification-service. Every replica polls the same queues, so "
            "replicas are deduplicated with max.",
            "short",
            Query(
                "max by (queue) "
                f"(sum by (queue, instance) (courier_queue_messages{notifications}))",
                "{{queue}}",
            ),
            width=HALF,
        ),
        graph(
            "Failure rate by channel",
            "Share of sends that failed (retryable or permanent) per channel, over every "
            "attempt except skipped ones (already sent).",
            "percentunit",
            Query(
                ratio(
                    "courier_notifications_total",
                    service(NOTIFICATION_SERVICE, 'outcome=~"retryable|permanent"'),
                    service(NOTIFICATION_SERVICE, 'outcome!="skipped"'),
                    by="channel",
                ),
                "{{channel}}",
            ),
            width=HALF,
        ),
        graph(
            "Event age by queue",
            "Age of an event when a worker finished it (end-to-end lag from the event's time), "
            "p50 and p99 per queue.",
            "s",
            Query(quantile(0.5, event_age, everyone, by="queue"), "p50 {{queue}}"),
            Query(quantile(0.99, event_age, everyone, by="queue"), "p99 {{queue}}"),
            width=HALF,
        ),
        graph(
            "Registration-to-send lag by channel",
            "Time from registration to a successful send, p50 and p99 per channel.",
            "s",
            Query(quantile(0.5, send_lag, notifications, by="channel"), "p50 {{channel}}"),
            Query(quantile(0.99, send_lag, notifications, by="channel"), "p99 {{channel}}"),
            width=HALF,
        ),
    )
    board.row(
        "Outbox (user-service)",
        graph(
            "Outbox backlog",
            "Events written to the outbox and not yet confirmed by the broker. It grows while "
            "RabbitMQ is unreachable and drains when it is back.",
            "short",
            Query(f"max(courier_outbox_backlog{users})", "backlog"),
            width=HALF,
        ),
        graph(
            "Oldest outbox entry",
            "Age of the oldest event still in the outbox (0 when empty).",
            "s",
            Query(f"max(courier_outbox_oldest_age_seconds{users})", "oldest"),
            width=HALF,
        ),
    )
    board.row(
        "Dead letters (dlq-archiver)",
        graph(
            "Dead letters archived by source queue",
            "Dead letters archived per second, by the queue they died in: how fast the "
            "dead-letter archive grows.",
            "ops",
            Query(
                f"sum by (source_queue) ({rate('courier_dead_letters_archived_total', archiver)})",
                "{{source_queue}}",
            ),
        ),
        graph(
            "Dead letters stored",
            "Dead letters in the archive.",
            "short",
            Query(f"max(courier_dead_letters_stored{archiver})", "stored"),
        ),
        graph(
            "Oldest dead letter",
            "Age of the oldest archived dead letter (0 when empty).",
            "s",
            Query(f"max(courier_dead_letters_oldest_age_seconds{archiver})", "oldest"),
        ),
    )
    work_queue = "{" + f'{VHOST}, queue="{WORK_QUEUE}"' + "}"
    board.row(
        "Scaling (notification-service)",
        graph(
            "Replicas against the HPA target",
            "notification-service replicas up (scrape targets answering) against the replicas the "
            "HPA asks for (KEDA's, in the default keda mode, or the chart's in hpa mode): work "
            "queue depth / $messages_per_replica, rounded up (the AverageValue formula). The HPA "
            "clamps that target to minReplicas..maxReplicas and smooths it with its "
            "stabilisation windows.",
            "short",
            Query(f"count(up{notifications} == 1)", "replicas"),
            Query(
                f"ceil(sum(rabbitmq_detailed_queue_messages{work_queue}) / $messages_per_replica)",
                "HPA target (unclamped)",
            ),
            width=HALF,
        ),
        graph(
            "Work queue depth (broker)",
            f"Ready plus unacked messages in {WORK_QUEUE} as RabbitMQ reports them: the "
            "metric the HPA scales on.",
            "short",
            Query(f"sum(rabbitmq_detailed_queue_messages{work_queue})", WORK_QUEUE),
            width=HALF,
        ),
    )
    return board


def user_service() -> Board:
    """RED for user-service's API, plus its outbox and relay."""
    selector = service(USER_SERVICE)
    board = Board(
        "courier-user-service",
        "Courier user-service",
        "user-service: HTTP rate, errors and duration, the transactional outbox and its relay "
        "to RabbitMQ, saturation.",
        [namespace_variable()],
    )
    http_row(board, USER_SERVICE)
    board.row(
        "Outbox and relay",
        graph(
            "Outbox backlog",
            "Events written to the outbox and not yet confirmed by the broker.",
            "short",
            Query(f"max(courier_outbox_backlog{selector})", "backlog"),
            width=HALF,
        ),
        graph(
            "Oldest outbox entry",
            "Age of the oldest event still in the outbox (0 when empty).",
            "s",
            Query(f"max(courier_outbox_oldest_age_seconds{selector})", "oldest"),
            width=HALF,
        ),
        graph(
            "Relayed by outcome",
            "Outbox entries per second by relay outcome: published, failed (kept for a retry), "
            "reclaimed (taken over from a stopped replica).",
            "ops",
            Query(
                f"sum by (outcome) ({rate('courier_outbox_relayed_total', selector)})",
                "{{outcome}}",
            ),
            width=HALF,
        ),
        graph(
            "Publishes by outcome",
            "Relay publishes per second by broker outcome: confirmed, returned (unroutable), "
            "nacked (refused), failed (timeout or connection).",
            "ops",
            Query(
                "sum by (exchange, outcome) "
                f"({rate('courier_messages_published_total', selector)})",
                "{{exchange}} {{outcome}}",
            ),
            width=HALF,
        ),
    )
    return saturation_row(
        board,
        USER_SERVICE,
        Query(
            f"sum by (instance) (courier_http_requests_in_flight{selector})",
            "{{instance}} requests",
        ),
    )


def notification_service() -> Board:
    """RED for notification-service's consumer and senders."""
    selector = service(NOTIFICATION_SERVICE)
    consumed = "courier_messages_consumed_total"
    sends = "courier_notifications_total"
    permanent = service(NOTIFICATION_SERVICE, 'outcome="permanent"')
    board = Board(
        "courier-notification-service",
        "Courier notification-service",
        "notification-service: messages consumed and notifications sent, retries, dead letters "
        "and failed sends, handler and send duration, backlog, saturation.",
        [namespace_variable()],
    )
    board.row(
        "Rate",
        graph(
            "Messages consumed by outcome",
            "Deliveries per second by the runner's decision: acked, retried, dead_lettered, "
            "duplicate.",
            "ops",
            Query(f"sum by (queue, outcome) ({rate(consumed, selector)})", "{{queue}} {{outcome}}"),
        ),
        graph(
            "Sends by channel and outcome",
            "Notification sends per second: sent, skipped (already sent), retryable, permanent.",
            "ops",
            Query(
                f"sum by (channel, outcome) ({rate(sends, selector)})", "{{channel}} {{outcome}}"
            ),
        ),
        graph(
            "Idempotency claims",
            "Claims per second: claimed, done (already done, skipped), busy (another worker "
            "holds it).",
            "ops",
            Query(
                f"sum by (result) ({rate('courier_idempotency_claims_total', selector)})",
                "{{result}}",
            ),
        ),
    )
    board.row(
        "Errors",
        graph(
            "Retried and dead-lettered",
            "Share of deliveries sent to a retry tier or dead-lettered.",
            "percentunit",
            Query(
                ratio(consumed, service(NOTIFICATION_SERVICE, 'outcome="retried"'), selector),
                "retried",
            ),
            Query(
                ratio(consumed, service(NOTIFICATION_SERVICE, 'outcome="dead_lettered"'), selector),
                "dead_lettered",
            ),
        ),
        graph(
            "Permanent send failures by channel",
            "Sends per second that failed for good (no retry will help), per channel.",
            "ops",
            Query(
                f"sum by (channel) ({rate(sends, permanent)})"
                f" or 0 * sum by (channel) ({rate(sends, selector)})",
                "{{channel}}",
            ),
        ),
        graph(
            "Retry and dead-letter publishes by outcome",
            "Publishes of retries and dead letters per second by broker outcome; anything but "
            "confirmed means a message could not be moved.",
            "ops",
            Query(
                "sum by (exchange, outcome) "
                f"({rate('courier_messages_published_total', selector)})",
                "{{exchange}} {{outcome}}",
            ),
        ),
    )
    board.row(
        "Duration",
        latency(
            "Handler duration",
            "p50, p95 and p99 of the time a handler took, successful or not.",
            "courier_handler_duration_seconds",
            selector,
        ),
        latency(
            "Send duration",
            "p50, p95 and p99 of the time one send took, over every channel.",
            "courier_notification_send_duration_seconds",
            selector,
        ),
        graph(
            "Send duration p99 by channel",
            "p99 of the time one send took, per channel.",
            "s",
            Query(
                quantile(0.99, "courier_notification_send_duration_seconds", selector, "channel"),
                "{{channel}}",
            ),
        ),
    )
    board.row(
        "Backlog and lag",
        graph(
            "Backlog by queue and state",
            "Messages in the work queue, its retry tiers and courier.dead-letters, ready or "
            "unacked, from the management API (replicas deduplicated with max).",
            "short",
            Query(
                f"max by (queue, state) (courier_queue_messages{selector})",
                "{{queue}} {{state}}",
            ),
        ),
        graph(
            "Consumers per queue",
            "Consumers the broker reports on each queue.",
            "short",
            Query(f"max by (queue) (courier_queue_consumers{selector})", "{{queue}}"),
        ),
        graph(
            "Event age",
            "Age of an event when the worker finished it, p50 and p99.",
            "s",
            Query(quantile(0.5, "courier_event_age_seconds", selector), "p50"),
            Query(quantile(0.99, "courier_event_age_seconds", selector), "p99"),
        ),
    )
    return saturation_row(
        board,
        NOTIFICATION_SERVICE,
        Query(
            f"sum by (instance) (courier_messages_in_flight{selector})",
            "{{instance}} deliveries",
        ),
    )


def dlq_archiver() -> Board:
    """RED for dlq-archiver's API and consumer, plus the archive and replays."""
    selector = service(DLQ_ARCHIVER)
    archived = "courier_dead_letters_archived_total"
    board = Board(
        "courier-dlq-archiver",
        "Courier dlq-archiver",
        "dlq-archiver: HTTP rate, errors and duration, dead letters consumed and archived, "
        "the archive, replays and the largest failure groups, saturation.",
        [namespace_variable()],
    )
    http_row(board, DLQ_ARCHIVER)
    board.row(
        "Consumer (RED)",
        graph(
            "Messages consumed by outcome",
            "Deliveries per second (dead letters and erasure events) by the runner's decision.",
            "ops",
            Query(
                f"sum by (queue, outcome) ({rate('courier_messages_consumed_total', selector)})",
                "{{queue}} {{outcome}}",
            ),
        ),
        graph(
            "Dead-lettered ratio",
            "Share of the archiver's own deliveries it could not handle and dead-lettered.",
            "percentunit",
            Query(
                ratio(
                    "courier_messages_consumed_total",
                    service(DLQ_ARCHIVER, 'outcome="dead_lettered"'),
                    selector,
                ),
                "dead_lettered",
            ),
        ),
        latency(
            "Handler duration",
            "p50, p95 and p99 of the time archiving (or erasing) one message took.",
            "courier_handler_duration_seconds",
            selector,
        ),
    )
    board.row(
        "Archive",
        graph(
            "Archived by source queue",
            "Dead letters archived per second, by the queue they died in.",
            "ops",
            Query(f"sum by (source_queue) ({rate(archived, selector)})", "{{source_queue}}"),
        ),
        graph(
            "Archived by reason class",
            "Dead letters archived per second, by the class of reason they died for; "
            "duplicates are dead letters delivered again and recognised as already archived.",
            "ops",
            Query(f"sum by (reason_class) ({rate(archived, selector)})", "{{reason_class}}"),
            Query(f"sum({rate('courier_dead_letters_duplicate_total', selector)})", "duplicates"),
        ),
        single(
            "Dead letters stored",
            "Dead letters in the archive now.",
            "short",
            Query(f"max(courier_dead_letters_stored{selector})", "stored"),
        ),
        graph(
            "Oldest dead letter",
            "Age of the oldest archived dead letter (0 when empty).",
            "s",
            Query(f"max(courier_dead_letters_oldest_age_seconds{selector})", "oldest"),
            width=HALF,
        ),
        ranking(
            "Largest failure groups",
            "Dead letters in each of the largest failure groups (same fingerprint, source "
            "queue and event type), as the archiver last counted them.",
            "short",
            Query(
                "topk(10, max by (fingerprint, source_queue, event_type) "
                f"(courier_dead_letter_group_size{selector}))",
                "{{event_type}} {{source_queue}} {{fingerprint}}",
            ),
        ),
    )
    board.row(
        "Replays",
        graph(
            "Replays by outcome",
            "Replays per second: published, refused (erased or route unknown), failed_again.",
            "ops",
            Query(f"sum by (outcome) ({rate('courier_replays_total', selector)})", "{{outcome}}"),
            width=HALF,
        ),
        graph(
            "Replay publishes by outcome",
            "Replay publishes per second by broker outcome.",
            "ops",
            Query(
                "sum by (exchange, outcome) "
                f"({rate('courier_messages_published_total', selector)})",
                "{{exchange}} {{outcome}}",
            ),
            width=HALF,
        ),
    )
    return saturation_row(
        board,
        DLQ_ARCHIVER,
        Query(
            f"sum by (instance) (courier_messages_in_flight{selector})", "{{instance}} deliveries"
        ),
        Query(
            f"sum by (instance) (courier_http_requests_in_flight{selector})",
            "{{instance}} requests",
        ),
    )


DASHBOARDS: tuple[Callable[[], Board], ...] = (
    overview,
    user_service,
    notification_service,
    dlq_archiver,
)


# --- Files ----------------------------------------------------------------------------------


def dashboard_files() -> dict[str, str]:
    """charts/courier/dashboards as it should be: file name → content."""
    boards = [make() for make in DASHBOARDS]
    return {f"{board.uid}.json": board.to_json() for board in boards}


def check(out: Path) -> list[str]:
    """What differs between `out` and a fresh build: one line per file, then the diffs."""
    expected = dashboard_files()
    actual = {p.name: p.read_text() for p in sorted(out.glob("*.json"))} if out.is_dir() else {}
    summary: list[str] = []
    diffs: list[str] = []
    for name in sorted(set(expected) | set(actual)):
        if name not in actual:
            summary.append(f"missing: {name}")
        elif name not in expected:
            summary.append(f"extra: {name}")
        elif actual[name] != expected[name]:
            summary.append(f"drifted: {name}")
            diffs.extend(
                difflib.unified_diff(
                    actual[name].splitlines(),
                    expected[name].splitlines(),
                    f"{name} (committed)",
                    f"{name} (generated)",
                    lineterm="",
                )
            )
    return summary + diffs


def write(out: Path) -> list[str]:
    """Replace every dashboard JSON file in `out` with a fresh build; the names written."""
    out.mkdir(parents=True, exist_ok=True)
    files = dashboard_files()
    for stale in out.glob("*.json"):
        if stale.name not in files:
            stale.unlink()
    for name, content in files.items():
        (out / name).write_text(content)
    return sorted(files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when a committed file drifted")
    parser.add_argument(
        "--out", type=Path, default=OUT_DIR, help="default: charts/courier/dashboards"
    )
    args = parser.parse_args(argv)
    if args.check:
        problems = check(args.out)
        if problems:
            print("\n".join(problems))
            print(f"\n{args.out} differs from scripts/dashboards.py: run `make dashboards`.")
            return 1
        print(f"{args.out} matches scripts/dashboards.py.")
        return 0
    for name in write(args.out):
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
