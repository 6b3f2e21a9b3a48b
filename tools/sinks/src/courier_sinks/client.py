"""`SinkControl`: drive a sink that runs as a process (``make run``, an e2e test) over HTTP.

The same client works for both sinks, because their control APIs have one shape. Errors
from the sink (a bad failure spec, say) raise `httpx.HTTPStatusError`, whose response
body says what was wrong.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any, Self

import httpx

__all__ = ["SinkControl"]

_POLL_SECONDS = 0.05


class SinkControl:
    """A small synchronous client for ``/_sink/...`` on one sink.

    *base_url* is the control API's base: for the SMTP sink the control port
    (``http://127.0.0.1:8025``), for the HTTP sink the sink itself (``http://127.0.0.1:8030``).
    """

    def __init__(self, base_url: str, *, timeout: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=f"{self.base_url}/_sink", timeout=timeout)
        self._records: str | None = None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        response.raise_for_status()
        return response.json() if response.content else None

    def healthz(self) -> dict[str, Any]:
        """``{"status": "ok", "kind": "smtp"|"http", "records": ..., "count": n}``."""
        health: dict[str, Any] = self._call("GET", "/healthz")
        return health

    def _records_path(self) -> str:
        # Which sink this is decides the collection's name; asked once, on first need.
        if self._records is None:
            self._records = str(self.healthz()["records"])
        return f"/{self._records}"

    def messages(self, *, to: str | None = None) -> list[dict[str, Any]]:
        """The SMTP sink's accepted messages, oldest first; *to*: one envelope recipient."""
        params = {"to": to} if to is not None else {}
        messages: list[dict[str, Any]] = self._call("GET", "/messages", params=params)
        return messages

    def requests(self, *, path: str | None = None) -> list[dict[str, Any]]:
        """The HTTP sink's recorded requests, oldest first; *path*: only those to it."""
        params = {"path": path} if path is not None else {}
        requests: list[dict[str, Any]] = self._call("GET", "/requests", params=params)
        return requests

    def records(self, **filters: str) -> list[dict[str, Any]]:
        """Messages or requests, whichever this sink keeps; *filters* go in the query."""
        records: list[dict[str, Any]] = self._call("GET", self._records_path(), params=filters)
        return records

    def wait_for(
        self, count: int = 1, *, timeout: float = 10.0, **filters: str
    ) -> list[dict[str, Any]]:
        """Poll until at least *count* records (after *filters*) exist; return them all.

        Raises `TimeoutError` with how many arrived.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = self.records(**filters)
            if len(found) >= count:
                return found
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"expected {count} record(s) at {self.base_url} within {timeout:g}s, "
                    f"got {len(found)}"
                )
            time.sleep(_POLL_SECONDS)

    def clear(self) -> None:
        """Forget every record (and, on the HTTP sink, every idempotency key seen)."""
        self._call("DELETE", self._records_path())

    def fail_next(
        self,
        count: int = 1,
        *,
        code: int | None = None,
        message: str | None = None,
        status: int | None = None,
        path: str | None = None,
        retry_after: int | None = None,
        delay_ms: int | None = None,
    ) -> dict[str, Any]:
        """Arm the failure switch; returns its new state.

        SMTP sink: *code* (required) and *message*. HTTP sink: *status* (default 503),
        *path*, *retry_after*, *delay_ms*, *message*. Fields left None are not sent.
        """
        body: dict[str, Any] = {"count": count}
        fields = {
            "code": code,
            "message": message,
            "status": status,
            "path": path,
            "retry_after": retry_after,
            "delay_ms": delay_ms,
        }
        body.update({name: value for name, value in fields.items() if value is not None})
        state: dict[str, Any] = self._call("POST", "/fail", json=body)
        return state

    def delay_next(self, count: int, delay_ms: int, *, path: str | None = None) -> dict[str, Any]:
        """HTTP sink: answer the next *count* requests normally, but after *delay_ms*."""
        body: dict[str, Any] = {"count": count, "status": None, "delay_ms": delay_ms}
        if path is not None:
            body["path"] = path
        state: dict[str, Any] = self._call("POST", "/fail", json=body)
        return state

    def failure(self) -> dict[str, Any]:
        """The failure switch: ``armed``, ``remaining``, ``used`` and the failure's fields."""
        state: dict[str, Any] = self._call("GET", "/fail")
        return state

    def clear_failures(self) -> None:
        self._call("DELETE", "/fail")
