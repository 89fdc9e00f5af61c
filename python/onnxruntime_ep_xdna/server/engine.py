"""The one model of a server process and its bounded job queue.

Jobs run on worker threads (`workers`, default 1: one transcription at a time gets every core), never on the
event loop. At most `workers + max_queue` jobs are admitted at once; the next one is refused (QueueFull -> 429)
before its upload is read. A job is cancelled between windows (through transcribe()'s `progress` hook) when its
client goes away, its deadline passes or the server shuts down; a job still waiting is dropped without running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..whisper.transcribe import Result, Segment, TranscriptionInfo


class QueueFull(Exception):
    """Every worker is busy and the queue holds max_queue jobs."""


class ShuttingDown(Exception):
    """The server is stopping: no new work, queued work is refused."""


class Cancelled(Exception):
    """The job was cancelled (client gone, deadline passed, shutdown)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(eq=False)  # hashable by identity (the engine keeps a set of jobs)
class Job:
    path: str
    options: object  # TranscriptionOptions
    on_segment: Callable[[Segment], None] | None = None  # called on the worker thread
    cancel_reason: str | None = None
    started: float | None = None
    info: TranscriptionInfo | None = None
    _event: threading.Event = field(default_factory=threading.Event)

    def cancel(self, reason: str) -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason
        self._event.set()

    def check(self, *_):  # transcribe()'s progress hook: runs before every window
        if self._event.is_set():
            raise Cancelled(self.cancel_reason or "cancelled")


@dataclass
class Stats:
    admitted: int = 0
    completed: int = 0
    failed: int = 0  # bad audio/options found while running (the client got a 4xx)
    cancelled: int = 0
    rejected_full: int = 0
    rejected_shutdown: int = 0


class Engine:
    """Owns the loaded model; `admit()` reserves a place, `run(job)` transcribes on a worker thread."""

    def __init__(self, model, *, workers: int = 1, max_queue: int = 4):
        self.model = model  # WhisperModel
        self.workers, self.max_queue = max(1, workers), max(0, max_queue)
        self._pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="xdna-serve")
        self._lock = threading.Lock()
        self._admitted = 0  # places held: uploads in progress, jobs waiting and jobs running
        self._running = 0
        self._closing = False
        self._jobs: set[Job] = set()
        self.stats = Stats()

    # ---- admission -------------------------------------------------------------------------------------------
    def admit(self) -> "Place":
        with self._lock:
            if self._closing:
                self.stats.rejected_shutdown += 1
                raise ShuttingDown("the server is shutting down")
            if self._admitted >= self.workers + self.max_queue:
                self.stats.rejected_full += 1
                raise QueueFull(f"the server is busy: {self._running} running and {self._admitted - self._running} "
                                f"waiting (--max-queue {self.max_queue}); retry later")
            self._admitted += 1
            self.stats.admitted += 1
        return Place(self)

    def _release(self) -> None:
        with self._lock:
            self._admitted -= 1

    def snapshot(self) -> dict:
        with self._lock:
            return {"workers": self.workers, "max_queue": self.max_queue, "running": self._running,
                    "waiting": self._admitted - self._running, "closing": self._closing, **vars(self.stats)}

    # ---- running ---------------------------------------------------------------------------------------------
    async def run(self, job: Job) -> tuple[Result, float]:
        """Transcribes on a worker thread; returns (result, seconds of processing). Cancel with job.cancel()."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            self._jobs.add(job)
        try:
            return await asyncio.wrap_future(self._pool.submit(self._work, job), loop=loop)
        finally:
            with self._lock:
                self._jobs.discard(job)

    def _work(self, job: Job) -> tuple[Result, float]:
        with self._lock:
            self._running += 1
        try:
            job.check()
            if self._closing:
                raise ShuttingDown("the server is shutting down: queued work was not started")
            t0 = job.started = time.perf_counter()
            segments, info = self.model.transcribe(job.path, job.options, progress=job.check)
            job.info = info
            segs = []
            for s in segments:
                segs.append(s)
                if job.on_segment is not None:
                    job.on_segment(s)
            processing = time.perf_counter() - t0
            info.timings["total_s"] = processing
            result = Result("".join(s.text for s in segs).strip(), segs, info.language, info.timings, info.duration)
            with self._lock:
                self.stats.completed += 1
            return result, processing
        except Cancelled:
            with self._lock:
                self.stats.cancelled += 1
            raise
        except ShuttingDown:
            with self._lock:
                self.stats.rejected_shutdown += 1
            raise
        except Exception:
            with self._lock:
                self.stats.failed += 1
            raise
        finally:
            with self._lock:
                self._running -= 1

    def begin_shutdown(self) -> None:
        """No new jobs; jobs not yet started are refused when their turn comes; running ones finish."""
        with self._lock:
            self._closing = True

    def cancel_all(self, reason: str = "the server is shutting down") -> None:
        with self._lock:
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel(reason)

    def close(self) -> None:
        self.begin_shutdown()
        self._pool.shutdown(wait=True, cancel_futures=False)


class Place:
    """A held place in the queue (released exactly once, also on errors)."""

    def __init__(self, engine: Engine):
        self._engine, self._held = engine, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._engine._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
