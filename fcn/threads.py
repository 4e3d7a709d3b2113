"""Bounded read-ahead and write-behind with threads.

PNG decoding and encoding release the GIL, so a few threads keep the model (or the metric) busy
while files are read and written. Both helpers hold at most a fixed number of items in flight:
inference never keeps all predictions in memory, whatever the dataset size.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def read_ahead(load: Callable[[T], R], items: Iterable[T], workers: int = 2,
               depth: int | None = None) -> Iterator[tuple[T, R]]:
    """Yield (item, load(item)) in order, loading up to `depth` items ahead in `workers` threads.

    workers <= 1 loads inline (no threads), which is what a timing of the bare work wants.
    An exception in `load` is raised when its item's turn comes, so errors name the right file.
    """
    if workers <= 1:
        for item in items:
            yield item, load(item)
        return
    depth = depth or 2 * workers
    pending: deque[tuple[T, Future[R]]] = deque()
    iterator = iter(items)
    with ThreadPoolExecutor(workers, thread_name_prefix="read") as pool:
        try:
            for item in iterator:
                pending.append((item, pool.submit(load, item)))
                if len(pending) >= depth:
                    head, future = pending.popleft()
                    yield head, future.result()
            while pending:
                head, future = pending.popleft()
                yield head, future.result()
        finally:
            for _, future in pending:
                future.cancel()


class WriteBehind:
    """Run writes in background threads, at most `depth` queued; `close()` waits and re-raises.

    Use as a context manager: leaving the block waits for every write, and the first failed
    write's exception propagates (after the others finished, so no write is cut off midway).
    """

    def __init__(self, workers: int = 2, depth: int | None = None) -> None:
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="write")
        self._depth = depth or 2 * max(1, workers)
        self._pending: deque[Future[None]] = deque()

    def submit(self, write: Callable[..., None], *args: object) -> None:
        while len(self._pending) >= self._depth:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(write, *args))

    def close(self) -> None:
        error: BaseException | None = None
        while self._pending:
            try:
                self._pending.popleft().result()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the rest
                error = error or exc
        self._pool.shutdown()
        if error is not None:
            raise error

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if exc_info[0] is not None:  # the block failed: let queued writes finish, keep its error
            try:
                self.close()
            except BaseException:  # noqa: BLE001
                pass
            return
        self.close()
