"""uvicorn's h11 protocol with a deadline on each request head.

uvicorn bounds idle keep-alive connections but not one that sends its request line and
headers slowly (or never): a script could hold every connection the process allows with a
byte a minute. No server option covers it, so this subclass arms a timer whenever the
connection is waiting for a request head and closes the connection when it fires. h11 also
bounds the head's size (``h11_max_incomplete_event_size``); httptools has no such bound.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from common.settings import get_settings


class BoundedH11Protocol(H11Protocol):
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is None or self.cycle.response_complete:
            if self._head_timer is None:
                self._arm()  # a new request head has begun: it must end in time
        else:
            self._disarm()

    def on_response_complete(self) -> None:
        self._disarm()  # the keep-alive timeout covers the wait for the next request
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        seconds = get_settings().api_header_timeout_seconds
        self._head_timer = self.loop.call_later(seconds, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self, *_: Any) -> None:
        self._head_timer = None
        if self.cycle is None or self.cycle.response_complete:
            self.timeout_keep_alive_handler()  # closes the connection
