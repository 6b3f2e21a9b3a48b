"""The one logging setup every Courier process uses.

Every line a Courier process writes — from structlog loggers, from the standard library, and from
third-party libraries such as uvicorn and aio-pika — leaves through a single handler on the root
logger and a single structlog chain. That is what lets an operator grep one JSON shape, join log
lines to traces by ``trace_id``, and trust that no email address or phone number reaches the log
store in clear: there is exactly one place where that is enforced.

Design choices worth knowing before changing anything here:

* All the work (context merging, timestamps, trace ids, PII scrubbing, rendering) happens in the
  handler's `structlog.stdlib.ProcessorFormatter`, not in structlog's own processor list. The
  structlog side only filters by level and hands the event to the standard library. So foreign
  records and structlog records take the *same* path, and calling `configure_logging` again
  (tests, a service switching format) takes effect at once even for loggers created at import
  time.
* Output goes to stdout for both formats: containers are expected to write their log stream to
  stdout, and a single stream keeps lines from interleaving out of order.
* PII: `scrub_pii`, the last processor before the renderer, applies `courier_common.pii` to every
  value of every line. Numbers that are data (durations, counts, sizes) should be logged as
  ``int``/``float`` values, which it never touches.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import traceback
from collections.abc import Mapping
from typing import Any, Final, Literal, TextIO

import orjson
import structlog
from opentelemetry import trace
from structlog.typing import EventDict, Processor, WrappedLogger

from courier_common.pii import scrub_value

__all__ = [
    "add_trace_ids",
    "configure_logging",
    "current_trace_ids",
    "get_logger",
    "scrub_pii",
]

LogFormat = Literal["json", "console"]

# Third-party loggers and the minimum level they log at. These are floors: a stricter root level
# (say WARNING) still wins. aio-pika and aiormq narrate every channel and frame at INFO, and
# httpx every request (the backlog poller's management-API calls: a few lines every few
# seconds), which would drown the one-line-per-outcome logs the services write.
_DEFAULT_LOGGER_FLOORS: Final[Mapping[str, int]] = {
    "uvicorn.access": logging.INFO,
    "aio_pika": logging.WARNING,
    "aiormq": logging.WARNING,
    "httpx": logging.WARNING,
    "httpcore": logging.WARNING,
}

# Loggers that libraries like to give their own handlers (uvicorn's default dictConfig does, with
# propagate=False). We take those handlers away so their records reach the root handler instead of
# being printed a second time in another format.
_ROUTED_LOGGERS: Final[tuple[str, ...]] = (
    "uvicorn",
    "uvicorn.error",
    "uvicorn.access",
    "aio_pika",
    "aiormq",
)


# --------------------------------------------------------------------------------------------
# Processors: PII scrubbing and trace correlation
# --------------------------------------------------------------------------------------------

# Keys that the formatter's own processors always (over)write with values from code, never
# from input: the level name, the logger's name and the timestamp. Scrubbing them is pure cost
# (three regex passes per line); everything else, trace ids included, is scrubbed.
_GENERATED_KEYS: Final = frozenset({"level", "logger", "timestamp"})


def scrub_pii(_logger: WrappedLogger, _method_name: str, event_dict: EventDict) -> EventDict:
    """Structlog processor: mask emails and phone numbers anywhere in the event.

    It runs after exceptions are rendered to text, so the traceback (whose last line often quotes
    the offending address) is scrubbed too, and right before the renderer so nothing added later
    can slip past it. Keys are not scrubbed: they come from code, not from users.
    """
    for key, value in event_dict.items():
        if key in _GENERATED_KEYS:
            continue
        scrubbed = scrub_value(value)
        if scrubbed is not value:
            event_dict[key] = scrubbed
    return event_dict


def current_trace_ids() -> tuple[str, str] | None:
    """Return ``(trace_id, span_id)`` of the active span as lowercase hex, or None.

    Ids are only returned for a span that is valid and either recording or sampled: pointing a log
    line or a dead letter at a trace the backend never received sends an operator looking for
    something that does not exist. `courier_common.tracing` re-exports this; it lives here
    because the log chain calls it on every line and tracing already depends on this module.
    """
    span = trace.get_current_span()
    context = span.get_span_context()
    if not context.is_valid:
        return None
    if not (span.is_recording() or context.trace_flags.sampled):
        return None
    return trace.format_trace_id(context.trace_id), trace.format_span_id(context.span_id)


def add_trace_ids(_logger: WrappedLogger, _method_name: str, event_dict: EventDict) -> EventDict:
    """Structlog processor: stamp ``trace_id``/``span_id`` so a log line leads to its trace.

    Explicitly bound ids win, so a consumer can log about a message's trace from outside it.
    """
    if "trace_id" not in event_dict:
        ids = current_trace_ids()
        if ids is not None:
            event_dict["trace_id"], event_dict["span_id"] = ids
    return event_dict


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


class _ServiceAdder:
    """Adds ``service`` to every line, including third-party ones.

    A processor rather than a contextvar binding because request middleware routinely calls
    ``clear_contextvars()``, which would silently drop it.
    """

    def __init__(self, service: str) -> None:
        self._service = service

    def __call__(
        self, _logger: WrappedLogger, _method_name: str, event_dict: EventDict
    ) -> EventDict:
        event_dict.setdefault("service", self._service)
        return event_dict


class _StdoutHandler(logging.StreamHandler[TextIO]):
    """Root handler that writes to whatever ``sys.stdout`` is, one write per event-loop turn.

    Binding the stream once would keep writing to a stream that test capture (or anything else
    that swaps stdout) has since replaced. Its class also marks the handler as ours, which is how
    `configure_logging` stays idempotent without touching handlers it did not install.

    Lines logged below WARNING from inside a running event loop are written together at the
    end of the loop's current turn: a consumer at prefetch 100 logs a line per delivery, and
    one ``write`` per line was a system call per message (most of a log line's cost when
    stdout is a pipe or a file). The delay is one turn of the loop; a WARNING or worse, a line
    from a thread with no running loop, :meth:`flush` (which ``logging.shutdown`` calls at
    exit) and :meth:`close` write everything pending at once, in order. What a SIGKILL can
    take is the lines of the turn it interrupts, never a warning.
    """

    def __init__(self) -> None:
        super().__init__(sys.stdout)
        self._pending: list[str] = []
        self._pending_stream: TextIO | None = None
        self._flush_loop: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        # handle() holds the handler lock around emit(), so the buffer is ours here.
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        stream = sys.stdout
        if self._pending and stream is not self._pending_stream:
            self._write_pending()
        self._pending.append(line)
        self._pending_stream = stream
        if record.levelno >= logging.WARNING or not self._flush_at_end_of_turn():
            self._write_pending(record)

    def _flush_at_end_of_turn(self) -> bool:
        """Make sure the running loop writes the pending lines this turn; False: no loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        if self._flush_loop is not loop:
            self._flush_loop = loop
            loop.call_soon(self._end_of_turn)
        return True

    def _end_of_turn(self) -> None:
        self.acquire()
        try:
            self._flush_loop = None
            self._write_pending()
        finally:
            self.release()

    def _write_pending(self, record: logging.LogRecord | None = None) -> None:
        if not self._pending:
            return
        text, self._pending = "".join(self._pending), []
        stream = self._pending_stream or sys.stdout
        try:
            self.stream = stream
            stream.write(text)
            stream.flush()
        except Exception:
            if record is not None:
                self.handleError(record)
            elif logging.raiseExceptions:  # as handleError would, without a record to name
                traceback.print_exc(file=sys.stderr)

    def flush(self) -> None:
        # Every write is flushed as it is made: what is left to flush is what is pending.
        self.acquire()
        try:
            self._write_pending()
        finally:
            self.release()

    def close(self) -> None:
        self.flush()
        super().close()


def _stdout_is_tty() -> bool:
    isatty = getattr(sys.stdout, "isatty", None)
    return bool(isatty is not None and isatty())


def _parse_level(level: str) -> int:
    levels = logging.getLevelNamesMapping()
    try:
        return levels[level.strip().upper()]
    except KeyError:
        known = ", ".join(sorted(name for name in levels if name != "NOTSET"))
        msg = f"unknown log level {level!r}; expected one of {known}"
        raise ValueError(msg) from None


def _formatter_processors(fmt: LogFormat, service: str | None, colors: bool) -> list[Processor]:
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_trace_ids,
    ]
    if service:
        processors.append(_ServiceAdder(service))
    processors += [
        structlog.processors.StackInfoRenderer(),
        # Exceptions become plain text in both formats so scrub_pii can see them. In JSON that
        # is one "exception" string field (greppable, no locals that could hold PII); the
        # console renderer prints that string under the line.
        structlog.processors.format_exc_info,
        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
        scrub_pii,
    ]
    if fmt == "json":
        processors.append(structlog.processors.JSONRenderer(serializer=_orjson_text))
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=colors))
    return processors


def _orjson_text(value: Any, **options: Any) -> str:
    """JSON for one log line with orjson (several times faster than the standard library's).

    UUIDs and datetimes are rendered as their text, keys that are not strings too; dataclasses
    and anything else orjson does not know go through structlog's fallback (``default``), as
    with ``json.dumps``.
    """
    return orjson.dumps(
        value,
        default=options.get("default"),
        option=orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATACLASS,
    ).decode()


def _skip_unused_record_fields() -> None:
    """Stop the standard library from computing record fields no Courier line prints.

    Every `logging.LogRecord` otherwise looks up its caller's file, line and function (a walk
    up the stack), the thread, the process id (a system call) and the process name; the JSON
    and console lines are built from the event dict and use none of them. These are the
    switches the logging HOWTO's "Optimization" section names for exactly this.
    """
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def configure_logging(
    *,
    level: str = "INFO",
    fmt: LogFormat | None = None,
    service: str | None = None,
    logger_levels: Mapping[str, str] | None = None,
) -> None:
    """Route every log record in the process through Courier's structlog chain to stdout.

    Call it once at startup, before the app starts logging; calling it again replaces the
    previous configuration (one handler, never two), which is what tests and a reloading dev
    server need.

    Args:
        level: root level name (``COURIER_LOG_LEVEL``).
        fmt: ``"json"`` or ``"console"``; None picks console when stdout — the stream we write
            to — is a terminal and JSON otherwise (``COURIER_LOG_FORMAT``).
        service: added to every line as ``service`` so lines from several services can share an
            index.
        logger_levels: exact levels for named loggers, overriding the built-in floors (for
            example ``{"aio_pika": "DEBUG"}`` while chasing a connection problem).

    uvicorn must be started with ``log_config=None``; otherwise it installs its own handlers
    after this runs. If it already did, this call removes them.
    """
    root_level = _parse_level(level)
    chosen: LogFormat = fmt if fmt is not None else ("console" if _stdout_is_tty() else "json")

    # Why structlog.stdlib.BoundLogger and not make_filtering_bound_logger: every line has to go
    # through the stdlib handler anyway (so third-party records share the format), the level
    # then lives in one place — the stdlib logger tree, with per-logger levels — and
    # filter_by_level reads it at call time, so a reconfiguration also reaches loggers created
    # at import time. A filtering bound logger bakes one global level in at configure time.
    # Loggers are not cached on first use for the same reason, and so that
    # structlog.testing.capture_logs() works in every test; the cost is one cheap bind per call,
    # small next to rendering a line.
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
        logger_factory=structlog.stdlib.LoggerFactory(),
        context_class=dict,
        cache_logger_on_first_use=False,
    )

    handler = _StdoutHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=_formatter_processors(chosen, service, colors=_stdout_is_tty()),
        )
    )

    _skip_unused_record_fields()

    root = logging.getLogger()
    for existing in list(root.handlers):
        if isinstance(existing, _StdoutHandler):
            root.removeHandler(existing)
            existing.close()
    root.addHandler(handler)
    root.setLevel(root_level)

    for name in _ROUTED_LOGGERS:
        routed = logging.getLogger(name)
        for existing in list(routed.handlers):
            routed.removeHandler(existing)
        routed.propagate = True
        routed.setLevel(logging.NOTSET)
    for name, floor in _DEFAULT_LOGGER_FLOORS.items():
        logging.getLogger(name).setLevel(max(floor, root_level))
    for name, name_level in (logger_levels or {}).items():
        logging.getLogger(name).setLevel(_parse_level(name_level))


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    """Return a structlog logger that goes through `configure_logging`'s chain.

    Safe to call at import time, before `configure_logging`: the logger resolves its
    configuration on each call. With no *name*, the calling module's name is used, so per-module
    levels work as with stdlib logging.
    """
    if name is None:
        # Resolved here, once, rather than by structlog inspecting frames on every call.
        name = str(sys._getframe(1).f_globals.get("__name__", "courier"))
    return structlog.stdlib.get_logger(name)
