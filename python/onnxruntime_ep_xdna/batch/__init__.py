"""`xdna batch`: many files, one machine or many (Ray), resumable, nothing lost or written twice.

    jobs.py        inputs -> jobs (files, directories, list files), output names, completion records, atomic writes
    worker.py      one worker: the model loaded once, one input -> rendered formats (the same in every engine)
    runner.py      the driver: queue, retries after a worker death, the single writer of outputs, index, progress
    engines.py     --engine local: in this process, or --workers N processes
    ray_engine.py  --engine ray: one actor per NPU machine (custom resource xdna_npu) or per CPU share
    cli.py         the command line

    from onnxruntime_ep_xdna.batch import run_batch
    summary = run_batch(["archive/"], "out", model="base", formats=("txt", "srt"), engine="local")
    summary.exit_code, summary.done, summary.failed
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from .jobs import BatchInputError, OutputLock, discover
from .runner import BatchRunner, Summary
from .worker import ConfigError, WorkerConfig

__all__ = ["BatchInputError", "ConfigError", "Summary", "WorkerConfig", "run_batch"]


def run_batch(inputs: Iterable[str], out_dir: str | os.PathLike, *, model: str = "base", provider: str = "xdna",
              options=None, formats: Iterable[str] = ("txt",), engine: str = "local", workers: int | None = None,
              threads: int | None = None, force: bool = False, retries: int = 2, lists: Iterable[str] = (),
              ray_address: str | None = None, cpus_per_worker: float = 1.0, npu_resource: str = "xdna_npu",
              start_timeout: float = 600.0, progress: bool = False, log=None, test_hold: str | None = None,
              precision: str | None = None) -> Summary:
    """Transcribes every input into OUT_DIR (see jobs.py for the layout). Raises BatchInputError for an unusable
    input argument (before anything runs); everything else ends up in the Summary and index.jsonl."""
    from ..whisper.options import TranscriptionOptions
    from .engines import run_inline, run_processes

    if engine not in ("local", "ray"):
        raise BatchInputError(f"unknown engine {engine!r}: use local or ray")
    formats = tuple(dict.fromkeys(formats))
    jobs = discover(list(inputs), out_dir, lists)
    if threads is None:
        threads = 0 if engine == "local" and (workers or 1) == 1 else (
            max(1, (os.cpu_count() or 1) // workers) if engine == "local" else 0)
    config = WorkerConfig(model=str(model), provider=provider, options=options or TranscriptionOptions(),
                          formats=formats, threads=threads, test_hold=test_hold, precision=precision)
    os.makedirs(out_dir, exist_ok=True)
    with OutputLock(Path(out_dir)):
        runner = BatchRunner(jobs, out_dir, config, force=force, retries=retries, progress=progress, log=log)
        if engine == "ray":
            from .ray_engine import run_ray

            return run_ray(runner, workers=workers, address=ray_address, cpus_per_worker=cpus_per_worker,
                           npu_resource=npu_resource, start_timeout=start_timeout)
        if (workers or 1) > 1:
            return run_processes(runner, workers, start_timeout=start_timeout)
        return run_inline(runner)
