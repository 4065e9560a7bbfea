"""uvicorn as `openflamingo serve` runs it: a cap on open connections, a deadline for each request's head, and a
graceful shutdown on SIGTERM / Ctrl-C (stop accepting, let running requests finish within a grace period, exit 0).

uvicorn bounds the idle time between requests (`timeout_keep_alive`) but not the time a client may take to send a
request's head: a client that sends a few header bytes and then nothing would hold its connection for good. The
body's own deadline is the app's (`read_body`).
"""

from __future__ import annotations

import asyncio

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


def h11_with_head_timeout(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request head has not arrived `seconds` after it opened
    (or after the previous response)."""

    class HeadTimeoutProtocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._in_request():
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _in_request(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(seconds, self._head_timed_out)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if not self._in_request():
                self.transport.close()

    return HeadTimeoutProtocol


def server_config(
    app,
    host: str,
    port: int,
    read_timeout_s: float = 30.0,
    max_connections: int = 256,
    shutdown_grace_s: float = 30.0,
) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        http=h11_with_head_timeout(read_timeout_s),
        limit_concurrency=max_connections,  # past it, uvicorn answers 503 at once
        timeout_graceful_shutdown=max(1, round(shutdown_grace_s)),
        h11_max_incomplete_event_size=64 * 1024,  # request line + headers
    )
