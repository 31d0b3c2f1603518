"""One Redis subscriber per API process.

Every event stream and synchronous wait of the process shares one pub/sub connection: the hub
subscribes to a job's channel when its first watcher arrives, unsubscribes when the last one
leaves, and fans each message out to the watchers' in-memory queues. A pool connection per
watcher let a hundred open streams of one tenant starve every other request of connections.

A watcher counts against its key's and the process's caps from ``Hub.open`` on, before it
subscribes (or, for a synchronous Hotpot request, before it is charged). After a Redis
reconnect every watcher receives ``RESYNC`` once its channel is subscribed again, and re-reads
the job: what was published while the connection was down is in the job's record and log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from types import TracebackType
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub

from common.errors import RateLimited
from common.redis_keys import events_channel

log = logging.getLogger(__name__)

#: Queued instead of an event when a watcher must re-read the job (a reconnect, an overflow).
RESYNC: Final[dict[str, Any]] = {"type": "sdq.resync"}

#: Events a watcher may have unread; a slower one drops them and re-reads the job instead.
_QUEUE_SIZE = 256
#: How long ``follow`` waits for Redis to confirm a subscription before going on regardless.
_CONFIRM_SECONDS = 5.0
_READ_SECONDS = 1.0
_RETRY_AFTER_SECONDS = 5.0


class HubFull(RateLimited):
    """The process holds as many streams and waits as it may (503). A ``RateLimited`` so the
    one error handler adds its ``Retry-After``; nothing was charged."""

    status_code = 503
    message = "this API process has no room for another event stream; retry shortly"


class _Channel:
    """The watchers of one channel, and whether Redis has confirmed the subscription."""

    __slots__ = ("pending", "ready", "resync", "watchers")

    def __init__(self) -> None:
        self.watchers: set[Subscription] = set()
        self.pending = 0  # SUBSCRIBEs sent and not yet confirmed
        self.ready = asyncio.Event()
        self.resync = False  # tell the watchers to re-read once the subscription is back


class _PubSub(PubSub):
    """redis-py's pub/sub, telling the hub when its connection was re-established (redis-py
    re-subscribes by itself then; what was published meanwhile is lost)."""

    def __init__(self, client: aioredis.Redis, hub: Hub) -> None:
        super().__init__(client.connection_pool)
        self._hub = hub

    async def on_connect(self, connection: Any) -> None:
        # Re-subscribe exactly what the hub still watches, not what redis-py remembers.
        self.channels = dict.fromkeys(self._hub.expect_resubscribe())
        await super().on_connect(connection)


class Hub:
    """The process's one subscriber, and the caps on how many may watch at once."""

    def __init__(self, client: aioredis.Redis, *, per_key: int, per_process: int) -> None:
        self.client = client
        self.per_key = per_key
        self.per_process = per_process
        self._held: Counter[str] = Counter()
        self._open = 0
        self._channels: dict[str, _Channel] = {}
        self._pubsub = _PubSub(client, self)
        self._connecting = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None

    @property
    def open_count(self) -> int:
        """Streams and waits open in this process."""
        return self._open

    def held(self, key_id: str) -> int:
        return self._held[key_id]

    async def start(self) -> None:
        if self._reader is None:
            try:
                await self._connect()
            except Exception as exc:  # the reader keeps trying
                log.warning("event hub: Redis unavailable at start: %s", exc)
                await self._reset()
            self._reader = asyncio.create_task(self._run(), name="event-hub")

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        await self._pubsub.aclose()

    def open(self, key_id: str) -> Subscription:
        """A slot for one stream or wait of ``key_id``: ``HubFull`` (503) when the process is
        full, ``RateLimited`` (429) when the key holds ``per_key`` already. Taken at once (no
        await between the check and the count), released by ``Subscription.close``."""
        if self._open >= self.per_process:
            raise HubFull(retry_after=_RETRY_AFTER_SECONDS)
        if self._held[key_id] >= self.per_key:
            raise RateLimited(
                f"too many open event streams for this key ({self.per_key})",
                retry_after=_RETRY_AFTER_SECONDS,
            )
        self._open += 1
        self._held[key_id] += 1
        return Subscription(self, key_id)

    # Watchers.

    async def _follow(self, watcher: Subscription, channel: str) -> None:
        entry = self._channels.get(channel)
        if entry is None:
            entry = self._channels[channel] = _Channel()
            entry.watchers.add(watcher)
            if self._pubsub.connection is not None:
                entry.pending += 1
                try:
                    await self._pubsub.subscribe(channel)
                except Exception as exc:  # the reader reconnects and re-subscribes everything
                    log.warning("event hub: subscribe to %s failed: %s", channel, exc)
            # else: the reader is (re)connecting and subscribes every channel once connected.
        else:
            entry.watchers.add(watcher)
        try:
            await asyncio.wait_for(entry.ready.wait(), _CONFIRM_SECONDS)
        except TimeoutError:
            log.warning("event hub: %s not confirmed within %ss", channel, _CONFIRM_SECONDS)

    def _release(self, watcher: Subscription) -> str | None:
        """Uncount ``watcher``; the channel to unsubscribe if it was its last watcher."""
        self._open -= 1
        self._held[watcher.key_id] -= 1
        if self._held[watcher.key_id] <= 0:
            del self._held[watcher.key_id]
        channel = watcher.channel
        entry = self._channels.get(channel) if channel is not None else None
        if entry is None:
            return None
        entry.watchers.discard(watcher)
        if entry.watchers:
            return None
        del self._channels[channel]  # type: ignore[arg-type]
        return channel

    async def _unsubscribe(self, channel: str) -> None:
        if self._pubsub.connection is None or channel in self._channels:
            return
        try:
            await self._pubsub.unsubscribe(channel)
        except Exception as exc:  # a reconnect subscribes only what is still watched
            log.warning("event hub: unsubscribe from %s failed: %s", channel, exc)

    def expect_resubscribe(self) -> list[str]:
        """Every watched channel is about to be subscribed again: each watcher re-reads its
        job once Redis confirms."""
        for entry in self._channels.values():
            entry.pending += 1
            # A watcher still in ``follow`` reads the job afterwards anyway.
            entry.resync = entry.ready.is_set()
        return list(self._channels)

    # The reader.

    async def _run(self) -> None:
        delay = 0.2
        while True:
            try:
                if self._pubsub.connection is None:
                    await self._connect()
                message = await self._pubsub.get_message(timeout=_READ_SECONDS)
                delay = 0.2
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # redis-py gave up its own retries: start afresh
                log.warning("event hub: lost Redis (%s); reconnecting in %.1fs", exc, delay)
                await self._reset()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if message is not None:
                self._dispatch(message)

    async def _connect(self) -> None:
        async with self._connecting:
            await self._pubsub.connect()
            channels = self.expect_resubscribe()
            if channels:
                await self._pubsub.subscribe(*channels)

    async def _reset(self) -> None:
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()
        self._pubsub = _PubSub(self.client, self)
        for entry in self._channels.values():
            entry.pending = 0  # what the old connection had in flight will never be confirmed

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        entry = self._channels.get(message.get("channel") or "")
        if entry is None:
            return
        if kind == "subscribe":
            entry.pending = max(0, entry.pending - 1)
            if entry.pending == 0:
                entry.ready.set()
                if entry.resync:
                    entry.resync = False
                    for watcher in list(entry.watchers):
                        watcher.push(RESYNC)
        elif kind == "message":
            try:
                event = json.loads(message["data"])
            except (TypeError, ValueError):
                log.warning("event hub: unreadable event on %s", message.get("channel"))
                return
            for watcher in list(entry.watchers):
                watcher.push(event)


class Subscription:
    """One stream's or wait's place in the hub: its slot, and the events of the job it
    follows. Use as ``async with hub.open(key_id) as sub``."""

    def __init__(self, hub: Hub, key_id: str) -> None:
        self.key_id = key_id
        self.channel: str | None = None
        self._hub = hub
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=_QUEUE_SIZE)
        self._closed = False

    async def follow(self, job_id: str) -> None:
        """Subscribe to the job's events; returns once Redis has confirmed, so that whatever
        the caller reads from the store next cannot miss an event."""
        assert self.channel is None, "a subscription follows one job"
        self.channel = events_channel(job_id)
        await self._hub._follow(self, self.channel)

    async def next(self, timeout: float) -> dict[str, Any] | None:
        """The next event (``RESYNC``: re-read the job), or ``None`` after ``timeout``."""
        try:
            return await asyncio.wait_for(self._queue.get(), max(0.0, timeout))
        except TimeoutError:
            return None

    def push(self, event: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            # Too slow to keep up: drop what it has not read; the log has the status events.
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait(RESYNC)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        channel = self._hub._release(self)
        if channel is not None:
            await asyncio.shield(self._hub._unsubscribe(channel))

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
