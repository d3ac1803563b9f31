"""Micro-batching on a real event loop and a real worker thread."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from medvlp.serve.batching import MicroBatcher
from medvlp.serve.errors import ApiError


class Recorder:
    """``fn`` for the batcher: doubles numbers, fails on negatives, remembers its calls and threads."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[list[int]] = []
        self.threads: set[str] = set()
        self.delay = delay

    def __call__(self, items: list[int]) -> list[int | BaseException]:
        self.calls.append(list(items))
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        return [ValueError(f"negative {i}") if i < 0 else 2 * i for i in items]


def _run(batcher: MicroBatcher, items: list[int], stagger: float = 0.0) -> list[object]:
    async def main() -> list[object]:
        batcher.start()

        async def one(i: int, k: int) -> object:
            await asyncio.sleep(stagger * k)
            try:
                return await batcher.submit(i)
            except Exception as exc:
                return exc

        try:
            return await asyncio.gather(*(one(i, k) for k, i in enumerate(items)))
        finally:
            await batcher.stop()

    return asyncio.run(main())


def test_concurrent_items_share_one_call_in_one_thread() -> None:
    fn = Recorder()
    with ThreadPoolExecutor(1, thread_name_prefix="model") as pool:
        out = _run(MicroBatcher(fn, pool, max_batch=16, max_wait_ms=50), list(range(8)))
    assert out == [(2 * i, 8) for i in range(8)]
    assert fn.calls == [list(range(8))]
    assert len(fn.threads) == 1 and next(iter(fn.threads)).startswith("model")


def test_batches_respect_max_batch_and_late_items_wait_for_the_next() -> None:
    fn = Recorder(delay=0.05)
    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher(fn, pool, max_batch=3, max_wait_ms=5)
        out = _run(batcher, list(range(10)))
    assert sorted(r[0] for r in out) == [2 * i for i in range(10)]
    assert all(len(c) <= 3 for c in fn.calls) and sum(map(len, fn.calls)) == 10
    assert max(batcher.batch_sizes) == 3


def test_one_bad_item_fails_alone() -> None:
    fn = Recorder()
    with ThreadPoolExecutor(1) as pool:
        out = _run(MicroBatcher(fn, pool, max_batch=8, max_wait_ms=50), [1, -1, 2])
    assert out[0] == (2, 3) and out[2] == (4, 3)
    assert isinstance(out[1], ValueError)


def test_max_batch_one_turns_batching_off() -> None:
    fn = Recorder()
    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher(fn, pool, max_batch=1, max_wait_ms=0)
        out = _run(batcher, list(range(6)))
    assert not batcher.enabled
    assert [r[1] for r in out] == [1] * 6 and fn.calls == [[i] for i in range(6)]


def test_a_full_queue_answers_429() -> None:
    fn = Recorder(delay=0.2)
    with ThreadPoolExecutor(1) as pool:
        out = _run(MicroBatcher(fn, pool, max_batch=1, max_wait_ms=0, max_queue=2), list(range(6)))
    busy = [r for r in out if isinstance(r, ApiError)]
    assert busy and all(e.status == 429 and e.code == "busy" for e in busy)
    assert any(isinstance(r, tuple) for r in out)


def test_bad_settings_raise() -> None:
    with ThreadPoolExecutor(1) as pool, pytest.raises(ValueError, match="max_batch 0"):
        MicroBatcher(Recorder(), pool, max_batch=0)
