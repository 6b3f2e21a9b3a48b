"""The pure half of the benchmark: statistics, ratios, targets and the report's text.

Nothing here starts a process or opens a socket, so ``tests/bench`` can hold it to its word
on every ``make test``. `bench/run.py` measures; this module turns the measurements of one
run into the table: each Courier figure beside the bare-stack floor measured in the same run,
the ratio of their medians, and the target the issue sets for it (reported, never asserted).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

#: Which way is better; "neither" for a figure that only describes (a share of the CPU).
Better = Literal["higher", "lower", "neither"]
Op = Literal[">=", "<="]


@dataclass(frozen=True)
class Summary:
    """Median and spread of one figure over the repeats of a case."""

    n: int
    median: float
    low: float
    high: float
    q1: float
    q3: float

    @property
    def spread_pct(self) -> float:
        """(max - min) / median, in percent: how much the repeats disagreed."""
        if self.median == 0 or math.isnan(self.median):
            return math.nan
        return 100.0 * (self.high - self.low) / abs(self.median)


def summarize(values: Sequence[float]) -> Summary:
    """Median, min-max and the interquartile range of *values* (NaNs dropped)."""
    clean = sorted(v for v in values if not math.isnan(v))
    if not clean:
        nan = math.nan
        return Summary(0, nan, nan, nan, nan, nan)
    if len(clean) == 1:
        (only,) = clean
        return Summary(1, only, only, only, only, only)
    q1, _, q3 = statistics.quantiles(clean, n=4, method="inclusive")
    return Summary(len(clean), statistics.median(clean), clean[0], clean[-1], q1, q3)


def percentile(values: Sequence[float], pct: float) -> float:
    """The *pct* percentile (0-100) of *values*, linear between closest ranks."""
    clean = sorted(v for v in values if not math.isnan(v))
    if not clean:
        return math.nan
    if len(clean) == 1:
        return clean[0]
    rank = (len(clean) - 1) * pct / 100.0
    lower = math.floor(rank)
    upper = math.ceil(rank)
    if lower == upper:
        return clean[lower]
    return clean[lower] + (clean[upper] - clean[lower]) * (rank - lower)


def ratio(courier: float, floor: float) -> float:
    """Courier ÷ floor; NaN when either is missing or the floor is zero."""
    if math.isnan(courier) or math.isnan(floor) or floor == 0:
        return math.nan
    return courier / floor


@dataclass(frozen=True)
class Target:
    """What the issue asks of a ratio: ``op`` and ``threshold`` (e.g. ``>=`` 0.75).

    With a ``unit`` the target is absolute: it holds the Courier figure itself to the
    threshold (``<=`` 1.8 ms of CPU per registration), not the ratio.
    """

    op: Op
    threshold: float
    unit: str | None = None

    @property
    def absolute(self) -> bool:
        return self.unit is not None

    def met(self, value: float) -> bool | None:
        """True/False, or None when the ratio (or the figure) could not be computed."""
        if math.isnan(value):
            return None
        if self.op == ">=":
            return value >= self.threshold
        return value <= self.threshold

    def __str__(self) -> str:
        suffix = f" {self.unit}" if self.unit is not None else "x"
        return f"{'≥' if self.op == '>=' else '≤'} {self.threshold:g}{suffix}"


@dataclass(frozen=True)
class RatioSpec:
    """One row of the ratio table: which two figures to divide, and what to expect.

    ``courier`` and ``floor`` are ``(case, side, metric)`` paths into the measurements; a row
    without a ``floor`` shows one figure (no ratio), for an absolute target or a share;
    ``condition`` is an extra ``(case, side, metric)`` boolean figure that must hold for the
    target to count as met (the outbox backlog being bounded, for the register target).
    """

    name: str
    courier: tuple[str, str, str]
    floor: tuple[str, str, str] | None
    unit: str
    better: Better
    target: Target | None = None
    condition: tuple[str, str, str] | None = None
    condition_text: str = ""
    note: str = ""


@dataclass
class Row:
    """A computed ratio row, as the report and the JSON carry it."""

    name: str
    unit: str
    better: Better
    courier: Summary
    floor: Summary
    ratio: float
    target: str | None
    met: bool | None
    note: str = ""
    condition_text: str = ""
    condition_met: bool | None = None


#: Each Courier figure beside its floor (the issue's list, in its order).
RATIOS: tuple[RatioSpec, ...] = (
    RatioSpec(
        "register throughput",
        ("register", "courier", "rps"),
        ("register", "floor", "rps"),
        "req/s",
        "higher",
        Target(">=", 1.0),
        condition=("register", "courier", "backlog_bounded"),
        condition_text="outbox backlog bounded",
    ),
    RatioSpec(
        "register p50",
        ("register", "courier", "p50_ms"),
        ("register", "floor", "p50_ms"),
        "ms",
        "lower",
    ),
    RatioSpec(
        "register p99",
        ("register", "courier", "p99_ms"),
        ("register", "floor", "p99_ms"),
        "ms",
        "lower",
    ),
    RatioSpec(
        "register CPU per request (service process, relay included)",
        ("register", "courier", "cpu_ms_per_req"),
        ("register", "floor", "cpu_ms_per_req"),
        "ms",
        "lower",
        note="steadier than req/s on a busy machine",
    ),
    RatioSpec(
        "outbox relay throughput ÷ register",
        ("register", "courier", "relay_rps"),
        ("register", "courier", "rps"),
        "msg/s",
        "higher",
        note="the relay keeps up when this is ≈ 1",
    ),
    RatioSpec(
        "one worker, instant sender",
        ("consume", "courier", "msg_per_s"),
        ("consume", "floor", "msg_per_s"),
        "msg/s",
        "higher",
        Target(">=", 0.75),
    ),
    RatioSpec(
        "consume CPU per message",
        ("consume", "courier", "cpu_ms_per_msg"),
        ("consume", "floor", "cpu_ms_per_msg"),
        "ms",
        "lower",
    ),
    RatioSpec(
        "paced 1,000/s p50 (register → sent vs publish → ack)",
        ("paced", "courier", "p50_ms"),
        ("paced", "floor", "p50_ms"),
        "ms",
        "lower",
    ),
    RatioSpec(
        "paced 1,000/s p99 (register → sent vs publish → ack)",
        ("paced", "courier", "p99_ms"),
        ("paced", "floor", "p99_ms"),
        "ms",
        "lower",
        Target("<=", 3.0),
    ),
    RatioSpec(
        "paced 100/s p50 (register → sent vs publish → ack)",
        ("paced", "courier_low", "p50_ms"),
        ("paced", "floor_low", "p50_ms"),
        "ms",
        "lower",
    ),
    RatioSpec(
        "paced 100/s p99 (register → sent vs publish → ack)",
        ("paced", "courier_low", "p99_ms"),
        ("paced", "floor_low", "p99_ms"),
        "ms",
        "lower",
        note="a rate the whole chain sustains on this machine",
    ),
    RatioSpec(
        "register p99, 2 s sender ÷ instant sender",
        ("slow_sender", "slow", "p99_ms"),
        ("slow_sender", "fast", "p99_ms"),
        "ms",
        "lower",
        Target("<=", 1.1),
    ),
    RatioSpec(
        "20 ms sender: two workers ÷ one",
        ("io_workers", "two", "msg_per_s"),
        ("io_workers", "one", "msg_per_s"),
        "msg/s",
        "higher",
        Target(">=", 1.7),
    ),
    RatioSpec(
        "runner ÷ FastStream throughput (no-op handler, same queue, prefetch and SET NX)",
        ("runner", "courier", "msg_per_s"),
        ("runner", "faststream", "msg_per_s"),
        "msg/s",
        "higher",
        Target(">=", 1.05),
    ),
    RatioSpec(
        "runner ÷ raw throughput",
        ("runner", "courier", "msg_per_s"),
        ("runner", "raw", "msg_per_s"),
        "msg/s",
        "higher",
        Target(">=", 0.80),
    ),
    RatioSpec(
        "runner CPU per message ÷ raw",
        ("runner", "courier", "cpu_ms_per_msg"),
        ("runner", "raw", "cpu_ms_per_msg"),
        "ms",
        "lower",
        Target("<=", 1.3),
    ),
    RatioSpec(
        "FastStream CPU per message ÷ raw",
        ("runner", "faststream", "cpu_ms_per_msg"),
        ("runner", "raw", "cpu_ms_per_msg"),
        "ms",
        "lower",
    ),
    RatioSpec(
        "runner idle RSS ÷ FastStream idle RSS",
        ("runner", "courier", "idle_rss_mb"),
        ("runner", "faststream", "idle_rss_mb"),
        "MiB",
        "lower",
        Target("<=", 1.0),
    ),
    RatioSpec(
        "runner idle RSS ÷ raw idle RSS",
        ("runner", "courier", "idle_rss_mb"),
        ("runner", "raw", "idle_rss_mb"),
        "MiB",
        "lower",
    ),
    RatioSpec(
        "chain CPU per registration (user-service + notification-service)",
        ("chain_cpu", "courier", "cpu_ms_per_reg"),
        None,
        "ms",
        "lower",
        Target("<=", 1.8, unit="ms"),
        note="request, relay and welcome, paced",
    ),
    RatioSpec(
        "chain CPU per registration ÷ register floor + raw consume floor",
        ("chain_cpu", "courier", "cpu_ms_per_reg"),
        ("chain_cpu", "floor", "cpu_ms_per_reg"),
        "ms",
        "lower",
        note="both chains paced alike, in the same run",
    ),
    RatioSpec(
        "chain: user-service (request + relay) ÷ register floor",
        ("chain_cpu", "courier", "users_cpu_ms_per_reg"),
        ("chain_cpu", "floor", "register_cpu_ms_per_req"),
        "ms",
        "lower",
    ),
    RatioSpec(
        "chain: notification-service ÷ raw consume floor",
        ("chain_cpu", "courier", "notifier_cpu_ms_per_reg"),
        ("chain_cpu", "floor", "consume_cpu_ms_per_msg"),
        "ms",
        "lower",
    ),
    RatioSpec(
        "chain: user-service's share of the chain's CPU",
        ("chain_cpu", "courier", "users_share_pct"),
        None,
        "%",
        "neither",
    ),
    RatioSpec(
        "chain: notification-service's share of the chain's CPU",
        ("chain_cpu", "courier", "notifier_share_pct"),
        None,
        "%",
        "neither",
    ),
    RatioSpec(
        "RSS user-service ÷ floor app",
        ("register", "courier", "rss_mb"),
        ("register", "floor", "rss_mb"),
        "MiB",
        "lower",
    ),
    RatioSpec(
        "RSS notification-service ÷ raw consumer",
        ("consume", "courier", "rss_mb"),
        ("consume", "floor", "rss_mb"),
        "MiB",
        "lower",
    ),
)

#: case -> side -> metric -> one value per repeat.
Measurements = Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]]


def _values(measurements: Measurements, path: tuple[str, str, str] | None) -> list[float]:
    if path is None:
        return []
    case, side, metric = path
    return [float(v) for v in measurements.get(case, {}).get(side, {}).get(metric, [])]


def compute_rows(measurements: Measurements, specs: Sequence[RatioSpec] = RATIOS) -> list[Row]:
    """One row per spec whose figures were measured; ratios are of the medians."""
    rows: list[Row] = []
    for spec in specs:
        courier_values = _values(measurements, spec.courier)
        floor_values = _values(measurements, spec.floor)
        if not courier_values and not floor_values:
            continue
        courier = summarize(courier_values)
        floor = summarize(floor_values)
        value = ratio(courier.median, floor.median)
        met: bool | None = None
        if spec.target is not None:
            met = spec.target.met(courier.median if spec.target.absolute else value)
        condition_met: bool | None = None
        if spec.condition is not None:
            flags = _values(measurements, spec.condition)
            # Bounded in the median repeat: most repeats must have kept the backlog bounded.
            condition_met = summarize(flags).median >= 0.5 if flags else None
            if met is not None:
                met = met and bool(condition_met)
        rows.append(
            Row(
                name=spec.name,
                unit=spec.unit,
                better=spec.better,
                courier=courier,
                floor=floor,
                ratio=value,
                target=str(spec.target) if spec.target else None,
                met=met,
                note=spec.note,
                condition_text=spec.condition_text,
                condition_met=condition_met,
            )
        )
    return rows


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def fmt_number(value: float) -> str:
    """Three significant figures, thousands separated; ``-`` for a missing value."""
    if math.isnan(value):
        return "-"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def fmt_summary(summary: Summary) -> str:
    """``median (min-max)``; the median alone when there was one repeat."""
    if summary.n == 0:
        return "-"
    if summary.n == 1 or summary.low == summary.high:
        return fmt_number(summary.median)
    return f"{fmt_number(summary.median)} ({fmt_number(summary.low)}-{fmt_number(summary.high)})"


def _verdict(row: Row) -> str:
    if row.met is None:
        return "-" if row.target is None else "n/a"
    return "met" if row.met else "**missed**"


def render_table(rows: Sequence[Row]) -> str:
    """The ratio table in Markdown."""
    lines = [
        "| measure | Courier | floor | ratio | target | |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        target = row.target or ""
        if row.condition_text:
            state = {True: "yes", False: "no", None: "?"}[row.condition_met]
            target = f"{target}, {row.condition_text} ({state})"
        ratio_text = "-" if math.isnan(row.ratio) else f"{row.ratio:.2f}x"
        if row.better == "neither":
            name = f"{row.name} ({row.unit})"
        else:
            name = f"{row.name} ({row.unit}, {row.better} is better)"
        if row.note:
            name += f"; {row.note}"
        lines.append(
            f"| {name} | {fmt_summary(row.courier)} | {fmt_summary(row.floor)} | "
            f"{ratio_text} | {target} | {_verdict(row)} |"
        )
    return "\n".join(lines)


@dataclass
class Report:
    """Everything one run produced, ready for Markdown and JSON."""

    started_at: str
    mode: str
    repeats: int
    machine: dict[str, Any]
    layout: dict[str, Any]
    config: dict[str, Any]
    measurements: dict[str, dict[str, dict[str, list[float]]]]
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[Row]:
        return compute_rows(self.measurements)

    def to_json(self) -> str:
        rows = [
            {**asdict(row), "courier": asdict(row.courier), "floor": asdict(row.floor)}
            for row in self.rows()
        ]
        document = {
            "started_at": self.started_at,
            "mode": self.mode,
            "repeats": self.repeats,
            "machine": self.machine,
            "layout": self.layout,
            "config": self.config,
            "measurements": self.measurements,
            "ratios": rows,
            "notes": self.notes,
        }
        return json.dumps(_json_safe(document), indent=2, ensure_ascii=False) + "\n"


def _json_safe(value: Any) -> Any:
    """NaN is not JSON: it becomes null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _detail_table(measurements: Measurements) -> str:
    lines = ["| case | side | figure | median (min-max) | repeats |", "|---|---|---|---|---|"]
    for case, sides in measurements.items():
        for side, metrics in sides.items():
            for metric, values in metrics.items():
                summary = summarize([float(v) for v in values])
                lines.append(
                    f"| {case} | {side} | {metric} | {fmt_summary(summary)} | {summary.n} |"
                )
    return "\n".join(lines)


def render_markdown(report: Report) -> str:
    """The whole report: header, machine and layout, the ratio table, every figure, notes."""
    machine = report.machine
    layout = report.layout
    load = machine.get("loadavg_start")
    load_text = ", ".join(f"{x:.2f}" for x in load) if isinstance(load, list) else "?"
    parts = [
        f"# Courier benchmark, {report.started_at}",
        "",
        f"Mode: **{report.mode}**, {report.repeats} repeats per case; every figure is the "
        "median of the repeats with (min-max); ratios are Courier ÷ floor of the medians "
        "measured in this run (in the runner rows the floor column is what the row divides "
        "by: FastStream or the raw floor; a row with no floor holds the Courier figure itself "
        "to its target). Targets are reported, not asserted.",
        "",
        f"Machine: {machine.get('cores', '?')} cores ({machine.get('cpu', '?')}), "
        f"Python {machine.get('python', '?')}, load average at start {load_text}.",
        f"Cores: services and floors on {layout.get('service_cores')}, load generator and "
        f"sinks on {layout.get('load_cores')}; {layout.get('shared', '')}",
        "",
        render_table(report.rows()),
        "",
        "## Every figure",
        "",
        _detail_table(report.measurements),
    ]
    if report.config:
        parts += ["", "## Configuration", ""]
        parts += [f"- `{key}`: {value}" for key, value in report.config.items()]
    if report.notes:
        parts += ["", "## Notes", ""]
        parts += [f"- {note}" for note in report.notes]
    return "\n".join(parts) + "\n"
