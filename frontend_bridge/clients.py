"""One websocket connection's view of the hub: its bounded queue, its slow-client policy and its backfill."""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
from collections import deque
from typing import TYPE_CHECKING

from . import wire
from .run_state import RunState
from .wire import WireFormat

if TYPE_CHECKING:
    from .hub import Hub

logger = logging.getLogger(__name__)

WS_CLOSE_TRY_AGAIN_LATER = 1013
WS_CLOSE_GOING_AWAY = 1001


class SlowClientPolicy(enum.Enum):
    DROP_OLDEST = "drop_oldest"
    DISCONNECT = "disconnect"


class ClientState(enum.Enum):
    BACKFILL = "backfill"
    LIVE = "live"
    CLOSED = "closed"


class ClientClosed(Exception):
    """The hub closed this client (slow, or shutting down); the endpoint closes the socket with `code`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


Payload = str | bytes


class Client:
    """One websocket connection's view of the hub: its bounded queue and, while joining, its backfill."""

    _ids = itertools.count(1)

    def __init__(
        self,
        hub: Hub,
        endpoint: str,
        fmt: WireFormat,
        policy: SlowClientPolicy,
        max_queue: int,
        backfill_chunk: int,
    ) -> None:
        self.id = next(self._ids)
        self.endpoint = endpoint
        self.fmt = fmt
        self.policy = policy
        self.max_queue = max_queue
        self.state = ClientState.LIVE
        self.queue: deque[Payload] = deque()
        self.sent = 0
        self._hub = hub
        self._wakeup = asyncio.Event()
        self._closed = asyncio.Event()
        self._close: ClientClosed | None = None
        self._backfill_chunk = backfill_chunk
        self._bf_run: RunState | None = None
        self._bf_cursor = 0
        self._bf_sent = 0
        self._bf_skipped = 0

    def __repr__(self) -> str:
        return f"Client(id={self.id}, endpoint={self.endpoint}, state={self.state.value})"

    # -- called by the hub (synchronously, on the loop) ---------------------------------------

    def start_backfill(self, run: RunState) -> None:
        self.state = ClientState.BACKFILL
        self._bf_run = run
        self._bf_cursor = run.store.first_seq if run.store is not None else 0

    def backfilling(self, run_id: str) -> bool:
        return (
            self.state is ClientState.BACKFILL and self._bf_run is not None and self._bf_run.run_id == run_id
        )

    def offer(self, payload: Payload) -> None:
        """Queue one payload without waiting; applies the slow-client policy when the queue is full."""
        if self.state is ClientState.CLOSED:
            return
        if len(self.queue) >= self.max_queue:
            if self.policy is SlowClientPolicy.DROP_OLDEST:
                self.queue.popleft()
                self._hub.count_drop("lse_slow_client")
            else:
                self._hub.count_drop("ws_slow_client")
                logger.warning("closing slow client %r: %d messages queued", self, len(self.queue))
                self.close(WS_CLOSE_TRY_AGAIN_LATER, "client too slow; reconnect")
                return
        self.queue.append(payload)
        self._wakeup.set()

    def close(self, code: int, reason: str) -> None:
        if self.state is ClientState.CLOSED:
            return
        self.state = ClientState.CLOSED
        self.queue.clear()
        self._bf_run = None
        self._close = ClientClosed(code, reason)
        self._wakeup.set()
        self._closed.set()

    @property
    def close_reason(self) -> ClientClosed | None:
        """Why the hub closed this client, or None while it is open."""
        return self._close

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # -- called by the connection's sender ----------------------------------------------------

    async def next_batch(self, max_items: int = 256) -> list[Payload]:
        """The next payloads to send, in order; waits while there is nothing.

        Raises `ClientClosed` once the hub closed this client.
        """
        while True:
            if self._close is not None:
                raise self._close
            if self.queue:
                n = min(len(self.queue), max_items)
                batch = [self.queue.popleft() for _ in range(n)]
                self.sent += n
                return batch
            if self.state is ClientState.BACKFILL:
                batch = self._backfill_batch()
                if batch:
                    self.sent += len(batch)
                    return batch
                continue  # caught up: the state is LIVE now and the queue holds the tail events
            self._wakeup.clear()
            await self._wakeup.wait()

    def _backfill_batch(self) -> list[Payload]:
        run = self._bf_run
        assert run is not None
        store = run.store
        if store is None:  # released while we were sending: the rest is only in the run catalog
            self._bf_skipped += max(run.points - self._bf_cursor, 0)
        else:
            if self._bf_cursor < store.first_seq:  # evicted while we were sending
                self._bf_skipped += store.first_seq - self._bf_cursor
                self._bf_cursor = store.first_seq
            rows = store.rows(self._bf_cursor, self._bf_cursor + self._backfill_chunk)
            if rows:
                self._bf_cursor += len(rows)
                self._bf_sent += len(rows)
                return [self._hub.encode_point_row(run.ctx, row, self.fmt) for row in rows]
        self._finish_backfill(run)
        return []

    def _finish_backfill(self, run: RunState) -> None:
        # Synchronous with the last store read, so no point published meanwhile is missed.
        tail: list[Payload] = []
        if self.fmt is not WireFormat.LSE_JSON:
            tail.append(
                wire.encode(wire.backfill_end_event(run.run_id, self._bf_sent, self._bf_skipped), self.fmt)
            )
            if run.stop_event is not None:
                tail.append(wire.encode(run.stop_event, self.fmt))
        self.queue.extendleft(reversed(tail))  # before anything queued while backfilling
        self.state = ClientState.LIVE
        self._bf_run = None
        logger.debug("client %r backfilled %d points of run %s", self, self._bf_sent, run.run_id)
