"""``make bench``: Courier's speed as ratios against the bare stack, measured in the same run.

    uv run --locked python bench/run.py [--quick] [--repeat N] [--cases a,b] [--profile]
                                        [--loop uvloop|asyncio]

Starts what each case needs (its own RabbitMQ vhost and Redis key prefix on the shared
instances, the services, the floors, the sinks), runs every case ``--repeat`` times (at least
three), writes ``bench/results/<timestamp>.md`` and ``.json`` and prints the table. Cases:
register, consume, paced, slow_sender, io_workers, runner, chain_cpu (see README,
"Performance").

``--quick`` is a smoke run with short loads: its figures are for checking the harness, not
for quoting. ``--profile`` adds one unmeasured repeat of register, consume and runner with
py-spy attached to user-service, notification-service, the runner and FastStream, and writes
text summaries to ``bench/profiles/``. ``--loop`` is the event loop of every consumer subject
(the raw floor, Courier's runner, FastStream): uvloop, as uvicorn runs Courier's services, by
default.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import traceback
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path

# Run as a script (python bench/run.py): make the repository root importable as the base
# of the ``bench`` namespace, as it is for pytest and mypy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cases import CASES, LOOPS, NOTIFICATION_QUEUE, Config, Context
from bench.harness import BENCH, Backing, BenchError, Layout, ensure_wrk, say
from bench.report import Report, render_markdown, render_table
from courier_common.logging import configure_logging

#: Below this 1-minute load average (on this 2-core size of machine) a full run's numbers count.
QUIET_LOAD = 1.5


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="short loads: a smoke run")
    parser.add_argument("--repeat", type=int, default=3, help="repeats per case (min 3)")
    parser.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}"
    )
    parser.add_argument("--profile", action="store_true", help="py-spy summaries too")
    parser.add_argument(
        "--loop",
        choices=LOOPS,
        default="uvloop",
        help="event loop of the consumer subjects (uvloop: what uvicorn gives the services)",
    )
    parser.add_argument("--out", type=Path, default=BENCH / "results", help="results folder")
    parser.add_argument(
        "--allow-fewer-repeats",
        action="store_true",
        help="allow --repeat below 3 (harness development only)",
    )
    args = parser.parse_args(argv)
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    if args.repeat < 3 and not args.allow_fewer_repeats:
        parser.error("--repeat must be at least 3 (medians and spread need three)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The preloads use courier_common's connection, which logs; only warnings, please.
    configure_logging(level="WARNING", fmt="console")
    config = Config.quick(args.repeat) if args.quick else Config(repeats=args.repeat)
    config = replace(config, loop=args.loop)
    layout = Layout.detect()
    if layout.pinned:
        # The orchestrator polls and parses: it belongs with the load generator.
        os.sched_setaffinity(0, set(layout.load))
    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    load_start = list(os.getloadavg())
    if load_start[0] >= QUIET_LOAD:
        say(
            f"load average is {load_start[0]:.2f} (≥ {QUIET_LOAD}): other work is running, "
            "so these numbers are from a loaded machine"
        )
    try:
        ensure_wrk()
    except BenchError as exc:
        say(str(exc))
        return 2
    log_dir = Path(tempfile.mkdtemp(prefix="courier-bench-"))
    say(f"logs in {log_dir}; services on cores {layout.service}, load on {layout.load}")
    backing = Backing()
    try:
        backing.open()
    except BenchError as exc:
        say(str(exc))
        return 2
    ctx = Context(
        config=config,
        backing=backing,
        layout=layout,
        log_dir=log_dir,
        profile_dir=BENCH / "profiles" if args.profile else None,
    )
    failed: list[str] = []
    try:
        for name in args.cases.split(","):
            say(f"case {name}")
            try:
                # Every case starts from an empty queue: what one case left for the workers
                # (the register case's welcomes, say) must not be counted by the next.
                backing.purge(NOTIFICATION_QUEUE)
                CASES[name](ctx)
            except Exception as exc:
                failed.append(name)
                ctx.notes.append(f"case {name} failed: {exc}".splitlines()[0])
                say(f"case {name} failed:\n{traceback.format_exc()}")
    finally:
        backing.close()
    load_end = list(os.getloadavg())
    mode = "quick" if args.quick else "full"
    if load_start[0] >= QUIET_LOAD or load_end[0] >= QUIET_LOAD:
        mode += f" (loaded machine: load average {load_start[0]:.2f} → {load_end[0]:.2f})"
        ctx.notes.append(
            "The machine was busy with other work during this run: re-run `make bench` on a "
            "quiet machine before quoting these numbers."
        )
    report = Report(
        started_at=started.isoformat(timespec="seconds"),
        mode=mode,
        repeats=config.repeats,
        machine={
            "cores": os.cpu_count(),
            "cpu": _cpu_model(),
            "python": platform.python_version(),
            "loadavg_start": load_start,
            "loadavg_end": load_end,
            "wrk": shutil.which("wrk"),
        },
        layout=layout.describe(),
        config=asdict(config),
        measurements=ctx.measurements,
        notes=ctx.notes,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stamp}.json").write_text(report.to_json())
    (args.out / f"{stamp}.md").write_text(render_markdown(report))
    sys.stdout.write(render_table(report.rows()) + "\n")
    say(f"wrote {args.out / stamp}.md and .json")
    if args.profile:
        say(f"py-spy's raw stacks (*.collapsed) and the logs are kept in {log_dir}")
    elif not failed:
        shutil.rmtree(log_dir, ignore_errors=True)
    if failed:
        say(f"failed cases: {', '.join(failed)} (logs kept in {log_dir})")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
