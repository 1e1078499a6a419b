"""Moving one frame between processes on one machine: Ray's object store against a ZeroMQ hop.

    python -m benchmarks.transport --repeats 50 --json benchmarks/results/transport.json

The two frame transports the worker pool could use (docs/scaling.md): the service ingests and hands each frame
to a worker through Ray's object store (what is built), or workers take frames from the detector themselves
and the frames the service must store come back to it over ZeroMQ. Per frame, sequential, p50:
- ``ray_task``: a Ray task on this node given the frame (``ray.put`` into shared memory, the call, the task
  maps the frame without a copy, its answer back), and the same with a tiny array (the call alone);
- ``zmq_hop``: the frame sent PUSH -> PULL over TCP on 127.0.0.1 and received (one more hop of the frame).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import zmq

from benchmarks.stats import LatencyStats


@ray.remote(num_cpus=1)
def _nbytes(frame: np.ndarray) -> int:
    return int(frame.nbytes)


def _ray_task(frame: np.ndarray, repeats: int) -> LatencyStats:
    ray.get(_nbytes.remote(frame))  # the worker process is started and warm
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ray.get(_nbytes.remote(frame))
        samples.append(time.perf_counter() - t0)
    return LatencyStats.from_seconds(samples)


def _zmq_hop(frame: np.ndarray, repeats: int) -> LatencyStats:
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    samples = []
    try:
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            push.send(frame, copy=False)
            np.frombuffer(pull.recv(copy=False).buffer, frame.dtype)
            samples.append(time.perf_counter() - t0)
    finally:
        push.close(0)
        pull.close(0)
        ctx.term()
    return LatencyStats.from_seconds(samples[1:])


def main(repeats: int) -> dict[str, Any]:
    frame = np.random.default_rng(0).poisson(5.0, (1679, 1475)).astype(np.int32)  # a PILATUS3 2M frame
    tiny = np.zeros(16, np.int32)
    out: dict[str, Any] = {"load_before": os.getloadavg(), "frame_mb": frame.nbytes / 1e6}
    ray.init(address="local", num_cpus=1, include_dashboard=False, object_store_memory=256 * 1024**2,
             _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        out["ray_task_frame"] = _ray_task(frame, repeats).to_dict()
        out["ray_task_tiny"] = _ray_task(tiny, repeats).to_dict()
    finally:
        ray.shutdown()
    out["zmq_hop_frame"] = _zmq_hop(frame, repeats).to_dict()
    out["load_after"] = os.getloadavg()
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = main(args.repeats)
    print(json.dumps({k: (v["p50_ms"] if isinstance(v, dict) else v) for k, v in result.items()}))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
