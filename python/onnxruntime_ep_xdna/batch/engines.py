"""The local engine: one model in this process (inputs in order), or N worker processes on this machine, each
with its own model, one input at a time. A worker process that dies (killed, crashed) costs a retry of the input
it held (runner.worker_died) and is replaced; the others go on."""

from __future__ import annotations

import multiprocessing as mp
import time
from multiprocessing.connection import wait

from .runner import EXIT_CONFIG, EXIT_INTERRUPTED, BatchRunner, Summary
from .worker import ConfigError, Worker, WorkerConfig


def run_inline(runner: BatchRunner) -> Summary:
    if not runner.to_do:
        return runner.finish()
    try:
        worker = Worker(runner.config)
    except ConfigError as e:
        return runner.finish(EXIT_CONFIG, str(e))
    runner.worker_ready()
    try:
        while (job := runner.next_job()) is not None:
            runner.finished(job, worker.run(job.source))
    except KeyboardInterrupt:
        return runner.finish(EXIT_INTERRUPTED, "interrupted")
    return runner.finish()


def _child(conn, config: WorkerConfig) -> None:
    """A worker process: ("ready", None) or ("config", message) once, then one answer per source received."""
    try:
        worker = Worker(config)
    except ConfigError as e:
        conn.send(("config", str(e)))
        return
    except BaseException as e:  # noqa: BLE001 - reported, the driver decides
        conn.send(("config", f"worker could not start ({type(e).__name__}: {e})"))
        return
    conn.send(("ready", None))
    while True:
        try:
            source = conn.recv()
        except (EOFError, OSError):
            return
        if source is None:
            return
        conn.send(("result", worker.run(source)))


class _Proc:
    def __init__(self, ctx, config: WorkerConfig):
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=_child, args=(child_conn, config), daemon=True)
        self.proc.start()
        child_conn.close()
        self.job = None
        self.ready = False
        self.started = time.monotonic()

    def stop(self, timeout: float = 5.0) -> None:
        try:
            if self.proc.is_alive():
                self.conn.send(None)
        except OSError:
            pass
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout)
        self.conn.close()


def run_processes(runner: BatchRunner, workers: int, start_timeout: float = 600.0) -> Summary:
    if not runner.to_do:
        return runner.finish()
    ctx = mp.get_context("spawn")  # a fresh interpreter per worker: no inherited ORT threads or locks
    n = max(1, min(workers, runner.to_do))
    procs = [_Proc(ctx, runner.config) for _ in range(n)]
    max_starts = 3 * n + runner.to_do  # every death is a retry or a failure; never restart forever
    starts = n
    try:
        while True:
            for p in procs:
                if p.ready and p.job is None:
                    p.job = runner.next_job()
                    if p.job is not None:
                        p.conn.send(p.job.source)
            if not runner.queue and all(p.job is None for p in procs):
                break
            objs = {}
            for p in procs:
                objs[p.conn] = p
                objs[p.proc.sentinel] = p
            for obj in wait(list(objs), timeout=0.5):
                p = objs[obj]
                if p not in procs:
                    continue
                msg = None
                if obj is p.conn:
                    try:
                        msg = p.conn.recv()
                    except (EOFError, OSError):
                        msg = None
                if msg is not None:
                    kind, payload = msg
                    if kind == "config":
                        return runner.finish(EXIT_CONFIG, payload)
                    if kind == "ready":
                        p.ready = True
                        runner.worker_ready()
                    elif kind == "result" and p.job is not None:
                        job, p.job = p.job, None
                        runner.finished(job, payload)
                    continue
                if p.proc.is_alive() and obj is p.conn:
                    p.proc.join(1.0)
                # The process is gone: its job (if any) is retried, it is replaced while inputs remain.
                code = p.proc.exitcode
                job = p.job
                p.job = None
                p.stop(1.0)
                procs.remove(p)
                reason = f"worker process exited with {'signal ' + str(-code) if code and code < 0 else code}"
                if job is not None:
                    runner.worker_died(job, reason)
                elif not p.ready:
                    runner.log(f"xdna batch: a worker process died while starting ({reason})")
                if runner.queue or any(q.job for q in procs):
                    if starts >= max_starts:
                        return runner.finish(EXIT_CONFIG, f"worker processes keep dying ({reason}); stopped")
                    procs.append(_Proc(ctx, runner.config))
                    starts += 1
            now = time.monotonic()
            for p in list(procs):
                if not p.ready and now - p.started > start_timeout:
                    return runner.finish(EXIT_CONFIG, f"a worker process did not load the model in {start_timeout:.0f} s")
            if not procs:
                return runner.finish(EXIT_CONFIG, "no worker process left")
            runner.tick()
    except KeyboardInterrupt:
        return runner.finish(EXIT_INTERRUPTED, "interrupted")
    finally:
        for p in procs:
            p.stop()
    return runner.finish()
