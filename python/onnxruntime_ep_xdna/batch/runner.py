"""The driver of a batch: which inputs are left, who transcribes what, results written once, the index, progress.

Engines (engines.py: in-process and local processes; ray_engine.py: Ray actors) only move inputs to workers and
results back; they call `next_job`, `finished` (a worker's answer) and `worker_died` (the worker vanished while it
had the job: the job is tried again, at most `retries` more times) and `tick` while they wait.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import jobs as J
from .worker import WorkerConfig

EXIT_OK, EXIT_CONFIG, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 130


@dataclass
class Summary:
    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    pending: int = 0
    retries: int = 0  # worker deaths absorbed by a retry
    audio_s: float = 0.0  # audio transcribed in this run
    wall_s: float = 0.0
    exit_code: int = EXIT_OK
    ready_s: float | None = None  # from the start until the first worker had its model loaded
    busy_s: float = 0.0  # seconds workers spent on inputs (their own clocks), this run
    message: str = ""  # why the batch stopped early (exit code 1 or 130)
    statuses: dict = field(default_factory=dict)  # input -> status


def _hms(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """One line on stderr: audio done / total audio, files, failures, ETA from the audio rate so far."""

    def __init__(self, stream=sys.stderr, enabled: bool = True):
        self.stream, self.enabled, self._last, self._shown = stream, enabled, "", False

    def show(self, done_s: float, total_s: float, files_done: int, files_total: int, failed: int,
             elapsed: float, unknown: int) -> None:
        if not self.enabled:
            return
        frac = min(1.0, done_s / total_s) if total_s > 0 else (files_done / files_total if files_total else 1.0)
        eta = elapsed * (1 - frac) / frac if frac > 0 else None
        bar = "#" * int(frac * 30)
        extra = f", {unknown} of unknown length" if unknown else ""
        line = (f"\r[{bar:.<30}] {frac * 100:5.1f}% audio {_hms(done_s)}/{_hms(total_s)}, files {files_done}/"
                f"{files_total}, failed {failed}{extra}, ETA {_hms(eta)} ")
        if line != self._last:
            self.stream.write(line)
            self.stream.flush()
            self._last, self._shown = line, True

    def close(self) -> None:
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False


class BatchRunner:
    def __init__(self, jobs: list[J.Job], out_dir: str | Path, config: WorkerConfig, *, force: bool = False,
                 retries: int = 2, progress: bool = False, log: Callable[[str], None] | None = None,
                 index_every_s: float = 2.0):
        self.jobs, self.out_dir, self.config = jobs, Path(out_dir), config
        self.force, self.retries = force, max(0, int(retries))
        self.log = log or (lambda m: print(m, file=sys.stderr))
        self.progress = Progress(enabled=progress)
        self.status: dict[int, str] = {}
        self.queue: deque[J.Job] = deque()
        self.summary = Summary(total=len(jobs))
        self.index_every_s = index_every_s
        self._index_at = 0.0
        self._t0 = time.monotonic()
        self._done_audio = 0.0
        self._dirty = True
        self._plan()

    # -- planning --------------------------------------------------------------------------------------------
    def _plan(self) -> None:
        from .worker import config_key

        self.config_key = config_key(self.config)
        redone = 0
        for job in self.jobs:
            job.stat = J.local_stat(job.source)
            if job.error:
                self.status[job.index] = "failed"
                self.log(f"xdna batch: {job.source}: failed: {job.error}")
                continue
            rec = None if self.force else J.completed_record(self.out_dir, job, self.config.formats)
            if rec is not None and rec.get("config") != self.config_key:
                redone += 1  # made with another model, other options or precision (or not recorded): redo it
                rec = None
            if rec is not None:
                job.record = rec
                self.status[job.index] = "skipped"
                continue
            job.duration = _probe_duration(job.source)
            self.status[job.index] = "pending"
            self.queue.append(job)
        if redone:
            self.log(f"xdna batch: {redone} input{'s' if redone > 1 else ''} complete from an earlier run with another "
                     "model, other decoding options or another precision (or from a version that did not record "
                     "them): transcribed again")
        self.total_audio = sum(j.duration or 0.0 for j in self.queue)
        self.unknown_length = sum(1 for j in self.queue if j.duration is None)
        self.write_index()  # from the start: what this run will do (all pending), even if it is killed early

    @property
    def to_do(self) -> int:
        return len(self.queue)

    # -- engine callbacks ------------------------------------------------------------------------------------
    def next_job(self) -> J.Job | None:
        if not self.queue:
            return None
        job = self.queue.popleft()
        job.attempts += 1
        self.status[job.index] = "running"
        return job

    def worker_ready(self) -> None:
        if self.summary.ready_s is None:
            self.summary.ready_s = time.monotonic() - self._t0

    def finished(self, job: J.Job, result: dict) -> None:
        self._dirty = True
        self.summary.busy_s += float(result.get("time") or 0.0)
        if self.status.get(job.index) in ("done", "failed"):
            return  # a late duplicate answer: the first one won, nothing is written twice
        if result.get("ok"):
            meta = {k: result.get(k) for k in ("duration", "language", "time", "provider", "host")}
            meta["config"] = self.config_key  # what made the outputs: a re-run with another one redoes them
            try:
                job.record = J.commit(self.out_dir, job, result["rendered"], meta)
            except OSError as e:
                self._fail(job, f"cannot write its outputs under {self.out_dir} ({e.strerror or e})")
            else:
                self.status[job.index] = "done"
                self.summary.audio_s += float(result.get("duration") or 0.0)
        else:
            self._fail(job, result.get("error") or "failed")
        self._done_audio += float(job.duration or result.get("duration") or 0.0)
        self.tick()

    def worker_died(self, job: J.Job, reason: str) -> None:
        """The worker holding `job` is gone (killed, crashed, its node lost): retry the job or, after `retries`
        retries, record it failed."""
        if self.status.get(job.index) in ("done", "failed"):
            return
        self._dirty = True
        if job.attempts <= self.retries:
            self.summary.retries += 1
            self.log(f"xdna batch: worker died while transcribing {job.source} ({reason}); retrying it "
                     f"({job.attempts}/{self.retries})")
            self.status[job.index] = "pending"
            self.queue.appendleft(job)
        else:
            self._fail(job, f"the worker died while transcribing it, {job.attempts} times (last: {reason})")
            self._done_audio += float(job.duration or 0.0)
        self.tick()

    def _fail(self, job: J.Job, error: str) -> None:
        job.error = error
        self.status[job.index] = "failed"
        self.progress.close()
        self.log(f"xdna batch: {job.source}: failed: {error}")

    def tick(self, force_index: bool = False) -> None:
        now = time.monotonic()
        s = self.status.values()
        finished = sum(1 for x in s if x in ("done", "failed"))
        failed = sum(1 for x in s if x == "failed")
        todo_total = sum(1 for j in self.jobs if self.status[j.index] != "skipped")
        self.progress.show(self._done_audio, self.total_audio, finished, todo_total, failed, now - self._t0,
                           self.unknown_length)
        # Small batches: the index after every change; large ones: at most every index_every_s (a rewrite costs
        # a line per input). The completion records, not the index, decide what a re-run skips.
        if force_index or (self._dirty and (len(self.jobs) <= 500 or now - self._index_at >= self.index_every_s)):
            self.write_index()

    def write_index(self) -> None:
        lines = []
        for job in self.jobs:
            st = self.status[job.index]
            lines.append(J.index_line(job, "pending" if st == "running" else st))
        try:
            J.write_index(self.out_dir, lines)
        except OSError as e:
            self.log(f"xdna batch: cannot write {self.out_dir / J.INDEX} ({e.strerror or e})")
        self._index_at = time.monotonic()
        self._dirty = False

    def finish(self, exit_code: int | None = None, message: str = "") -> Summary:
        self.progress.close()
        self.write_index()
        s = self.summary
        for job in self.jobs:
            st = self.status[job.index]
            s.statuses[job.source] = "pending" if st == "running" else st
        vals = list(s.statuses.values())
        s.done, s.skipped = vals.count("done"), vals.count("skipped")
        s.failed, s.pending = vals.count("failed"), vals.count("pending")
        s.wall_s = time.monotonic() - self._t0
        if exit_code is None:
            exit_code = EXIT_FAILED if s.failed else (EXIT_OK if not s.pending else EXIT_CONFIG)
        s.exit_code, s.message = exit_code, message
        return s


def _probe_duration(source: str) -> float | None:
    """Seconds of audio from the file's header when libsndfile reads it (progress and ETA only; cheap: thousands of
    inputs are probed before the start). Other formats (m4a, ...) count as of unknown length."""
    if J.is_uri(source):
        return None
    try:
        import soundfile as sf

        info = sf.info(source)
        return info.frames / info.samplerate if 0 <= info.frames < 2**62 and info.samplerate > 0 else None
    except Exception:
        return None
