"""The Ray worker pool: N `FrameWorker` actors, on a local Ray instance the service starts or on a cluster.

The service calls ``await pool.compute(frames)``: the batch goes to the alive worker with the fewest batches in
flight. A worker that dies mid-batch is restarted by Ray (``max_restarts``); its batch is sent once more to
another worker, and when that fails too (or no worker comes back in time) the call raises `WorkerLost`, which
the sequencer counts as ``dropped{worker_lost}``. Each worker's state (starting, alive, restarting, dead),
pid, node, device and frame count is what `describe` gives ``/api/health``.

Ray trusts every process of its cluster (it pickles between them): a local instance is started on 127.0.0.1
with Ray's token authentication; join only clusters you trust (``--ray-address``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ObjectLostError, RayActorError

from operators.messages import Frame
from operators.workers.actor import FrameWorker
from operators.workers.compute import Computed

log = logging.getLogger(__name__)

_LOST = (RayActorError, ObjectLostError)  # RayActorError covers ActorDiedError and ActorUnavailableError


class WorkerLost(RuntimeError):
    """A batch's worker died and no other worker computed it: its frames are counted as worker_lost."""


class PoolStartError(RuntimeError):
    """Ray could not be started or reached, or the workers did not come up in time."""


@dataclass(slots=True)
class PoolSettings:
    workers: int
    bundle: Path | None = None
    runtime: str = "onnx"
    device: str = "auto"
    device_preprocess: str = "auto"  # operators.providers.preprocess_on_device
    max_batch: int = 4
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    ray_address: str | None = None  # None: start a local instance
    max_restarts: int = 3  # per worker, then it stays dead (a crash loop is not hidden)
    object_store_bytes: int = 256 * 1024**2  # a local instance's shared memory for frames in transit
    start_timeout: float = 180.0  # every worker loaded and warm
    restart_timeout: float = 120.0  # a lost worker back, else dead


@dataclass(slots=True)
class WorkerState:
    id: int
    handle: Any
    state: str = "starting"  # starting | alive | restarting | dead
    pid: int | None = None
    node: str | None = None
    device: str | None = None
    frames: int = 0
    in_flight: int = 0
    restarts: int = 0
    _probe: asyncio.Task[None] | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "pid": self.pid, "node": self.node, "device": self.device, "state": self.state,
                "frames": self.frames, "restarts": self.restarts}


class RayWorkerPool:
    """Start with `start` (waits until every worker is warm); `close` kills the workers (and a local Ray)."""

    def __init__(self, settings: PoolSettings) -> None:
        if settings.workers < 1:
            raise ValueError("a pool needs at least one worker")
        self.settings = settings
        self.workers: list[WorkerState] = []
        self._started_ray = False

    @property
    def size(self) -> int:
        return len(self.workers)

    async def start(self) -> None:
        s = self.settings
        try:
            await asyncio.to_thread(self._init_ray)
        except Exception as exc:  # Ray raises ConnectionError, RuntimeError, its own errors...
            raise PoolStartError(f"cannot {'reach Ray at ' + s.ray_address if s.ray_address else 'start Ray'}: "
                                 f"{exc}") from exc
        actor = ray.remote(FrameWorker).options(  # type: ignore[attr-defined]
            num_cpus=s.cpus_per_worker, num_gpus=s.gpus_per_worker, max_restarts=s.max_restarts,
            max_task_retries=0,  # a lost batch is the pool's to re-send or count, never silently re-run
            scheduling_strategy="SPREAD",
        )
        threads = max(1, int(s.cpus_per_worker))
        bundle = str(s.bundle) if s.bundle is not None else None
        self.workers = [WorkerState(i, actor.remote(bundle, s.runtime, s.device, s.max_batch, threads,
                                                   s.device_preprocess))
                        for i in range(s.workers)]
        try:
            async with asyncio.timeout(s.start_timeout):
                await asyncio.gather(*(self._refresh(w) for w in self.workers))
        except TimeoutError:
            waiting = [w.id for w in self.workers if w.state != "alive"]
            raise PoolStartError(f"worker(s) {waiting} not ready after {s.start_timeout:.0f} s (not enough CPUs "
                                 f"or GPUs in the Ray cluster for {s.cpus_per_worker} CPU / "
                                 f"{s.gpus_per_worker} GPU each?)") from None
        except Exception as exc:
            raise PoolStartError(f"a worker failed to start: {exc}") from exc
        log.info("worker pool ready: %s", ", ".join(f"{w.id}: pid {w.pid} on {w.device}, node {w.node}"
                                                     for w in self.workers))

    def _init_ray(self) -> None:
        s = self.settings
        if ray.is_initialized():
            return
        if s.ray_address:
            ray.init(address=s.ray_address, namespace="latent-stream", log_to_driver=False)
            return
        needed = int(s.workers * s.cpus_per_worker + 0.999)
        cpus = max(os.cpu_count() or 1, needed)
        if needed > (os.cpu_count() or 1):
            log.warning("%d worker(s) of %g CPU each on %d core(s): the workers share the cores (and with the "
                        "service)", s.workers, s.cpus_per_worker, os.cpu_count() or 1)
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, object_store_memory=s.object_store_bytes,
                 _node_ip_address="127.0.0.1", namespace="latent-stream", log_to_driver=False)
        self._started_ray = True
        log.info("started a local Ray instance (%d CPU, object store %d MiB)", cpus, s.object_store_bytes >> 20)

    async def _refresh(self, worker: WorkerState) -> None:
        info = await worker.handle.info.remote()
        worker.pid, worker.node, worker.device = info["pid"], info["node"], info["device"]
        worker.state = "alive"

    async def compute(self, frames: list[Frame]) -> list[Computed]:
        """The batch's results, in order. Raises WorkerLost when its worker died and the retry failed too."""
        indices = [f.index for f in frames]
        images = [f.image for f in frames]
        tried: set[int] = set()
        for _attempt in range(2):
            worker = await self._choose(tried)
            if worker is None:
                break
            worker.in_flight += 1
            try:
                # Putting ~10 MB frames into the object store is a copy: off the event loop
                ref = await asyncio.to_thread(worker.handle.compute.remote, indices, images)
                results: list[Computed] = await ref
            except _LOST as exc:
                tried.add(worker.id)
                self._lost(worker, exc, frames)
                continue
            finally:
                worker.in_flight -= 1
            worker.frames += len(results)
            return results
        raise WorkerLost(f"frames {indices[0]}..{indices[-1]}: worker(s) {sorted(tried)} lost")

    async def _choose(self, tried: set[int]) -> WorkerState | None:
        """The alive worker with the least work (one not tried for this batch first), waiting for one to come
        back while none is alive; None when none is alive or coming back."""
        deadline = time.monotonic() + self.settings.restart_timeout
        while True:
            alive = [w for w in self.workers if w.state == "alive"]
            if alive:
                return min(alive, key=lambda w: (w.id in tried, w.in_flight, w.frames))
            coming = any(w.state in ("starting", "restarting") for w in self.workers)
            if not coming or time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.05)

    def _lost(self, worker: WorkerState, exc: BaseException, frames: list[Frame]) -> None:
        run = frames[0].run_id
        log.warning("run %s: worker %d (pid %s) lost with frames %d..%d: %s", run, worker.id, worker.pid,
                    frames[0].index, frames[-1].index, type(exc).__name__)
        if worker.state != "alive":
            return
        if worker.restarts >= self.settings.max_restarts:  # Ray will not bring it back
            worker.state = "dead"
            log.error("worker %d lost after %d restart(s): it is dead (the other workers go on)", worker.id,
                      worker.restarts)
            return
        worker.state = "restarting"
        worker.restarts += 1
        worker._probe = asyncio.get_running_loop().create_task(self._await_restart(worker))

    async def _await_restart(self, worker: WorkerState) -> None:
        """Ray restarts the actor (new process, model loaded again); it is alive once it answers."""
        deadline = time.monotonic() + self.settings.restart_timeout
        while time.monotonic() < deadline:
            try:
                async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                    await self._refresh(worker)
                log.info("worker %d is back: pid %s on node %s", worker.id, worker.pid, worker.node)
                return
            except _LOST:
                await asyncio.sleep(0.5)
            except TimeoutError:
                break
        worker.state = "dead"
        log.error("worker %d did not come back within %.0f s: it is dead (the other workers go on)",
                  worker.id, self.settings.restart_timeout)

    def describe(self) -> list[dict[str, Any]]:
        return [w.as_dict() for w in self.workers]

    async def close(self) -> None:
        for w in self.workers:
            if w._probe is not None:
                w._probe.cancel()
        await asyncio.to_thread(self._stop)

    def _stop(self) -> None:
        for w in self.workers:
            try:
                ray.kill(w.handle, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone with its node; the others are still killed
                log.debug("worker %d already gone", w.id)
        if self._started_ray:
            ray.shutdown()
