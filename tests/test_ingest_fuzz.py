"""Nothing a sender sends stops the service: thousands of generated messages over a real ZeroMQ socket to the
real `latent-stream serve` (default bundle, facility mode: frames arrive with a Tiled URI or are held for a
Tiled that is not there), then the service still answers, a valid run still becomes points on /ws, every
received message is accounted for, no log line was forged, and the process' memory stayed within a bound.

The messages are generated from a fixed seed (reproducible): valid runs with small frames of random shapes and
dtypes, cut and corrupted copies of them, random bytes, wrong types, deep nesting, huge containers, bad dtypes
and shapes, NaN frames, absurd frame numbers, odd run ids, multipart messages, and (last) messages over the
size limit, which ZeroMQ refuses before the service sees them. About 30 s on 2 cores (the fuzz itself ~15 s).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Self

import httpx
import msgpack
import numpy as np
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from service_support import LiveService, WsClient, free_port, start_service, stop_service, until

from stream.protocol import REJECT_REASONS, encode_event, encode_start, encode_stop
from stream.sender import FrameSender

pytestmark = pytest.mark.e2e

SEED = 14
MESSAGES = 3000
MAX_FRAME_BYTES = 4 * 2**20  # the service's frame limit here: its ZeroMQ refuses messages over this + 64 KiB
OVER_THE_LIMIT = 3
# What the service may grow by while it takes all of the above: ZeroMQ's own buffer (16 messages of at most
# 4 MiB + 64 KiB) and the decode of one of them, 4 shapes of preprocessing buffers (~5 MB each), the inbox
# (32 small frames), the results held for the absent Tiled (< 10 MB here), and the allocator's slack. Before
# the limits, one message of empty arrays alone took 1.1 GB.
RSS_GROWTH_BOUND = 256 * 2**20

ODD_RUN_IDS: tuple[object, ...] = (
    "a/b", "victim%2Fprimary", "x" * 300, "scan\nFORGED-LOG-LINE at the start of a line", "", "..", "/",
    "\x00\x1b[2J", "ünïcødé θ", " ", "r" * 70_000, 42, 1e300, -7, True, None, ["a", "list"],
    {"a": "map"}, b"bytes", "a" * 255, "CON", "run?slice=3#x",
)  # fmt: skip
DTYPES = ("uint8", "uint16", "int32", "<i8", ">i4", "float32", ">f8", "float16", "float128", "uint32", "int8")
BAD_DTYPES: tuple[object, ...] = (
    "complex64", "object", "U10", "bool", "V8", "M8[ns]", "", "int33", "i4,i4", 42, None, ["int32"], "S4",
)  # fmt: skip
BAD_SHAPES: tuple[object, ...] = (
    [0, 5], [-1, 3], [10**9, 10**9], [2, 3, 4], ["a", 1], [2**40, 2**40], [1.5, 2], None, "64x64", [True, 2],
    [2**64 - 1, 1], [], {"h": 1},
)  # fmt: skip
BAD_FRAME_NUMBERS: tuple[object, ...] = (-1, 2**31, 10**12, 2**63, 2**64 - 1, 1.5, "7", None, True, [1])


class Fuzzer:
    """Generates one message at a time (a list of ZeroMQ parts), keeping a plausible run going in between."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.np_rng = np.random.default_rng(seed)
        self.frame_number = 0
        kinds: list[tuple[int, Callable[[], list[bytes]]]] = [
            (24, self.valid_event), (5, self.valid_start), (3, self.valid_stop), (5, self.truncated),
            (5, self.random_bytes), (5, self.bit_flips), (8, self.wrong_types), (3, self.deep_nesting),
            (3, self.huge_container), (5, self.bad_dtype), (5, self.bad_shape), (4, self.size_mismatch),
            (4, self.non_finite), (5, self.absurd_frame_number), (6, self.odd_run), (3, self.odd_metadata),
            (2, self.multipart), (1, lambda: [b""]),
        ]  # fmt: skip
        self.kinds = [kind for _, kind in kinds]
        self.weights = [weight for weight, _ in kinds]

    def __iter__(self) -> Iterator[list[bytes]]:
        while True:
            yield self.rng.choices(self.kinds, self.weights)[0]()

    # -- valid messages -------------------------------------------------------------------------------
    def _frame(self, dtype: str | None = None) -> np.ndarray:
        shape = (self.rng.randint(1, 96), self.rng.randint(1, 96))
        return self.np_rng.poisson(20.0, shape).astype(dtype or self.rng.choice(DTYPES))

    def _event(self, **extra: object) -> bytes:
        self.frame_number += self.rng.choice((1, 1, 1, 2, 0))  # gaps and repeats now and then
        stored = f"http://tiled.facility/api/v1/array/full/raw?slice={self.frame_number}"
        tiled_url = self.rng.choice(("", stored))  # empty: the service holds the frame for its Tiled
        return encode_event(self.frame_number, self._frame(), tiled_url=tiled_url, **extra)

    def valid_event(self) -> list[bytes]:
        return [self._event()]

    def valid_start(self) -> list[bytes]:
        self.frame_number = 0
        return [encode_start(f"fuzz-{self.rng.getrandbits(32):08x}", "fuzz", sample=self.rng.random())]

    def valid_stop(self) -> list[bytes]:
        return [encode_stop(self.rng.choice((self.frame_number + 1, 0, 2**31, None)))]

    # -- corrupted copies ---------------------------------------------------------------------------
    def _any_valid(self) -> bytes:
        return self.rng.choice((self.valid_event, self.valid_start, self.valid_stop))()[0]

    def truncated(self) -> list[bytes]:
        payload = self._any_valid()
        return [payload[: self.rng.randrange(len(payload))]]

    def random_bytes(self) -> list[bytes]:
        return [self.rng.randbytes(self.rng.choice((1, 7, 100, 5000, 300_000)))]

    def bit_flips(self) -> list[bytes]:
        payload = bytearray(self._any_valid())
        for _ in range(self.rng.randint(1, 8)):
            payload[self.rng.randrange(len(payload))] = self.rng.getrandbits(8)
        return [bytes(payload)]

    def wrong_types(self) -> list[bytes]:
        doc: dict[object, object] = {
            "msg_type": self.rng.choice((1, None, [], "EVENT", "start\x00", "event", "stop", "start", 2.5)),
            "frame_number": self.rng.choice((1, "1", None, [], {})),
            "image": self.rng.choice((
                [1, 2], "image", 3, {"array": [1]}, {"array": {}},
                {"array": {"data": "text", "dtype": "int32", "shape": [1, 1]}},
                {"array": {"data": 5, "dtype": "int32", "shape": [1, 1]}},
            )),
            "run_id": self.rng.choice(ODD_RUN_IDS),
            "run_name": self.rng.choice(("n", 5, None, ["n"])),
            "tiled_url": self.rng.choice(("", 5, None, b"url", ["u"])),
            "num_frames": self.rng.choice((1, -5, "3", 2**40, None, 1.0)),
        }  # fmt: skip
        for key in self.rng.sample(list(doc), self.rng.randint(0, 3)):
            del doc[key]
        wrap = self.rng.choice((lambda d: d, lambda d: [d], lambda d: "text", lambda d: 5, lambda d: None))
        return [msgpack.packb(wrap(doc))]

    # -- structure and size --------------------------------------------------------------------------
    def deep_nesting(self) -> list[bytes]:
        depth = self.rng.choice((31, 33, 256, 1000, 1100, 5000))
        start = msgpack.packb({"msg_type": "start", "run_id": "deep"})
        # packed by hand: msgpack.packb stops at 511 levels, a sender need not
        return [bytes([start[0] + 1]) + start[1:] + msgpack.packb("deep") + b"\x91" * depth + b"\xc0"]

    def huge_container(self) -> list[bytes]:
        choice = self.rng.randrange(6)
        head = msgpack.packb({"msg_type": "start", "run_id": "huge"})
        key = bytes([head[0] + 1]) + head[1:] + msgpack.packb("junk")
        if choice == 0:  # ~4 MiB of empty arrays in arrays of 65,536
            empties = b"\xdd\x00\x01\x00\x00" + b"\x90" * 65_536
            return [key + b"\xdd" + (63).to_bytes(4, "big") + empties * 63]
        if choice == 1:  # one array header announcing 4 million empty arrays
            return [key + b"\xdd" + (4_000_000).to_bytes(4, "big") + b"\x90" * 4_000_000]
        if choice == 2:
            return [msgpack.packb({"msg_type": "start", "run_id": "ints", "junk": list(range(70_000))})]
        if choice == 3:
            keys = {str(i): i for i in range(70_000)}
            return [msgpack.packb({"msg_type": "start", "run_id": "keys", "junk": keys})]
        if choice == 4:
            return [msgpack.packb({"msg_type": "start", "run_id": "str", "junk": "s" * 3_000_000})]
        return [encode_event(self.frame_number + 1, self._frame("uint8"), junk=b"\x00" * 1_000_000)]

    def bad_dtype(self) -> list[bytes]:
        return [self._raw_event(dtype=self.rng.choice(BAD_DTYPES))]

    def bad_shape(self) -> list[bytes]:
        return [self._raw_event(shape=self.rng.choice(BAD_SHAPES))]

    def size_mismatch(self) -> list[bytes]:
        return [self._raw_event(data=b"\x00" * self.rng.choice((0, 1, 47, 49, 4096)), shape=[4, 3])]

    def _raw_event(self, **array: object) -> bytes:
        fields = {"data": b"\x00" * 48, "dtype": "int32", "shape": [4, 3], **array}
        return msgpack.packb({"msg_type": "event", "frame_number": self.frame_number + 1, "tiled_url": "",
                              "image": {"array": fields}})  # fmt: skip

    def non_finite(self) -> list[bytes]:
        frame = self._frame(self.rng.choice(("float32", ">f8", "float16")))
        frame.flat[self.rng.randrange(frame.size)] = self.rng.choice((np.nan, np.inf, -np.inf))
        return [encode_event(self.frame_number + 1, frame)]

    def absurd_frame_number(self) -> list[bytes]:
        payload = msgpack.unpackb(encode_event(0, self._frame("int32")))
        payload["frame_number"] = self.rng.choice(BAD_FRAME_NUMBERS)
        return [msgpack.packb(payload)]

    def odd_run(self) -> list[bytes]:
        self.frame_number = 0
        run_id, run_name = self.rng.choice(ODD_RUN_IDS), self.rng.choice(ODD_RUN_IDS)
        return [msgpack.packb({"msg_type": "start", "run_id": run_id, "run_name": run_name})]

    def odd_metadata(self) -> list[bytes]:
        value = self.rng.choice((
            msgpack.ExtType(5, b"ext"), msgpack.Timestamp(1, 0), b"\xff\xfe", float("nan"), float("inf"),
            2**64 - 1, -(2**63), {1: "int key", None: "nil key", 2.5: "float key"}, "x" * 60_000,
            [[[]]] * 1000,
        ))  # fmt: skip
        if self.rng.random() < 0.5:
            return [self._event(extra=value)]
        return [encode_start(f"meta-{self.rng.getrandbits(16)}", "odd metadata", extra=value)]

    def multipart(self) -> list[bytes]:
        return [b"topic"] * self.rng.randint(2, 5) + [self._any_valid()]


async def _counters(service: LiveService, name: str | None = None) -> dict[str, float]:
    """The totals of the accounting counters, or the counter ``name`` per label value."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{service.http}/metrics", timeout=10)).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        family_name = family.name.removeprefix("latent_stream_")
        samples = [s for s in family.samples if s.name.endswith("_total")]
        if name is not None and family_name == name:
            return {",".join(s.labels.values()): s.value for s in samples}
        if family_name in ("received", "processed", "rejected", "dropped", "source_reconnects"):
            out[family_name] = sum(s.value for s in samples)
    return out


class PeakRss:
    """Samples a process' resident memory in a thread, keeping the peak."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.baseline = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    tmp = tmp_path_factory.mktemp("fuzz")
    config = tmp / "serve.yaml"
    config.write_text(f"max_frame_bytes: {MAX_FRAME_BYTES}\nmax_frame_pixels: {2**20}\n")
    absent_tiled = f"http://127.0.0.1:{free_port()}"  # facility mode, its Tiled down: nothing to start
    live = start_service(tmp, extra_args=("--config", str(config), "--tiled", absent_tiled),
                         wait_for_tiled=False)  # fmt: skip
    yield live
    stop_service(live)


async def _valid_run_becomes_points(
    service: LiveService, sender: FrameSender, run_id: str, frames: int
) -> None:
    async with WsClient(service.ws) as client:
        await sender.send_start(run_id, "valid")
        for i in range(frames):
            await sender.send_event(i, np.random.default_rng(i).poisson(5.0, (64, 48)).astype(np.int32))
        await sender.send_stop(frames)
        await until(lambda: client.stopped(run_id), 60, f"the points of run {run_id}")
    assert [p["index"] for p in client.points(run_id)] == list(range(frames))


async def _until_reconnected(service: LiveService, times: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (await _counters(service))["source_reconnects"] < times:
        assert time.monotonic() < deadline, f"the ingest did not connect again ({times})"
        await asyncio.sleep(0.1)


async def _idle_and_accounted(service: LiveService, timeout: float = 60) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        c = await _counters(service)
        if c["received"] == c["processed"] + c["rejected"] + c["dropped"]:
            return c
        assert time.monotonic() < deadline, f"counters never added up: {c}"
        await asyncio.sleep(0.2)


async def test_thousands_of_hostile_messages_leave_the_service_up_accounted_and_within_its_memory_bound(
    service: LiveService,
) -> None:
    async with FrameSender(service.zmq) as sender:
        await _valid_run_becomes_points(service, sender, "before-fuzz", 5)  # everything warm
        before = await _counters(service)
        started = time.monotonic()
        with PeakRss(service.proc.pid) as rss:
            async with WsClient(service.ws) as watcher:  # sees every odd run's start and points
                fuzz = iter(Fuzzer(SEED))
                for _ in range(MESSAGES):
                    await sender.socket.send_multipart(next(fuzz))
                fuzzed = await _idle_and_accounted(service)
                assert fuzzed["received"] - before["received"] == MESSAGES  # PUSH/PULL: each one arrived
                assert not watcher.closed
            fuzz_seconds = time.monotonic() - started

            # over the size limit: ZeroMQ refuses each and drops the connection; the ingest makes it again
            for n in range(1, OVER_THE_LIMIT + 1):
                await sender.send_raw(random.Random(n).randbytes(MAX_FRAME_BYTES + 100 * 1024))
                await _until_reconnected(service, n)
            await _valid_run_becomes_points(service, sender, "after-fuzz", 5)

    final = await _idle_and_accounted(service)
    assert final["received"] == fuzzed["received"] + 7  # the valid run after it; the oversized never arrived
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{service.http}/api/health", timeout=10)).status_code == 200
    # refused at the door with the protocol's reasons, never by a stage: what it admits, the pipeline computes
    rejected = {reason for reason, n in (await _counters(service, "rejected")).items() if n}
    assert rejected <= {*REJECT_REASONS, "no_active_run"}, rejected
    growth = rss.peak - rss.baseline
    print(f"fuzz: {MESSAGES} messages in {fuzz_seconds:.1f} s; RSS {rss.baseline / 2**20:.0f} MiB before, "
          f"peak {rss.peak / 2**20:.0f} MiB (+{growth / 2**20:.0f} MiB)")  # fmt: skip
    assert growth < RSS_GROWTH_BOUND, f"RSS grew by {growth / 2**20:.0f} MiB"
    log = service.log_text()
    assert not any(line.startswith("FORGED-LOG-LINE") for line in log.splitlines())
    assert "scan\\nFORGED-LOG-LINE" in log  # the odd run id was logged, escaped
    assert "Traceback" not in log, log[-3000:]
