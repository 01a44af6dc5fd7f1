"""The thread pool: native workers for the math, one ordered queue of tasks in front of them."""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from . import _core


def default_num_threads() -> int:
    """``KTSFT_NUM_THREADS`` if set, else the CPUs this process may run on."""
    env = os.environ.get("KTSFT_NUM_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"KTSFT_NUM_THREADS must be a positive integer, got {env!r}") from None
        if n < 1:
            raise ValueError(f"KTSFT_NUM_THREADS must be a positive integer, got {env!r}")
        return n
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


DEFAULT_SPIN_US = 100.0


def default_spin_us() -> float:
    """``KTSFT_SPIN_US`` if set, else 100 microseconds."""
    env = os.environ.get("KTSFT_SPIN_US", "").strip()
    if not env:
        return DEFAULT_SPIN_US
    try:
        return _checked_spin_us(float(env))
    except ValueError:
        raise ValueError(
            f"KTSFT_SPIN_US must be a non-negative number of microseconds, got {env!r}"
        ) from None


def _checked_spin_us(spin_us: Any) -> float:
    if isinstance(spin_us, bool) or not isinstance(spin_us, (int, float)):
        raise TypeError(f"spin_us must be a number, got {type(spin_us).__name__}")
    if not 0 <= spin_us <= 1e6:
        raise ValueError(f"spin_us must be in [0, 1e6] microseconds, got {spin_us}")
    return float(spin_us)


class ThreadPool:
    """Native worker threads that run ktsft's tasks, in submission order.

    Each task is spread over all ``num_threads`` threads. :meth:`submit` returns at once;
    :meth:`sync` waits for every submitted task and re-raises the first error. The pool stays
    usable after an error. :meth:`run` (and so ``MoESFT.forward`` and ``backward``) waits for
    its task, which runs on the calling thread when nothing is queued.

    Parameters
    ----------
    num_threads : int, optional
        Threads doing the math. Default: ``KTSFT_NUM_THREADS``, else the CPUs this process may
        use.
    spin_us : float, optional
        How long a waiting thread spins before it sleeps, in microseconds: a worker between
        the phases of a call (a dozen per forward and backward), and the calling thread for the
        workers at the end of one. Waking a sleeping thread costs tens of microseconds, which
        adds up at a few tokens per call; spinning costs CPU time that other work on the same
        cores could have had. 0 sleeps at once. Default: ``KTSFT_SPIN_US``, else 100.
    """

    def __init__(self, num_threads: int | None = None, spin_us: float | None = None):
        if num_threads is None:
            num_threads = default_num_threads()
        if isinstance(num_threads, bool) or not isinstance(num_threads, int):
            raise TypeError(f"num_threads must be an int, got {type(num_threads).__name__}")
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        spin_us = default_spin_us() if spin_us is None else _checked_spin_us(spin_us)
        self._native = _core.Pool(num_threads)
        self.spin_us = spin_us
        # One dispatcher thread keeps tasks in order; the C calls it makes release the GIL.
        self._queue = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ktsft")
        self._lock = threading.Lock()
        self._pending: list[Future] = []
        # Held by whichever thread runs a task on the native threads: the dispatcher, or a
        # caller of run() that found nothing queued.
        self._running = threading.Lock()
        self._closed = False

    @property
    def num_threads(self) -> int:
        """Threads doing the math: the one that runs a task (the dispatcher, or a caller of
        :meth:`run`) plus ``num_threads - 1`` workers."""
        return self._native.num_threads

    @property
    def spin_us(self) -> float:
        """Microseconds a waiting thread spins before it sleeps (settable; see the class)."""
        return self._spin_us

    @spin_us.setter
    def spin_us(self, value: float) -> None:
        self._spin_us = _checked_spin_us(value)
        self._native.set_spin(round(self._spin_us * 1000))

    def submit(self, task: Callable[[], Any]) -> Future:
        """Queues ``task()``; returns a future of its result at once."""
        future = self._queue.submit(self._run_task, task)
        with self._lock:
            # Finished tasks without an error need no tracking: keep only what sync() reports.
            self._pending = [f for f in self._pending if not f.done() or f.exception()]
            self._pending.append(future)
        return future

    def sync(self) -> None:
        """Waits for every task submitted so far; raises the first error among them."""
        with self._lock:
            pending, self._pending = self._pending, []
        first = None
        for future in pending:
            error = future.exception()
            if error is not None and first is None:
                first = error
        if first is not None:
            raise first

    def run(self, task: Callable[[], Any]) -> Any:
        """Runs ``task`` in order after everything already submitted and returns its result.

        With nothing queued it runs on the calling thread, which then does the dispatcher's
        share of the math: no hand-off to the dispatcher and back (two thread wake-ups, tens
        of microseconds each, per call). A task submitted meanwhile waits for it.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot run a task on a closed ThreadPool")
            here = all(f.done() for f in self._pending) and self._running.acquire(blocking=False)
        if not here:
            return self._run_queued(task)
        try:
            return task()
        finally:
            self._running.release()

    def _run_queued(self, task: Callable[[], Any]) -> Any:
        # Through the dispatcher, behind what is queued; the caller waits for the result.
        future = self.submit(task)
        try:
            return future.result()
        finally:
            self._forget(future)

    def _run_task(self, task: Callable[[], Any]) -> Any:
        with self._running:
            return task()

    def _forget(self, future: Future) -> None:
        # A future whose result the caller collected itself: sync() does not re-raise it.
        with self._lock:
            if future in self._pending:
                self._pending.remove(future)

    def close(self) -> None:
        """Waits for the queued tasks and stops the dispatcher."""
        with self._lock:
            self._closed = True
        self._queue.shutdown(wait=True)

    def __enter__(self) -> ThreadPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ktsft.ThreadPool(num_threads={self.num_threads})"
