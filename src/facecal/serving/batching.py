"""Request batching: concurrent single-face requests share one generator run.

While the model is busy, a request's item waits at most ``max_wait`` seconds for others (on
an idle model it runs at once); a batch runs as soon as it holds ``max_batch`` items. While
``max_inflight`` batches run, the next one fills up, so under load the batch size grows by
itself. The model runs on worker threads (the event loop never blocks on inference).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


class Overloaded(Exception):
    """The queue is full: the caller should answer 503 and let the client retry."""


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    max_seen: int = 0
    sizes: dict[int, int] = field(default_factory=dict)

    def add(self, n: int) -> None:
        self.batches += 1
        self.items += n
        self.max_seen = max(self.max_seen, n)
        self.sizes[n] = self.sizes.get(n, 0) + 1


class MicroBatcher:
    """Collects items submitted from coroutines into batches for ``run_batch(items) → results``
    (one result per item, same order). An exception from ``run_batch`` fails every item of
    that batch."""

    def __init__(
        self,
        run_batch: Callable[[Sequence[Any]], Sequence[Any]],
        max_batch: int,
        max_wait_s: float,
        max_queue: int = 1024,
        max_inflight: int = 1,
    ):
        if max_batch < 1 or max_inflight < 1:
            raise ValueError(
                f"max_batch and max_inflight must be ≥ 1, got {max_batch}, {max_inflight}"
            )
        self.run_batch = run_batch
        self.max_batch = int(max_batch)
        self.max_wait_s = max(0.0, float(max_wait_s))
        self.max_queue = int(max_queue)
        self.max_inflight = int(max_inflight)
        self.stats = BatchStats()
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._slots: asyncio.Semaphore | None = None
        self._running: set[asyncio.Task] = set()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            self.max_inflight, thread_name_prefix="batcher"
        )

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._slots = asyncio.Semaphore(self.max_inflight)
        self._task = asyncio.create_task(self._loop(), name="micro-batcher")

    async def stop(self) -> None:
        for task in list(self._running):
            task.cancel()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._queue is not None:
            while not self._queue.empty():
                _, fut = self._queue.get_nowait()
                if not fut.done():
                    fut.set_exception(Overloaded("server shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, item: Any) -> Any:
        if self._queue is None or self._task is None:
            raise RuntimeError("MicroBatcher.start() was not awaited")
        if self._queue.qsize() >= self.max_queue:
            raise Overloaded(f"{self._queue.qsize()} requests already queued")
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put((item, fut))
        return await fut

    async def _loop(self) -> None:
        assert self._queue is not None and self._slots is not None
        while True:
            # A batch starts collecting only when a worker is free to run it: while all are
            # busy, arrivals queue up and join the next batch.
            await self._slots.acquire()
            batch = [await self._queue.get()]
            # Waiting for company only pays when the model is busy (others are likely to come
            # before it frees up); an idle server answers a lone request at once.
            wait = self.max_wait_s if self._running else 0.0
            deadline = time.monotonic() + wait
            while len(batch) < self.max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            live = [(item, fut) for item, fut in batch if not fut.done()]  # drop cancelled
            if not live:
                self._slots.release()
                continue
            self.stats.add(len(live))
            task = asyncio.create_task(self._run(live))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, live: list) -> None:
        assert self._slots is not None
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.run_batch, [item for item, _ in live]
            )
        except Exception as e:  # noqa: BLE001 — handed to every waiting request
            for _, fut in live:
                if not fut.done():
                    fut.set_exception(e)
            return
        finally:
            self._slots.release()
        for (_, fut), result in zip(live, results):
            if not fut.done():
                fut.set_result(result)
