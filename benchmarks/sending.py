"""A paced frame source for the end-to-end runs: a ZeroMQ PUSH socket that binds, like a detector.

Messages follow the public ingest wire format (ARCHITECTURE.md). The pixel bytes of each distinct frame are
taken once; per event only the msgpack envelope is built, so the sender's own cost stays small beside the
service it measures.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import msgpack
import numpy as np
import zmq


class FrameSender:
    """Sends runs of frames at a fixed rate (or as fast as the receiver takes them) and stamps each send."""

    def __init__(self, address: str, hwm: int = 16) -> None:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(address)
        self._lock = threading.Lock()  # one run at a time on the socket
        self._payloads: dict[int, bytes] = {}

    def _pixels(self, frames: Sequence[np.ndarray], i: int) -> bytes:
        key = i % len(frames)
        data = self._payloads.get(key)
        if data is None:
            data = self._payloads[key] = np.ascontiguousarray(frames[key]).tobytes()
        return data

    def send_run(
        self,
        run_id: str,
        frames: Sequence[np.ndarray],
        n: int,
        *,
        rate: float | None,
        tiled_base: str,
    ) -> dict[int, float]:
        """Send start, `n` events (cycling through `frames`) and stop. Returns frame index -> send time.

        `tiled_base` non-empty: facility mode, each event carries a URI of that server; empty: the service
        stores the frame. With `rate` None the PUSH socket's backpressure sets the pace.
        """
        h, w = frames[0].shape
        dtype = str(frames[0].dtype)
        sent: dict[int, float] = {}
        with self._lock:
            self._sock.send(
                msgpack.packb(
                    {
                        "msg_type": "start",
                        "run_name": run_id,
                        "run_id": run_id,
                        "width": w,
                        "height": h,
                        "data_type": dtype,
                        "tiled_url": f"{tiled_base}/api/v1/metadata/{run_id}" if tiled_base else "",
                    }
                )
            )
            t0 = time.perf_counter()
            for i in range(n):
                if rate is not None:
                    due = t0 + i / rate
                    delay = due - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                url = f"{tiled_base}/api/v1/array/full/{run_id}/primary/image?slice={i}" if tiled_base else ""
                msg = msgpack.packb(
                    {
                        "msg_type": "event",
                        "image": {"array": {"data": self._pixels(frames, i), "dtype": dtype, "shape": [h, w]}},
                        "frame_number": i,
                        "tiled_url": url,
                    }
                )
                sent[i] = time.perf_counter()
                self._sock.send(msg, copy=False)
            self._sock.send(msgpack.packb({"msg_type": "stop", "num_frames": n}))
        return sent

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()
