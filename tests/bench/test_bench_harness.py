"""The benchmark's pure parts: statistics, ratios, targets and the report it writes.

`make bench` is not part of `make test` (it needs quiet cores and minutes); these tests keep
its arithmetic and its report honest without running any load.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import ModuleType

import pytest

from bench import subject
from bench.cases import CASES, LOOPS, Config, _sent_latency_ms, loop_note
from bench.consumers import courier_runner, faststream_consumer
from bench.floors import raw_consumer
from bench.harness import summarize_collapsed
from bench.report import (
    RATIOS,
    Report,
    Target,
    compute_rows,
    fmt_summary,
    percentile,
    ratio,
    render_markdown,
    render_table,
    summarize,
)
from bench.run import parse_args


def test_summary_is_median_and_spread_of_the_repeats() -> None:
    summary = summarize([3.0, 1.0, 2.0, 10.0, 4.0])
    assert summary.n == 5
    assert summary.median == 3.0
    assert (summary.low, summary.high) == (1.0, 10.0)
    assert (summary.q1, summary.q3) == (2.0, 4.0)
    assert summary.spread_pct == pytest.approx(300.0)


def test_summary_of_one_value_and_of_none() -> None:
    one = summarize([7.5])
    assert (one.n, one.median, one.low, one.high) == (1, 7.5, 7.5, 7.5)
    empty = summarize([math.nan])
    assert empty.n == 0
    assert math.isnan(empty.median)


def test_percentile_interpolates_between_ranks() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 100) == 100.0
    assert math.isnan(percentile([], 99))


def test_ratio_is_courier_over_floor_and_nan_without_a_floor() -> None:
    assert ratio(150.0, 100.0) == 1.5
    assert math.isnan(ratio(1.0, 0.0))
    assert math.isnan(ratio(math.nan, 2.0))


@pytest.mark.parametrize(
    ("target", "value", "met"),
    [
        (Target(">=", 0.75), 0.8, True),
        (Target(">=", 0.75), 0.75, True),
        (Target(">=", 0.75), 0.7, False),
        (Target("<=", 3.0), 2.9, True),
        (Target("<=", 3.0), 3.1, False),
        (Target("<=", 3.0), math.nan, None),
    ],
)
def test_targets_compare_the_ratio(target: Target, value: float, met: bool | None) -> None:
    assert target.met(value) is met


def test_rows_divide_medians_of_the_same_run() -> None:
    measurements = {
        "consume": {
            "courier": {"msg_per_s": [700.0, 800.0, 900.0]},
            "floor": {"msg_per_s": [1000.0, 1000.0, 5000.0]},
        }
    }
    [row] = compute_rows(measurements, [r for r in RATIOS if r.name.startswith("one worker")])
    assert row.ratio == pytest.approx(0.8)
    assert row.met is True
    assert row.target == "≥ 0.75x"


def test_a_condition_can_fail_a_met_ratio() -> None:
    # The report's own spec: register throughput counts only with the outbox backlog bounded.
    [spec] = [r for r in RATIOS if r.name == "register throughput"]
    assert spec.condition == ("register", "courier", "backlog_bounded")
    bounded = {"rps": [120.0, 110.0, 130.0], "backlog_bounded": [1.0, 1.0, 0.0]}
    unbounded = {"rps": [120.0, 110.0, 130.0], "backlog_bounded": [0.0, 0.0, 1.0]}
    floor = {"rps": [100.0, 100.0, 100.0]}
    [ok] = compute_rows({"register": {"courier": bounded, "floor": floor}}, [spec])
    [bad] = compute_rows({"register": {"courier": unbounded, "floor": floor}}, [spec])
    assert (ok.met, ok.condition_met) == (True, True)
    assert (bad.met, bad.condition_met) == (False, False)


def test_cases_that_did_not_run_have_no_row() -> None:
    assert compute_rows({}) == []


def test_the_table_shows_median_spread_ratio_and_verdict() -> None:
    measurements = {
        "paced": {
            "courier": {"p99_ms": [30.0, 40.0, 35.0], "p50_ms": [5.0, 6.0, 7.0]},
            "floor": {"p99_ms": [10.0, 10.0, 12.0], "p50_ms": [2.0, 2.0, 2.0]},
        }
    }
    table = render_table(compute_rows(measurements))
    p99 = next(line for line in table.splitlines() if line.startswith("| paced 1,000/s p99"))
    assert "35.0 (30.0-40.0)" in p99
    assert "3.50x" in p99
    assert "≤ 3x" in p99
    assert "**missed**" in p99
    p50 = next(line for line in table.splitlines() if line.startswith("| paced 1,000/s p50"))
    assert p50.endswith("| - |") or p50.endswith("|  | - |")


def test_spread_is_not_shown_for_identical_repeats() -> None:
    assert fmt_summary(summarize([2.0, 2.0, 2.0])) == "2.00"
    assert fmt_summary(summarize([])) == "-"


def _report(**overrides: object) -> Report:
    fields: dict[str, object] = {
        "started_at": "2026-01-01T00:00:00+00:00",
        "mode": "quick",
        "repeats": 3,
        "machine": {"cores": 2, "cpu": "test", "python": "3.11", "loadavg_start": [0.5, 0, 0]},
        "layout": {"service_cores": [0], "load_cores": [1], "shared": "unpinned"},
        "config": {"seconds": 3.0},
        "measurements": {
            "register": {
                "courier": {"rps": [1.0, 2.0, 3.0], "backlog_bounded": [1.0, 1.0, 1.0]},
                "floor": {"rps": [2.0, 2.0, math.nan]},
            }
        },
        "notes": ["a note"],
    }
    fields.update(overrides)
    return Report(**fields)  # type: ignore[arg-type]


def test_the_markdown_report_says_how_it_was_measured() -> None:
    text = render_markdown(_report())
    assert text.startswith("# Courier benchmark, 2026-01-01")
    assert "Mode: **quick**, 3 repeats" in text
    assert "services and floors on [0], load generator and sinks on [1]" in text
    assert "| register throughput" in text
    assert "## Every figure" in text
    assert "- a note" in text


def test_the_json_report_is_json_with_nan_as_null() -> None:
    document = json.loads(_report().to_json())
    assert document["measurements"]["register"]["floor"]["rps"] == [2.0, 2.0, None]
    [row] = [r for r in document["ratios"] if r["name"] == "register throughput"]
    assert row["ratio"] == pytest.approx(1.0)
    assert row["met"] is True


def test_profile_summary_counts_the_event_loop_thread_only(tmp_path: Path) -> None:
    collapsed = tmp_path / "p.collapsed"
    collapsed.write_text(
        "<module> (user-service:10);run (courier_common/http.py:5);emit (logging/__init__.py:9) 3\n"
        "<module> (user-service:10);run (courier_common/http.py:5);sub (re/__init__.py:1) 1\n"
        "Thread._bootstrap (threading.py:1002);wait (threading.py:320) 50\n"
    )
    summary = summarize_collapsed(collapsed)
    assert "event-loop thread samples: 4 (other threads: 50" in summary
    assert " 75.0%  emit (logging/__init__.py)" in summary
    assert "100.0%  courier_common.http" in summary


def test_paced_latency_reads_the_send_time_from_the_address() -> None:
    message = {
        "rcpt_tos": ["p1000-tok-1-5@bench.example.com"],
        "received_at": "1970-01-01T00:00:01.250Z",
    }
    assert _sent_latency_ms(message) == pytest.approx(250.0)
    assert math.isnan(_sent_latency_ms({"rcpt_tos": ["b-x@y.z"], "received_at": "x"}))


def test_the_wrk_script_reports_one_bench_line() -> None:
    script = (Path(__file__).resolve().parents[2] / "bench" / "lua" / "register.lua").read_text()
    assert "BENCH {" in script
    assert "function request()" in script


# --------------------------------------------------------------------------------------------
# The runner and chain_cpu cases: their CLI, their rows, their subjects' event loop
# --------------------------------------------------------------------------------------------


def test_the_cli_knows_the_runner_and_chain_cases_and_the_loop() -> None:
    args = parse_args(["--cases", "runner,chain_cpu", "--quick"])
    assert args.cases.split(",") == ["runner", "chain_cpu"]
    assert args.loop == "uvloop"
    assert parse_args(["--loop", "asyncio"]).loop == "asyncio"
    every = parse_args([]).cases.split(",")
    assert every[:5] == ["register", "consume", "paced", "slow_sender", "io_workers"]
    assert {"runner", "chain_cpu"} <= set(every) == set(CASES)


@pytest.mark.parametrize(
    "argv",
    [["--cases", "runner,nope"], ["--loop", "trio"], ["--cases", "runner", "--repeat", "1"]],
)
def test_the_cli_refuses_what_it_cannot_run(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_quick_shrinks_the_new_cases_too() -> None:
    quick, full = Config.quick(), Config()
    assert quick.runner_count < full.runner_count
    assert quick.chain_seconds < full.chain_seconds
    assert quick.runner_idle_seconds <= full.runner_idle_seconds
    assert quick.loop == full.loop == "uvloop"


def _runner_measurements(
    courier: float, faststream: float, raw: float, cpu: tuple[float, float, float]
) -> dict[str, dict[str, dict[str, list[float]]]]:
    def side(rate: float, cpu_ms: float, idle: float) -> dict[str, list[float]]:
        return {
            "msg_per_s": [rate * 0.9, rate, rate * 1.1],
            "cpu_ms_per_msg": [cpu_ms, cpu_ms, cpu_ms],
            "idle_rss_mb": [idle, idle, idle],
        }

    return {
        "runner": {
            "courier": side(courier, cpu[0], 50.0),
            "faststream": side(faststream, cpu[1], 55.0),
            "raw": side(raw, cpu[2], 40.0),
        }
    }


def test_runner_rows_hold_the_runner_to_faststream_and_raw() -> None:
    rows = {
        r.name: r
        for r in compute_rows(_runner_measurements(1100.0, 1000.0, 1300.0, (0.5, 0.6, 0.4)))
    }
    vs_faststream = rows[
        "runner ÷ FastStream throughput (no-op handler, same queue, prefetch and SET NX)"
    ]
    assert vs_faststream.ratio == pytest.approx(1.1)
    assert (vs_faststream.target, vs_faststream.met) == ("≥ 1.05x", True)
    vs_raw = rows["runner ÷ raw throughput"]
    assert vs_raw.ratio == pytest.approx(1100 / 1300)
    assert (vs_raw.target, vs_raw.met) == ("≥ 0.8x", True)
    cpu = rows["runner CPU per message ÷ raw"]
    assert cpu.ratio == pytest.approx(1.25)
    assert (cpu.target, cpu.met) == ("≤ 1.3x", True)
    assert rows["FastStream CPU per message ÷ raw"].target is None
    idle = rows["runner idle RSS ÷ FastStream idle RSS"]
    assert idle.ratio == pytest.approx(50 / 55)
    assert (idle.target, idle.met) == ("≤ 1x", True)
    assert rows["runner idle RSS ÷ raw idle RSS"].met is None


def test_a_slow_runner_misses_its_targets() -> None:
    rows = {
        r.name: r
        for r in compute_rows(_runner_measurements(500.0, 1000.0, 2000.0, (1.0, 0.6, 0.4)))
    }
    assert rows["runner ÷ raw throughput"].met is False
    assert rows["runner CPU per message ÷ raw"].met is False
    assert all(
        row.met is False
        for name, row in rows.items()
        if name.startswith("runner ÷ FastStream throughput")
    )


def _chain(cpu: float) -> dict[str, dict[str, dict[str, list[float]]]]:
    return {
        "chain_cpu": {
            "courier": {
                "cpu_ms_per_reg": [cpu, cpu * 1.1, cpu * 0.9],
                "users_cpu_ms_per_reg": [cpu / 2] * 3,
                "notifier_cpu_ms_per_reg": [cpu / 2] * 3,
                "users_share_pct": [50.0, 50.0, 50.0],
                "notifier_share_pct": [50.0, 50.0, 50.0],
            },
            "floor": {
                "cpu_ms_per_reg": [1.0, 1.0, 1.0],
                "register_cpu_ms_per_req": [0.6, 0.6, 0.6],
                "consume_cpu_ms_per_msg": [0.4, 0.4, 0.4],
            },
        }
    }


@pytest.mark.parametrize(("cpu", "met"), [(1.6, True), (1.8, True), (2.5, False)])
def test_chain_cpu_is_held_to_an_absolute_target(cpu: float, met: bool) -> None:
    rows = {r.name: r for r in compute_rows(_chain(cpu))}
    absolute = rows["chain CPU per registration (user-service + notification-service)"]
    assert absolute.courier.median == pytest.approx(cpu)
    assert absolute.floor.n == 0
    assert math.isnan(absolute.ratio)
    assert (absolute.target, absolute.met) == ("≤ 1.8 ms", met)
    reference = rows["chain CPU per registration ÷ register floor + raw consume floor"]
    assert reference.ratio == pytest.approx(cpu)
    assert (reference.target, reference.met) == (None, None)
    assert rows["chain: user-service (request + relay) ÷ register floor"].ratio == pytest.approx(
        cpu / 2 / 0.6
    )
    assert rows["chain: notification-service ÷ raw consume floor"].ratio == pytest.approx(
        cpu / 2 / 0.4
    )


def test_absolute_targets_say_their_unit() -> None:
    assert str(Target("<=", 1.8, unit="ms")) == "≤ 1.8 ms"
    assert Target("<=", 1.8, unit="ms").absolute
    assert not Target("<=", 1.8).absolute


def test_the_table_renders_the_new_rows() -> None:
    table = render_table(compute_rows({**_chain(2.0), **_runner_measurements(1, 2, 3, (1, 1, 1))}))
    lines = table.splitlines()
    absolute = next(line for line in lines if line.startswith("| chain CPU per registration (u"))
    assert "| 2.00 (1.80-2.20) | - | - | ≤ 1.8 ms | **missed** |" in absolute
    share = next(line for line in lines if line.startswith("| chain: user-service's share"))
    assert share.startswith("| chain: user-service's share of the chain's CPU (%) | 50.0 |")
    assert "is better" not in share
    assert any(
        line.startswith("| runner idle RSS ÷ FastStream idle RSS (MiB, lower") for line in lines
    )


def test_the_markdown_report_carries_the_runner_case() -> None:
    text = render_markdown(_report(measurements=_runner_measurements(1, 2, 3, (1, 1, 1))))
    assert "| runner ÷ raw throughput (msg/s, higher is better)" in text
    assert "| runner | faststream | idle_rss_mb | 55.0 | 3 |" in text
    assert "the floor column is what the row divides by" in text


def test_the_report_names_the_event_loop() -> None:
    assert "uvloop" in loop_note("uvloop")
    assert "not the comparison to quote" in loop_note("asyncio")


@pytest.mark.parametrize("module", [raw_consumer, courier_runner, faststream_consumer])
@pytest.mark.parametrize("loop", LOOPS)
def test_every_consumer_subject_runs_on_the_loop_it_is_given(module: ModuleType, loop: str) -> None:
    async def which() -> str:
        name: str = module.loop_name()
        return name

    assert subject.LOOPS == LOOPS  # what every subject's --loop offers
    assert module.run(which(), loop) == loop
