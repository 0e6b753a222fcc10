"""The server's second thread: replies taken in and checkpoints written while clients train.

A round's client calls and the server's own work on their replies are independent until the round's
end, so the loop hands the server's work to one background thread, in order: `take` of reply i runs
while client i+1 trains, and the checkpoint of round t is written while round t+1's first client
trains (its takes queue behind the write). One thread, first in first out: the server's state
changes in the same order as with no thread at all, so results are bit for bit the same.

At most `depth` tasks wait at a time (a submit blocks until one ends), so the replies held in
memory stay a small constant whatever the cohort. SIGINT is blocked on the thread, as on the
in-process backend's worker, so Ctrl-C always reaches the main thread; `close` then lets the task
in flight end (tasks are short: one reply's decode, one checkpoint) before the interrupt goes on.
"""

from __future__ import annotations

import signal
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

#: tasks that may wait at a time: the previous round's checkpoint, the round's begin and two replies
#: (with fewer, the replies that arrive while a checkpoint is written would hold up the next client)
DEPTH = 4


def _block_sigint() -> None:
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


class Lane:
    """One background thread that runs the server's tasks in submission order."""

    def __init__(self, depth: int = DEPTH) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fedsqueeze-server", initializer=_block_sigint)
        self._room = threading.BoundedSemaphore(depth)
        self._pending: deque[Future[Any]] = deque()

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run fn(*args) after every task submitted before it; its outcome (or exception) is the Future's."""
        self._room.acquire()
        try:
            future = self._pool.submit(fn, *args)
        except BaseException:
            self._room.release()
            raise
        future.add_done_callback(lambda _: self._room.release())
        self._pending.append(future)
        while self._pending and self._pending[0].done():
            self._pending.popleft()
        return future

    def drain(self) -> None:
        """Wait for every task submitted so far; raises the first exception a task raised and nobody took."""
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        """Wait for the tasks submitted so far (whatever they raise) and end the thread."""
        self._pool.shutdown(wait=True)
        self._pending.clear()

    def __enter__(self) -> Lane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
