"""The HTTP plumbing every Courier service with a port shares.

user-service and dlq-archiver serve a business API; notification-service only serves probes and
metrics. All three answer errors the same way, bound request bodies the same way, count and log
requests the same way and shut down the same way, so that a client, a fuzzer, a dashboard and an
operator each see one behaviour instead of three. Services hold routes and business logic only.

Where to look: ``problems.py`` (every error as RFC 9457 problem details, never echoing client
input), ``limits.py`` (the request body limit), ``metrics.py`` (RED metrics and the one log line
per request, by route template), ``probes.py`` (``/healthz``, ``/readyz``, ``/metrics``),
``server.py`` (uvicorn and the graceful SIGTERM). `courier_common.service.service_app` puts
them together for a service; nothing else should need to.
"""

from courier_common.http.limits import BodySizeLimitMiddleware
from courier_common.http.metrics import (
    HTTP_BUCKETS,
    PROBE_PATHS,
    STANDARD_METHODS,
    UNMATCHED_ROUTE,
    HttpMetrics,
    HttpMetricsMiddleware,
)
from courier_common.http.probes import READINESS_TIMEOUT_SECONDS, health_router
from courier_common.http.problems import (
    PROBLEM_JSON,
    ProblemError,
    StorageErrors,
    install_problem_handlers,
    problem_response,
    problem_responses,
)
from courier_common.http.server import (
    GRACEFUL_SHUTDOWN_SECONDS,
    NO_NATIVE_TELEMETRY,
    serve,
)

__all__ = [
    "GRACEFUL_SHUTDOWN_SECONDS",
    "HTTP_BUCKETS",
    "NO_NATIVE_TELEMETRY",
    "PROBE_PATHS",
    "PROBLEM_JSON",
    "READINESS_TIMEOUT_SECONDS",
    "STANDARD_METHODS",
    "UNMATCHED_ROUTE",
    "BodySizeLimitMiddleware",
    "HttpMetrics",
    "HttpMetricsMiddleware",
    "ProblemError",
    "StorageErrors",
    "health_router",
    "install_problem_handlers",
    "problem_response",
    "problem_responses",
    "serve",
]
