"""Local stand-ins for the outside world Courier talks to, for ``make run`` and for tests.

* `SmtpSink`: a real SMTP server (aiosmtpd) that keeps every message it accepts.
* `HttpSink`: an HTTP SMS/push provider (Starlette on uvicorn) that records every request.
* `SinkControl`: a client for the control API both expose under ``/_sink``, for a sink that
  runs as a process (``courier-smtp-sink``, ``courier-http-sink``).

Each sink can be told to fail the next N deliveries, which is how Courier's retry and
dead-letter paths are tested against a real "no".
"""

from courier_sinks.client import SinkControl
from courier_sinks.failures import HttpFailure, SmtpFailure
from courier_sinks.http import HttpSink, RecordedRequest, create_http_app, mask_credentials
from courier_sinks.smtp import SmtpMessage, SmtpSink, create_control_app

__all__ = [
    "HttpFailure",
    "HttpSink",
    "RecordedRequest",
    "SinkControl",
    "SmtpFailure",
    "SmtpMessage",
    "SmtpSink",
    "create_control_app",
    "create_http_app",
    "mask_credentials",
]
