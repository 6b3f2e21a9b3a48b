"""The SMTP sink with a delay before every answer: the benchmark's slow email provider.

``courier-smtp-sink`` can refuse on demand but not take its time, so this wraps the same
`SmtpSink` (same protocol, same parsing, same store) and sleeps ``--delay-ms`` at the end of
DATA before the sink decides. Sessions are asynchronous, so a delay makes the sender wait
without making the sink busy: a 20 ms sink models an I/O-bound provider, a 2 s one a slow
provider. Prints one line when it listens; stops on SIGTERM or SIGINT.

(A ``delay_ms`` on the SMTP sink's own failure switch, as the HTTP sink has, would make this
file unnecessary.)
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from courier_sinks.smtp import SmtpSink


class _Delayed:
    """An aiosmtpd handler that waits, then lets the sink's own handler answer."""

    def __init__(self, inner: Any, seconds: float) -> None:
        self._inner = inner
        self._seconds = seconds

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        await asyncio.sleep(self._seconds)
        answer: str = await self._inner.handle_DATA(server, session, envelope)
        return answer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--control-port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, required=True)
    args = parser.parse_args()
    stop = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    sink = SmtpSink("127.0.0.1", args.port, None, control_port=args.control_port)
    sink._handler = _Delayed(sink._handler, args.delay_ms / 1000)  # type: ignore[assignment]
    sink.start()
    try:
        sys.stdout.write(
            f"delayed-smtp-sink: SMTP on 127.0.0.1:{sink.port}, {args.delay_ms:g} ms per "
            f"message, control {sink.control_url}/_sink/messages\n"
        )
        sys.stdout.flush()
        signal.sigwait(stop)
    finally:
        sink.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
