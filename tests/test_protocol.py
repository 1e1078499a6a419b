"""The msgpack wire format: what the ALS tools send decodes to typed messages; bad input gets a reason."""

import tracemalloc

import msgpack
import numpy as np
import pytest

from stream.protocol import (
    Event,
    Limits,
    ProtocolError,
    Start,
    Stop,
    decode,
    encode_event,
    encode_start,
    encode_stop,
)


def _event_doc(data: bytes, dtype: str = "int32", shape: object = (4, 3), **extra: object) -> bytes:
    doc = {"msg_type": "event", "image": {"array": {"data": data, "dtype": dtype, "shape": shape}},
           "frame_number": 7, "tiled_url": "", **extra}
    return msgpack.packb(doc)


def test_als_style_event_decodes_to_a_read_only_view_with_the_sent_pixels() -> None:
    image = np.arange(12, dtype=np.int32).reshape(4, 3)
    message = decode(_event_doc(image.tobytes(), detector="pilatus"))
    assert isinstance(message, Event)
    assert message.frame_number == 7
    np.testing.assert_array_equal(message.image, image)
    assert not message.image.flags.writeable
    assert message.metadata == {"detector": "pilatus"}


def test_shape_is_trusted_over_width_and_height() -> None:
    image = np.ones((1679, 1475), dtype=np.int32)
    start = decode(encode_start("r", "scan", width=1679, height=1475))  # swapped, as one ALS replay does
    event = decode(encode_event(0, image))
    assert isinstance(start, Start) and start.metadata["width"] == 1679
    assert isinstance(event, Event) and event.image.shape == (1679, 1475)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float32, np.dtype(">f8")])
def test_encode_then_decode_round_trips_every_detector_dtype(dtype: np.dtype) -> None:
    image = (np.arange(20).reshape(4, 5) * 3).astype(dtype)
    message = decode(encode_event(3, image, tiled_url="http://t/x?slice=3"))
    assert isinstance(message, Event)
    np.testing.assert_array_equal(message.image, image)
    assert message.image.dtype == np.dtype(dtype)
    assert message.tiled_url == "http://t/x?slice=3"


def test_start_keeps_extra_keys_and_stop_carries_the_frame_count() -> None:
    start = decode(encode_start("run-1", "scan A", sample="silver behenate"))
    stop = decode(encode_stop(200))
    assert isinstance(start, Start) and start.run_id == "run-1" and start.run_name == "scan A"
    assert start.metadata["sample"] == "silver behenate"
    assert isinstance(stop, Stop) and stop.num_frames == 200


def test_numeric_run_id_becomes_a_string() -> None:
    start = decode(msgpack.packb({"msg_type": "start", "run_id": 42}))
    assert isinstance(start, Start) and start.run_id == "42"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xc1\xff not msgpack", "malformed"),
        (msgpack.packb([1, 2, 3]), "malformed"),
        (msgpack.packb({"msg_type": "calibrate"}), "unknown_msg_type"),
        (msgpack.packb({"run_id": "x"}), "missing_field"),
        (msgpack.packb({"msg_type": "event", "frame_number": 1}), "missing_field"),
        (_event_doc(b"\x00" * 48, shape=(4, 3), frame_number="seven"), "bad_field"),
        (_event_doc(b"\x00" * 48, dtype="complex64", shape=(2, 3)), "bad_dtype"),
        (_event_doc(b"\x00" * 48, dtype="not-a-dtype"), "bad_dtype"),
        (_event_doc(b"\x00" * 48, dtype="object"), "bad_dtype"),
        (_event_doc(b"\x00" * 48, shape=(48,)), "bad_shape"),
        (_event_doc(b"\x00" * 48, shape=(-4, -3)), "bad_shape"),
        (_event_doc(b"\x00" * 47), "size_mismatch"),
        (_event_doc(b"\x00" * 40), "size_mismatch"),
        (encode_event(0, np.array([[1.0, np.nan]], dtype=np.float32)), "non_finite"),
        (encode_event(0, np.array([[np.inf, 0.0]])), "non_finite"),
        (msgpack.packb({"msg_type": "stop", "num_frames": -3}), "bad_field"),
    ],
)
def test_bad_input_is_refused_with_its_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode(payload)
    assert caught.value.reason == reason


def test_oversized_frames_are_refused_from_their_declared_shape_before_any_copy() -> None:
    limits = Limits(max_pixels=100, max_bytes=10_000)
    # The data is tiny: the declared shape alone exceeds the pixel limit.
    with pytest.raises(ProtocolError) as caught:
        decode(_event_doc(b"\x00" * 48, shape=(100, 100)), limits)
    assert caught.value.reason == "oversized"
    # A message longer than the byte limit is refused before msgpack parses it.
    with pytest.raises(ProtocolError) as caught:
        decode(b"\x00" * (10_000 + 70_000), limits)
    assert caught.value.reason == "oversized"


def test_integer_frames_skip_the_finiteness_check_and_float_frames_pass_it_when_finite() -> None:
    assert isinstance(decode(encode_event(0, np.full((2, 2), 2**31 - 1, dtype=np.int32))), Event)
    assert isinstance(decode(encode_event(0, np.zeros((2, 2), dtype=np.float32))), Event)


@pytest.mark.parametrize("frame_number", [2**31, 10**12, 2**63, 2**64 - 1])
def test_frame_numbers_beyond_the_configured_maximum_are_refused_as_bad_field(frame_number: int) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode(encode_event(frame_number, np.zeros((2, 2), np.int32)))
    assert caught.value.reason == "bad_field"
    assert isinstance(decode(encode_event(2**31 - 1, np.zeros((2, 2), np.int32))), Event)


def test_the_frame_number_bound_is_configurable_and_also_bounds_the_announced_frame_count() -> None:
    limits = Limits(max_frame_number=99)
    assert isinstance(decode(encode_event(99, np.zeros((2, 2), np.int32)), limits), Event)
    assert isinstance(decode(encode_stop(100), limits), Stop)
    for payload in (encode_event(100, np.zeros((2, 2), np.int32)), encode_stop(101), encode_stop(2**64 - 1)):
        with pytest.raises(ProtocolError) as caught:
            decode(payload, limits)
        assert caught.value.reason == "bad_field"


def _nested(depth: int) -> object:
    value: object = {}
    for _ in range(depth - 1):
        value = {"deeper": value}
    return value


def test_metadata_nested_deeper_than_the_limit_is_refused_in_any_message() -> None:
    # The message's map is level 1: a value nested 31 levels reaches the default limit of 32.
    assert isinstance(decode(encode_start("r", sample=_nested(31))), Start)
    for payload in (
        encode_start("r", sample=_nested(32)),
        encode_start("r", sample=_nested(300)),  # what broke every /ws JSON client
        encode_event(0, np.zeros((2, 2), np.int32), sample=_nested(32)),
        encode_stop(1, sample=_nested(32)),
    ):
        with pytest.raises(ProtocolError) as caught:
            decode(payload)
        assert caught.value.reason == "oversized_metadata"
    with pytest.raises(ProtocolError, match="oversized_metadata"):
        decode(encode_start("r", sample=[[[]]]), Limits(max_metadata_depth=3))


def test_metadata_is_bounded_in_bytes_while_the_pixels_are_not_counted() -> None:
    big_frame = np.zeros((512, 512), np.int32)  # 1 MiB of pixels, far over the metadata budget
    assert isinstance(decode(encode_event(0, big_frame, note="x" * 60_000)), Event)
    for payload in (
        encode_start("r", padding="x" * 70_000),  # one long string
        encode_start("r", many=["x" * 100] * 700),  # many short ones
        encode_start("r" * 70_000),  # a run id is metadata too
        encode_event(0, big_frame, note="x" * 70_000),
    ):
        with pytest.raises(ProtocolError) as caught:
            decode(payload)
        assert caught.value.reason == "oversized_metadata"


def _empty_arrays(count: int, per_array: int) -> bytes:
    """A start document whose `junk` key holds `count` arrays of `per_array` empty arrays each, packed by hand
    (msgpack.packb would need the Python objects this test must show are never built)."""
    inner = b"\xdd" + per_array.to_bytes(4, "big") + b"\x90" * per_array
    head = msgpack.packb({"msg_type": "start", "run_id": "r"})
    return bytes([head[0] + 1]) + head[1:] + msgpack.packb("junk") + b"\xdd" + count.to_bytes(4, "big") + inner * count


@pytest.mark.parametrize(
    ("count", "per_array"),
    [(1, 15 * 2**20), (240, 65_536)],  # one array of 15 Mi empties; many arrays within msgpack's per-array limit
    ids=["one-huge-array", "many-arrays"],
)
def test_a_small_message_of_empty_arrays_is_refused_while_unpacking_without_building_them(
    count: int, per_array: int
) -> None:
    payload = _empty_arrays(count, per_array)  # ~15 MiB; fully unpacked it would be ~1 GB of Python lists
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError) as caught:
            decode(payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.reason == "oversized_metadata"
    assert peak < 16 * 2**20, f"unpacking held {peak / 2**20:.0f} MiB"


def test_a_message_longer_than_the_largest_frame_plus_its_metadata_is_refused_before_unpacking() -> None:
    limits = Limits(max_pixels=100, max_bytes=400, max_metadata_bytes=2048)
    assert limits.max_message_bytes == 2448
    with pytest.raises(ProtocolError) as caught:
        decode(b"\x00" * 2449, limits)
    assert caught.value.reason == "oversized"
    assert isinstance(decode(encode_event(0, np.zeros((10, 10), np.int32), note="x" * 1900), limits), Event)
