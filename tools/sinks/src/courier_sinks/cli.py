"""``courier-smtp-sink`` and ``courier-http-sink``: the sinks as processes, for ``make run``.

Each prints one line saying where it listens and where it stores, logs one line per
delivery to stderr, and exits 0 on SIGTERM or SIGINT (a Procfile runner and Ctrl-C both
stop it that way). Options fall back to ``COURIER_SINK_*`` environment variables, then to
the ports ``make run`` uses. ``--store ''`` keeps records in memory only.

The servers are the in-process ones (`SmtpSink`, `HttpSink`) in their background thread;
the main thread only waits for a signal. The signals are blocked before any thread starts,
so every thread inherits the mask and the main thread's `signal.sigwait` is the one place
that receives them: no handler can run in the middle of a server's work.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

from courier_sinks.failures import MAX_DELAY_MS
from courier_sinks.http import HttpSink
from courier_sinks.smtp import SmtpSink, check_delay_ms

__all__ = ["http_main", "smtp_main"]

_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host",
        default=_env("COURIER_SINK_HOST", "127.0.0.1"),
        help="address to listen on (env COURIER_SINK_HOST; default %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        default=_env("COURIER_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error", "critical"],
        type=str.lower,
        help="per-delivery lines are info (env COURIER_LOG_LEVEL; default %(default)s)",
    )


def _configure_logging(level: str) -> None:
    """Plain lines on stderr, prefixed by the logger's own ``smtp-sink:``/``http-sink:``.

    aiosmtpd narrates every connection at INFO and uvicorn announces itself; both are kept
    to warnings so the sinks' own lines stay readable in ``make run``'s merged stream.
    """
    # An unknown level (COURIER_LOG_LEVEL is shared with the services) falls back to info.
    numeric = logging.getLevelName(level.upper())
    logging.basicConfig(
        level=numeric if isinstance(numeric, int) else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    if level != "debug":
        for noisy in ("mail.log", "uvicorn"):
            logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def _store(value: str) -> str | None:
    return value or None


def _delay_ms(value: str) -> int:
    """``--delay-ms``: a whole number of milliseconds, 0 to `MAX_DELAY_MS` (argparse's *type*)."""
    try:
        return check_delay_ms(int(value))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a whole number of milliseconds from 0 to {MAX_DELAY_MS} "
            f"(also for COURIER_SINK_SMTP_DELAY_MS), not {value!r}"
        ) from None


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def _env_flag(parser: argparse.ArgumentParser, name: str, default: bool) -> bool:
    """A boolean environment variable: 1/true/yes/on or 0/false/no/off (empty is false)."""
    value = os.environ.get(name)
    if value is None:
        return default
    if value.strip().lower() in _TRUE:
        return True
    if value.strip().lower() in _FALSE:
        return False
    parser.error(f"{name} must be 1/true/yes/on or 0/false/no/off, not {value!r}")


def _serve_with(name: str, sink: SmtpSink | HttpSink, banner: Callable[[], str]) -> int:
    """Start *sink*, print the banner line, wait for SIGTERM/SIGINT, stop; the exit code."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        sink.start()
    except OSError as exc:
        print(f"{name}: cannot listen: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    try:
        print(banner(), flush=True)  # noqa: T201
        received = signal.sigwait(_STOP_SIGNALS)
        logging.getLogger(name).info("%s: %s, stopping", name, signal.Signals(received).name)
    finally:
        sink.stop()
    return 0


def _storing(sink: SmtpSink | HttpSink) -> str:
    return f"storing {sink.store_path}" if sink.store_path is not None else "storing in memory"


def smtp_main(argv: Sequence[str] | None = None) -> int:
    """``courier-smtp-sink``: the SMTP sink and its control API."""
    parser = argparse.ArgumentParser(
        prog="courier-smtp-sink",
        description="A real SMTP server that keeps every message it accepts (Courier's "
        "stand-in for a mail relay), with a control API to read them and inject failures.",
    )
    _common_options(parser)
    parser.add_argument(
        "--port",
        type=int,
        default=_env("COURIER_SINK_SMTP_PORT", "1025"),
        help="SMTP port, 0 for a free one (env COURIER_SINK_SMTP_PORT; default %(default)s)",
    )
    parser.add_argument(
        "--control-port",
        type=int,
        default=_env("COURIER_SINK_SMTP_CONTROL_PORT", "8025"),
        help="control API port (env COURIER_SINK_SMTP_CONTROL_PORT; default %(default)s)",
    )
    parser.add_argument(
        "--store",
        default=_env("COURIER_SINK_SMTP_STORE", "var/sinks/smtp.jsonl"),
        help="JSON-lines file to append messages to, '' for none "
        "(env COURIER_SINK_SMTP_STORE; default %(default)s)",
    )
    parser.add_argument(
        "--delay-ms",
        type=_delay_ms,
        default=_env("COURIER_SINK_SMTP_DELAY_MS", "0"),
        help="answer every message this many ms after its DATA ended, a slow relay; other "
        "sessions go on meanwhile (env COURIER_SINK_SMTP_DELAY_MS; default %(default)s)",
    )
    parser.add_argument(
        "--parse",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="--no-parse keeps lean records: envelope, size, Message-ID and Subject, no "
        "headers or bodies, for a fraction of the CPU (env COURIER_SINK_SMTP_PARSE=0; "
        "default: parse)",
    )
    args = parser.parse_args(argv)
    parse = (
        args.parse
        if args.parse is not None
        else _env_flag(parser, "COURIER_SINK_SMTP_PARSE", default=True)
    )
    _configure_logging(args.log_level)
    sink = SmtpSink(
        args.host,
        args.port,
        _store(args.store),
        control_port=args.control_port,
        delay_ms=args.delay_ms,
        parse=parse,
    )

    def banner(s: SmtpSink) -> str:
        delay = f", answering after {s.delay_ms} ms" if s.delay_ms else ""
        lean = "" if s.parse else ", lean records (no MIME parse)"
        return (
            f"smtp-sink: SMTP on {s.host}:{s.port}, "
            f"control {s.control_url}/_sink/messages, {_storing(s)}{delay}{lean}"
        )

    return _serve_with("smtp-sink", sink, lambda: banner(sink))


def http_main(argv: Sequence[str] | None = None) -> int:
    """``courier-http-sink``: the SMS/push provider sink, control API under ``/_sink``."""
    parser = argparse.ArgumentParser(
        prog="courier-http-sink",
        description="An HTTP SMS/push provider that records every request (Courier's "
        "stand-in for the real providers), with a control API to read them and inject "
        "failures.",
    )
    _common_options(parser)
    parser.add_argument(
        "--port",
        type=int,
        default=_env("COURIER_SINK_HTTP_PORT", "8030"),
        help="HTTP port, 0 for a free one (env COURIER_SINK_HTTP_PORT; default %(default)s)",
    )
    parser.add_argument(
        "--store",
        default=_env("COURIER_SINK_HTTP_STORE", "var/sinks/http.jsonl"),
        help="JSON-lines file to append requests to, '' for none "
        "(env COURIER_SINK_HTTP_STORE; default %(default)s)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("COURIER_SINK_HTTP_TOKEN") or None,
        help="require 'Authorization: Bearer <token>' (env COURIER_SINK_HTTP_TOKEN; "
        "default: no auth)",
    )
    args = parser.parse_args(argv)
    _configure_logging(args.log_level)
    sink = HttpSink(args.host, args.port, _store(args.store), token=args.token)

    def banner(s: HttpSink) -> str:
        auth = ", bearer token required" if s.token else ""
        return (
            f"http-sink: HTTP on {s.url} (POST /sms, /push or any /<path>), "
            f"control {s.url}/_sink/requests, {_storing(s)}{auth}"
        )

    return _serve_with("http-sink", sink, lambda: banner(sink))
