"""DECTRIS stream v2 decoding: messages made from the public spec (cbor2 + bitshuffle-LZ4) become runs and frames
with the pixel mask applied, and every kind of bad input is refused with its own reason before anything large
is built or decompressed."""

from __future__ import annotations

import struct

import cbor2
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from operators.metrics import PipelineMetrics
from stream.ingest import IngestDecoder
from stream.protocol import Event, Limits, ProtocolError, Start, Stop
from stream.sources.stream2_wire import NODATA, Stream2Decoder
from stream.stream2_sender import bslz4, encode_end, encode_image, encode_start, multidim

SHAPE = (64, 48)
UID = "series-uid-7"


def _frame(seed: int, dtype: str = "uint32") -> np.ndarray:
    return np.random.default_rng(seed).poisson(20, SHAPE).astype(dtype)


def _mask() -> np.ndarray:
    mask = np.zeros(SHAPE, np.uint32)
    mask[10, :] = 1  # a gap row
    mask[30:34, 20:24] = 8  # a hot cluster
    return mask


def _start(**extra: object) -> bytes:
    values: dict = {"series_id": 7, "shape": SHAPE, "number_of_images": 3, "pixel_mask": _mask(),
                    "saturation_value": 1000, "count_time": 0.1, "detector_description": "EIGER2 X 4M"}  # fmt: skip
    values.update(extra)
    return encode_start(UID, **values)  # type: ignore[arg-type]


def _image(image_id: int, frame: np.ndarray, **extra: object) -> bytes:
    return encode_image(UID, image_id, {"threshold_1": frame}, series_id=7, **extra)  # type: ignore[arg-type]


def _reason(decoder: Stream2Decoder, payload: bytes) -> str:
    with pytest.raises(ProtocolError) as caught:
        decoder.decode(payload)
    return caught.value.reason


def test_a_series_becomes_a_run_whose_frames_have_the_pixel_mask_and_saturation_applied() -> None:
    decoder = Stream2Decoder()
    start = decoder.decode(_start(channels=("threshold_1", "threshold_2")))
    assert isinstance(start, Start) and start.run_id == UID
    assert start.metadata["count_time"] == 0.1 and start.metadata["channel"] == "threshold_1"
    assert start.metadata["series_id"] == 7 and isinstance(start.metadata["arm_date"], str)
    assert "pixel_mask" not in start.metadata  # the array itself is never run metadata

    frame = _frame(1)
    frame[50, 5] = 5000  # above saturation_value
    event = decoder.decode(_image(0, frame, start_time=[3, 10]))
    assert isinstance(event, Event) and event.frame_number == 0 and event.metadata == {"start_time": [3, 10]}
    masked = (_mask() != 0) | (frame >= 1000)
    assert event.image.dtype == np.uint32 and not event.image.flags.writeable
    assert (event.image[masked] == NODATA).all()
    assert np.array_equal(event.image[~masked], frame[~masked])

    stop = decoder.decode(encode_end(UID, series_id=7))
    assert isinstance(stop, Stop) and stop.num_frames == 3


def test_the_chosen_channel_is_the_one_decoded() -> None:
    decoder = Stream2Decoder(channel="threshold_2")
    decoder.decode(_start(channels=("threshold_1", "threshold_2"), pixel_mask=None))
    low, high = _frame(1), _frame(2)
    payload = encode_image(UID, 0, {"threshold_1": low, "threshold_2": high}, series_id=7)
    assert np.array_equal(decoder.decode(payload).image, high)  # type: ignore[union-attr]
    assert _reason(Stream2Decoder(channel="threshold_9"), _start()) == "bad_field"


def test_uint16_frames_and_uncompressed_arrays_are_accepted() -> None:
    decoder = Stream2Decoder()
    decoder.decode(_start(dtype="uint16", pixel_mask=None, saturation_value=None))
    frame = _frame(3, "uint16")
    doc = {"type": "image", "series_unique_id": UID, "image_id": 0,
           "data": {"threshold_1": multidim(frame, compress=False)}}  # fmt: skip
    event = decoder.decode(cbor2.dumps(doc))
    assert np.array_equal(event.image, frame.astype(np.uint32))  # type: ignore[union-attr]


def _compressed_image(payload: bytes, image_id: int = 1) -> bytes:
    array = cbor2.CBORTag(40, [list(SHAPE), cbor2.CBORTag(70, cbor2.CBORTag(56500, ["bslz4", 4, payload]))])
    return cbor2.dumps({"type": "image", "series_unique_id": UID, "image_id": image_id,
                        "data": {"threshold_1": array}})  # fmt: skip


def test_bad_input_is_refused_with_its_own_reason() -> None:
    decoder = Stream2Decoder(limits=Limits(max_pixels=10_000, max_bytes=40_000))
    assert _reason(decoder, _image(0, _frame(0))) == "no_active_run"  # an image outside a series
    decoder.decode(_start(pixel_mask=None))
    good = bslz4(_frame(4))
    corrupt = good[:12] + bytes(len(good) - 12)
    lying_size = struct.pack(">QI", 10**9, 8192) + good[12:]
    lying_block = good[:12] + struct.pack(">I", len(good)) + good[16:]
    cases = {
        b"\xa1\x64type": "malformed",  # CBOR that ends inside an item
        cbor2.dumps({"type": "calibrate"}): "unknown_msg_type",
        cbor2.dumps({"series_unique_id": UID}): "missing_field",
        cbor2.dumps([1, 2, 3]): "malformed",
        _image(0, _frame(0, "uint16")): "bad_dtype",
        encode_image(UID, 0, {"threshold_1": np.zeros((32, 48), np.uint32)}, series_id=7): "bad_shape",
        _compressed_image(corrupt): "decompress_error",
        _compressed_image(lying_block): "decompress_error",  # a block longer than the payload: never read
        _compressed_image(lying_size): "size_mismatch",  # checked from the header, before decompressing
        encode_image("another-series", 0, {"threshold_1": _frame(0)}, series_id=8): "wrong_series",
        cbor2.dumps({"type": "image", "x": cbor2.CBORTag(258, [1])}): "bad_field",  # a tag stream v2 lacks
        cbor2.dumps({"type": "image", "x": [[]] * 70_000}): "oversized_metadata",  # many empty arrays
        cbor2.dumps({"type": "start", "note": "x" * 70_000}): "oversized_metadata",
    }
    for payload, reason in cases.items():
        assert _reason(decoder, payload) == reason, payload[:40]
    big = encode_start("big", series_id=9, shape=(200, 200), number_of_images=1)
    assert _reason(decoder, big) == "oversized"  # 200 x 200 uint32 is over max_bytes
    assert decoder.decode(_image(2, _frame(5))).frame_number == 2  # type: ignore[union-attr]  # still serving


def test_gaps_in_image_ids_count_as_lost_upstream_and_the_end_closes_the_run() -> None:
    metrics = PipelineMetrics(CollectorRegistry())
    ingest = IngestDecoder(metrics, wire=Stream2Decoder())
    started = ingest.accept(_start(number_of_images=6), 0.0, 0.0)
    assert started[-1].run_id == UID  # type: ignore[union-attr]
    for image_id in (0, 1, 4):
        ingest.accept(_image(image_id, _frame(image_id)), 0.0, 0.0)
    stopped = ingest.accept(encode_end(UID, series_id=7), 0.0, 0.0)[-1]
    assert stopped.num_frames == 6  # type: ignore[union-attr]
    assert metrics.lost_upstream._value.get() == 3  # 2 and 3 in the gap, 5 never sent


def test_simulate_format_stream2_sends_an_eiger2_4m_series_a_decoder_takes(tmp_path: object) -> None:
    import subprocess

    import zmq
    from service_support import CLI, free_port

    address = f"tcp://127.0.0.1:{free_port()}"
    sim = subprocess.Popen([CLI, "simulate", "--format", "stream2", "--zmq", address, "--frames", "3",
                            "--rate", "0", "--run-id", "sim-stream2"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)  # fmt: skip
    decoder, messages = Stream2Decoder(), []
    with zmq.Context() as ctx, ctx.socket(zmq.PULL) as pull:
        pull.connect(address)
        pull.setsockopt(zmq.RCVTIMEO, 120_000)
        while not messages or not isinstance(messages[-1], Stop):
            messages.append(decoder.decode(pull.recv()))
    out, _ = sim.communicate(timeout=60)
    assert sim.returncode == 0, out.decode()
    start, *events, stop = messages
    assert start.run_id == "sim-stream2" and start.metadata["image_size_y"] == 2162  # type: ignore[union-attr]
    assert [e.frame_number for e in events] == [0, 1, 2] and stop.num_frames == 3  # type: ignore[union-attr]
    assert all(e.image.shape == (2162, 2068) and e.image.dtype == np.uint32 for e in events)  # type: ignore[union-attr]
    assert (events[0].image == NODATA).any()  # type: ignore[union-attr]  # EIGER2 gaps, masked
