"""Micro-batching: concurrent requests are collected for a few milliseconds and run as one batch in one thread.

Every request ``await``s :meth:`MicroBatcher.submit`; one collector task takes the first waiting item, then
whatever else arrives within ``max_wait_ms`` (up to ``max_batch`` items), and hands the list to ``fn`` on the
model's single worker thread. ``fn`` returns one result per item, an exception standing for that item's failure,
so one bad upload never fails its batch-mates. ``max_batch=1`` turns batching off (one request per call, the same
thread), which is what the benchmark compares against.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any, Generic, TypeVar

from medvlp.serve.errors import ApiError

logger = logging.getLogger(__name__)

__all__ = ["MicroBatcher"]

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    """Collects submitted items into batches for ``fn``.

    Args:
        fn: ``fn(items) -> results``, one result (or exception instance) per item, in order; runs on ``executor``.
        executor: where ``fn`` runs (a one-thread pool: the model is used from one thread only).
        max_batch: most items per call; 1 disables batching.
        max_wait_ms: how long the first item of a batch waits for company.
        max_queue: most items waiting; beyond it :meth:`submit` answers 429.
        name: for the log.
    """

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R | BaseException]],
        executor: Executor,
        max_batch: int = 16,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        name: str = "batch",
    ) -> None:
        if max_batch < 1 or max_wait_ms < 0 or max_queue < 1:
            raise ValueError(
                f"max_batch {max_batch}, max_wait_ms {max_wait_ms}, max_queue {max_queue} must be >= 1/0/1"
            )
        self.fn, self.executor, self.name = fn, executor, name
        self.max_batch, self.max_wait = int(max_batch), float(max_wait_ms) / 1000.0
        self.max_queue = int(max_queue)
        self.batch_sizes: Counter[int] = Counter()  # size -> how many batches of that size ran
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.max_batch > 1

    def start(self) -> None:
        """Start the collector on the running event loop."""
        if self._task is None:
            self._queue = asyncio.Queue(maxsize=self.max_queue)
            self._task = asyncio.get_running_loop().create_task(self._collect(), name=f"medvlp-{self.name}")

    async def stop(self) -> None:
        """Stop collecting; items still waiting fail with 503."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._queue is not None and not self._queue.empty():
            _, fut = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(ApiError(503, "shutting_down", "the server is shutting down"))

    async def submit(self, item: T) -> tuple[R, int]:
        """Queue ``item`` and wait for its result.

        Returns:
            The result and the size of the batch it ran in.

        Raises:
            The exception ``fn`` returned for this item; ApiError 429 when the queue is full.
        """
        if self._queue is None:
            raise RuntimeError(f"{self.name} batcher not started")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((item, fut))
        except asyncio.QueueFull as exc:
            raise ApiError(429, "busy", f"{self.max_queue} requests already waiting; retry later") from exc
        return await fut

    async def _next_batch(self) -> list[tuple[T, asyncio.Future[Any]]]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())  # what is already waiting joins at once
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except TimeoutError:
                break
        return batch

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            live = [(item, fut) for item, fut in batch if not fut.done()]  # a cancelled request drops out
            if not live:
                continue
            size = len(live)
            self.batch_sizes[size] += 1
            try:
                results = await loop.run_in_executor(self.executor, self.fn, [item for item, _ in live])
                if len(results) != size:
                    raise RuntimeError(f"{self.name}: {len(results)} results for {size} items")
            except Exception as exc:  # the whole call failed: every item of it gets the error
                logger.error("%s batch of %d failed: %s", self.name, size, type(exc).__name__)
                results = [exc] * size
            for (_, fut), res in zip(live, results, strict=True):
                if fut.done():
                    continue
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result((res, size))
