"""Group commit: the request path hands its writes to one thread and never waits on a
database round trip per request.

Writes queue up while the previous batch commits, so under load each transaction carries
many of them (one fsync for all). A caller that must not answer before its write is
durable (feedback, the end of an experiment response) awaits the write's future; the
others (outcomes) do not. Failed transactions are retried; a batch that still fails
fails every future in it, so nothing is acknowledged that was not committed.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any

from sqlalchemy.exc import DBAPIError, OperationalError

from .store import ExperimentStore, Write

log = logging.getLogger(__name__)

MAX_BATCH = 1000
RETRY_DELAYS = (0.05, 0.25, 1.0, 3.0)  # then the batch's callers get the error
_STOP = object()


class WriterClosed(RuntimeError):
    pass


class BatchWriter:
    def __init__(self, store: ExperimentStore, max_batch: int = MAX_BATCH):
        self.store = store
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self.batches = 0  # committed transactions (tests and logs read it)
        self.written = 0
        self._thread = threading.Thread(target=self._run, name="steerserve-writer", daemon=True)
        self._thread.start()

    def submit(self, item: Write) -> Future:
        if self._closed:
            raise WriterClosed("the experiment store is closed")
        fut: Future = Future()
        self._queue.put((item, fut))
        return fut

    async def write(self, item: Write) -> Any:
        """Submit and wait until committed; the result of `store.write_batch` for it."""
        return await asyncio.wrap_future(self.submit(item))

    def close(self, timeout: float = 30.0) -> None:
        """Commit what is queued, then stop."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join(timeout)

    def _run(self) -> None:
        stop = False
        while not stop:
            batch = [self._queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if any(b is _STOP for b in batch):
                stop = True
                batch = [b for b in batch if b is not _STOP]
            if batch:
                self._commit(batch)

    def _commit(self, batch: list[tuple[Write, Future]]) -> None:
        items = [item for item, _ in batch]
        for attempt, delay in enumerate((*RETRY_DELAYS, None)):
            try:
                results = self.store.write_batch(items)
                break
            except (OperationalError, DBAPIError) as e:  # lost connection, lock timeout
                if delay is None:
                    log.error("experiment store: %d writes failed: %s", len(items), e)
                    for _, fut in batch:
                        fut.set_exception(e)
                    return
                log.warning("experiment store: write failed (attempt %d): %s", attempt + 1, e)
                time.sleep(delay)
            except Exception as e:  # a bug: fail the callers, keep the thread alive
                log.exception("experiment store: batch of %d writes failed", len(items))
                for _, fut in batch:
                    fut.set_exception(e)
                return
        self.batches += 1
        self.written += len(items)
        for (_, fut), result in zip(batch, results, strict=True):
            fut.set_result(result)
