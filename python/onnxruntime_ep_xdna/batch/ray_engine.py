"""The Ray engine: a pool of Ray actors, one model loaded per actor, one input in flight per actor.

Placement: when the cluster advertises the custom resource `xdna_npu` (start each NPU machine with
`ray start ... --resources='{"xdna_npu": 1}'`), every actor asks for one unit of it, so there is exactly one actor
(one model, one NPU) per NPU machine, using all of that machine's cores for the decoder's CPU work. Without it,
actors ask for `cpus_per_worker` CPUs each and as many are started as the cluster's CPUs allow.

Audio is decoded inside the actors: inputs travel as paths or URIs, so every worker node must see them at the
same path (a shared file system such as NFS mounted at the same place; or URIs that the decoder can open). Only
the rendered transcripts (kilobytes) come back; the driver alone writes OUT_DIR, so OUT_DIR only needs to be
on the driver's machine.

Faults: an actor that dies (process killed, crashed, node lost) fails the call it was running with a
RayActorError; that input goes back to the queue (runner.worker_died: at most `retries` retries) and a new actor
replaces the dead one. Actors that do not become ready within `start_timeout` (no node with the resource) are
given up; with none left the batch stops with exit code 1 and everything not done stays pending (resumable).
Why actors rather than Ray Data's map_batches: the driver needs to know which input a dead worker held (a retry
of that input only) and to be the single writer of each input's outputs; with one call per input both are exact.
"""

from __future__ import annotations

import os
import time

from .runner import EXIT_CONFIG, EXIT_INTERRUPTED, BatchRunner, Summary
from .worker import ConfigError, Worker, WorkerConfig

NPU_RESOURCE = "xdna_npu"


class BatchActor:
    """The actor body (wrapped with ray.remote at run time, so importing this module needs no Ray)."""

    def __init__(self, config: WorkerConfig):
        self.error = None
        try:
            self.worker = Worker(config)
        except ConfigError as e:
            self.worker, self.error = None, str(e)

    def ready(self) -> dict:
        return {"ok": self.error is None, "error": self.error, "pid": os.getpid(), "host": os.uname().nodename}

    def run(self, source: str) -> dict:
        return self.worker.run(source)


def _import_ray():
    try:
        import ray
    except ImportError as e:
        raise ConfigError(f"--engine ray needs Ray: pip install 'onnxruntime-ep-xdna[ray]' ({e})") from None
    return ray


def _reachable(address: str, timeout: float = 10.0) -> None:
    """A host:port address must accept a TCP connection within `timeout` s (Ray itself retries for minutes)."""
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        return  # ray://..., "auto", or no address: Ray's own handling
    import socket

    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(f"nothing answers at {address} ({e.strerror or e})") from None


def loopback_only(ray) -> None:
    """Makes a Ray instance started from this process bind 127.0.0.1 only (a one-machine batch has no reason to
    listen on the network). Ray's switch for this is its single-machine mode (node IP = localhost); the
    environment variable reaches the processes ray.init starts, the constant the already imported module."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
    except AttributeError:
        pass


def placement(ray, workers: int | None, cpus_per_worker: float, npu_resource: str = NPU_RESOURCE
              ) -> tuple[int, dict, str]:
    """(number of actors, their ray options, a sentence for the log) from the cluster's resources."""
    res = ray.cluster_resources()
    if res.get(npu_resource, 0) >= 1:
        n = int(res[npu_resource])
        opts = {"num_cpus": 1, "resources": {npu_resource: 1}}
        why = f"{n} machine(s) with the {npu_resource} resource: one actor each"
    else:
        cpus = float(res.get("CPU", 1))
        n = max(1, int(cpus // cpus_per_worker))
        opts = {"num_cpus": cpus_per_worker}
        why = f"no {npu_resource} resource in the cluster: {cpus:g} CPUs / {cpus_per_worker:g} per actor"
    if workers:
        n = workers
        why += f" (--workers {workers})"
    return n, opts, why


def run_ray(runner: BatchRunner, *, workers: int | None = None, address: str | None = None,
            cpus_per_worker: float = 1.0, npu_resource: str = NPU_RESOURCE, start_timeout: float = 600.0
            ) -> Summary:
    if not runner.to_do:
        return runner.finish()
    try:
        ray = _import_ray()
    except ConfigError as e:
        return runner.finish(EXIT_CONFIG, str(e))
    started_here = False
    if not ray.is_initialized():
        kwargs = {"include_dashboard": False, "logging_level": "ERROR"}
        if address:
            kwargs["address"] = address
        elif not os.environ.get("RAY_ADDRESS"):
            loopback_only(ray)  # a Ray instance for this batch only, on this machine
        try:
            _reachable(address or os.environ.get("RAY_ADDRESS") or "")
            ray.init(**kwargs)
        except Exception as e:  # unreachable address, version mismatch, missing auth token, ...
            where = address or os.environ.get("RAY_ADDRESS") or "this machine"
            return runner.finish(EXIT_CONFIG, f"cannot start or join the Ray cluster ({where}): "
                                              f"{str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}")
        started_here = True
    try:
        n, opts, why = placement(ray, workers, cpus_per_worker, npu_resource)
        n = max(1, min(n, runner.to_do))
        runner.log(f"xdna batch: ray: {n} actor(s); {why}")
        config = runner.config
        if "resources" not in opts and config.threads == 0:
            config = WorkerConfig(**{**config.__dict__, "threads": max(1, int(cpus_per_worker))})
        remote = ray.remote(max_restarts=0, max_task_retries=0, **opts)(BatchActor)
        return _loop(ray, runner, remote, config, n, start_timeout)
    finally:
        if started_here:
            ray.shutdown()


class _Slot:
    def __init__(self, ray, remote, config):
        self.actor = remote.remote(config)
        self.ref = self.actor.ready.remote()
        self.job = None
        self.ready = False
        self.since = time.monotonic()


def _loop(ray, runner: BatchRunner, remote, config: WorkerConfig, n: int, start_timeout: float) -> Summary:
    from ray.exceptions import RayActorError, RayError, RayTaskError

    slots = [_Slot(ray, remote, config) for _ in range(n)]
    max_starts = 3 * n + runner.to_do
    starts = n
    ever_ready = False

    def retire(slot: _Slot) -> None:
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:  # already gone
            pass
        slots.remove(slot)

    try:
        while True:
            for s in slots:
                if s.ready and s.job is None:
                    s.job = runner.next_job()
                    if s.job is not None:
                        s.ref = s.actor.run.remote(s.job.source)
            if not runner.queue and all(s.job is None for s in slots):
                break
            by_ref = {s.ref: s for s in slots if s.ref is not None}
            done, _ = ray.wait(list(by_ref), num_returns=1, timeout=0.5)
            for ref in done:
                s = by_ref[ref]
                s.ref = None
                try:
                    value = ray.get(ref)
                except RayTaskError as e:  # an exception escaped the worker's own handling: this input fails
                    if s.job is not None:
                        job, s.job = s.job, None
                        runner.finished(job, {"ok": False, "error": str(e).strip().splitlines()[-1]})
                    else:
                        return runner.finish(EXIT_CONFIG, f"a Ray worker could not start: {e}")
                    continue
                except (RayActorError, RayError) as e:
                    reason = type(e).__name__
                    job, s.job = s.job, None
                    retire(s)
                    if job is not None:
                        runner.worker_died(job, reason)
                    else:
                        runner.log(f"xdna batch: a Ray actor died while starting ({reason})")
                    if runner.queue or any(x.job for x in slots):
                        if starts >= max_starts:
                            return runner.finish(EXIT_CONFIG, f"Ray actors keep dying ({reason}); stopped")
                        slots.append(_Slot(ray, remote, config))
                        starts += 1
                    continue
                if not s.ready:
                    if not value.get("ok"):
                        return runner.finish(EXIT_CONFIG, value.get("error") or "worker could not start")
                    s.ready = ever_ready = True
                    runner.worker_ready()
                elif s.job is not None:
                    job, s.job = s.job, None
                    runner.finished(job, value)
            now = time.monotonic()
            for s in list(slots):
                if not s.ready and now - s.since > start_timeout:
                    runner.log(f"xdna batch: a Ray actor did not start within {start_timeout:.0f} s: given up")
                    retire(s)
            if not slots:
                hint = "" if ever_ready else (" (does the cluster have the resources the actors ask for, and the "
                                              "package installed on every node?)")
                return runner.finish(EXIT_CONFIG, f"no Ray actor left to run the batch{hint}")
            runner.tick()
    except KeyboardInterrupt:
        return runner.finish(EXIT_INTERRUPTED, "interrupted")
    finally:
        for s in list(slots):
            try:
                ray.kill(s.actor, no_restart=True)
            except Exception:
                pass
    return runner.finish()
