"""The preprocessing as an ONNX graph, fused with the encoder: raw frames in, latent means out, one session.

Where the encoder runs on a GPU, the raw frame (B, H, W) of the detector's dtype is bound from host memory,
crosses PCIe once, and masking, binning, log1p and the percentile window run on the device before the
encoder, in the same session. The graph does what `operators.preprocess.Preprocessor` does (that numpy/numba
code is the reference, and stays the path on the CPU, where it is faster); it is built with `onnx.helper`
for one frame shape and dtype, since the bins and the static mask depend on the shape, and kept for the last
few shapes like the Preprocessor's plans.

Arithmetic is float32 after one Cast on the device. Integer frames below 2**24 are cast exactly, every bin's
sum of at most 16 valid counts below the saturation (10**6) stays exact, so the masks and sums match the
reference; what differs is float32 against float64 rounding in the mean, log and window (within 1e-6 of the
[0, 1] output: tests/test_device_preprocess.py).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from operators.preprocess import Preprocessor, PreprocessSpec, as_frame, detector_mask

log = logging.getLogger(__name__)

INPUT = "pre.frame"
OUTPUT = "pre.image"
MIN_OPSET = 13  # ReduceSum, Unsqueeze, Pad and Clip take their axes / pads / bounds as inputs from 13 on
# One fused session holds a copy of the encoder's weights (9 MB lite, 0.5 GB paper): keep as many shapes as
# the Preprocessor keeps plans, the most recently used.
SESSIONS_KEPT = 4


def check_frame(image: np.ndarray) -> np.ndarray:
    """The frame as the graph takes it, (H, W) native-endian numeric; PreprocessError as Preprocessor raises."""
    img = as_frame(image)
    if not img.dtype.isnative:  # e.g. big-endian from a file: ONNX Runtime reads native byte order
        img = img.astype(img.dtype.newbyteorder("="))
    return img


def bin_index(n: int, bins: int) -> np.ndarray:
    """(bins, k) source rows of each output bin, as Preprocessor's plan assigns them (index n: a zero row)."""
    owner = np.arange(n) * bins // n
    counts = np.bincount(owner, minlength=bins)
    idx = np.full((bins, int(counts.max())), n, np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for j in range(idx.shape[1]):
        idx[counts > j, j] = starts[counts > j] + j
    return idx


def _linear_taps(n: int, out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """cv2.resize INTER_LINEAR along one axis as two taps per output (indices, weights): read off cv2 itself."""
    weights = cv2.resize(np.eye(n, dtype=np.float32), (n, out), interpolation=cv2.INTER_LINEAR)
    nz = weights != 0
    first = nz.argmax(1)
    last = n - 1 - nz[:, ::-1].argmax(1)
    rows = np.arange(out)
    w0 = weights[rows, first]
    w1 = np.where(last != first, weights[rows, last], 0.0).astype(np.float32)
    if nz.sum(1).max() > 2:
        raise AssertionError("cv2's linear resize used more than two taps")
    return first.astype(np.int64), last.astype(np.int64), w0.astype(np.float32), w1


def _nearest_index(n: int, out: int) -> np.ndarray:
    """cv2.resize INTER_NEAREST along one axis: the source index of each output, read off cv2 itself."""
    src = np.arange(n, dtype=np.float32)[None, :]
    return cv2.resize(src, (out, 1), interpolation=cv2.INTER_NEAREST)[0].astype(np.int64)


class _Graph:
    """Nodes and initializers of the preprocessing graph; every name is prefixed so the fused graph keeps them."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._n = 0

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        from onnx import numpy_helper

        name = f"pre.c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs: Any) -> Any:
        from onnx import helper

        self._n += 1
        names = [f"pre.{op_type.lower()}{self._n}_{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=f"pre.{op_type}{self._n}", **attrs))
        return names[0] if outputs == 1 else names


def preprocess_graph(spec: PreprocessSpec, shape: tuple[int, int], dtype: np.dtype, *,
                     static_mask: np.ndarray | None = None, opset: int = 18, ir_version: int = 8) -> Any:
    """The ONNX model `pre.frame` (B, H, W) of ``dtype`` -> `pre.image` (B, 1, S, S) float32, as Preprocessor.

    ``static_mask`` (True = masked) defaults to the spec's detector mask; it applies when it has this shape.
    """
    import onnx
    from onnx import TensorProto, helper

    if opset < MIN_OPSET:
        raise ValueError(f"the preprocessing graph needs opset >= {MIN_OPSET}, not {opset}")
    reference = Preprocessor(spec, static_mask=static_mask)  # checks the spec's modes, gives the geometry
    if static_mask is None:
        static_mask = detector_mask(spec.detector)
    h, w = shape
    s = spec.size
    nh, nw, top, left = reference.geometry(shape)
    bh, bw = min(nh, h), min(nw, w)
    g = _Graph()
    f32 = g.const(0.0)

    # 1. mask: negative, saturated, statically masked and hot pixels (as _bin_band, in float32)
    x = g.op("Cast", INPUT, to=TensorProto.FLOAT)
    valid = g.op("And", g.op("GreaterOrEqual", x, f32), g.op("Less", x, g.const(spec.saturation)))
    if static_mask is not None and static_mask.shape == shape:
        valid = g.op("And", valid, g.const(~np.asarray(static_mask, bool), np.bool_))
    padded = g.op("Pad", x, g.const([0, 0, 1, 0, 0, 1], np.int64), f32)
    axis2 = g.const([2], np.int64)
    left_nb = g.op("Slice", padded, g.const([0], np.int64), g.const([w], np.int64), axis2)
    right_nb = g.op("Slice", padded, g.const([2], np.int64), g.const([w + 2], np.int64), axis2)
    brighter = g.op("Max", left_nb, right_nb, f32)  # a missing neighbour counts 0, as in the kernel
    floor = g.const(spec.hot_floor)
    threshold = g.op("Add", g.op("Mul", brighter, g.const(spec.hot_ratio)), floor)
    hot = g.op("And", g.op("Greater", x, threshold), g.op("Greater", x, floor))
    valid = g.op("And", valid, g.op("Not", hot))

    # 2. mask-aware box binning: the valid pixels' sum and count per bin, by gathering each bin's rows, then
    # columns (padded with one zero row / column for the shorter bins) and summing: exact, and ~H*W work, not
    # the H*W*bins of a matmul with 0/1 bin matrices
    summed = g.op("Where", valid, x, f32)  # Where, not Mul: a NaN pixel must not poison its bin
    counted = g.op("Cast", valid, to=TensorProto.FLOAT)
    axis1 = g.const([1], np.int64)
    both = g.op("Concat", g.op("Unsqueeze", summed, axis1), g.op("Unsqueeze", counted, axis1), axis=1)
    rows = g.op("Pad", both, g.const([0, 0, 0, 0, 0, 0, 1, 0], np.int64), f32)  # (B, 2, H + 1, W)
    rows = g.op("ReduceSum", g.op("Gather", rows, g.const(bin_index(h, bh), np.int64), axis=2),
                g.const([3], np.int64), keepdims=0)  # (B, 2, bh, W)
    cols = g.op("Pad", rows, g.const([0, 0, 0, 0, 0, 0, 0, 1], np.int64), f32)
    sums = g.op("ReduceSum", g.op("Gather", cols, g.const(bin_index(w, bw), np.int64), axis=3),
                g.const([4], np.int64), keepdims=0)  # (B, 2, bh, bw)
    num, den = g.op("Split", sums, g.const([1, 1], np.int64), axis=1, outputs=2)  # (B, 1, bh, bw) each
    ok = g.op("Greater", den, f32)
    ratio = g.op("Div", num, g.op("Max", den, g.const(1.0)))
    mean = g.op("Where", ok, g.op("Log", g.op("Add", ratio, g.const(1.0))), f32)  # log1p of the bin's mean

    if (bh, bw) != (nh, nw):  # a frame smaller than the model input: cv2's linear / nearest resize, as the reference
        for axis, n, out in ((2, bh, nh), (3, bw, nw)):
            i0, i1, w0, w1 = _linear_taps(n, out)
            taps = [1, 1, 1, 1]
            taps[axis] = out
            mean = g.op("Add", g.op("Mul", g.op("Gather", mean, g.const(i0, np.int64), axis=axis),
                                    g.const(w0.reshape(taps))),
                        g.op("Mul", g.op("Gather", mean, g.const(i1, np.int64), axis=axis),
                             g.const(w1.reshape(taps))))
            ok = g.op("Gather", ok, g.const(_nearest_index(n, out), np.int64), axis=axis)

    # 3. the percentile window of every stride-th bin's valid mean (np.percentile's linear definition): masked
    # samples sort last as +inf, so the first n of the ascending sort are the valid ones
    axes23 = g.const([2, 3], np.int64)
    stride = spec.percentile_stride
    step = (g.const([0, 0], np.int64), g.const([nh, nw], np.int64), axes23, g.const([stride, stride], np.int64))
    flat = g.const([0, -1], np.int64)
    sample_ok = g.op("Reshape", g.op("Slice", ok, *step), flat)
    sample = g.op("Where", sample_ok, g.op("Reshape", g.op("Slice", mean, *step), flat), g.const(np.inf))
    size = len(range(0, nh, stride)) * len(range(0, nw, stride))
    ordered, _ = g.op("TopK", sample, g.const([size], np.int64), axis=1, largest=0, sorted=1, outputs=2)
    n = g.op("ReduceSum", g.op("Cast", sample_ok, to=TensorProto.FLOAT), axis1, keepdims=1)  # (B, 1)
    # the sample's positions in float64, as numpy: in float32 the 99.9th's position (~2e4) is off by ~1e-3
    last = g.op("Max", g.op("Sub", g.op("Cast", n, to=TensorProto.DOUBLE), g.const(1.0, np.float64)),
                g.const(0.0, np.float64))

    def percentile(q: float) -> str:
        pos = g.op("Mul", last, g.const(q / 100.0, np.float64))
        below = g.op("Floor", pos)
        above = g.op("Min", g.op("Add", below, g.const(1.0, np.float64)), last)
        a = g.op("GatherElements", ordered, g.op("Cast", below, to=TensorProto.INT64), axis=1)
        b = g.op("GatherElements", ordered, g.op("Cast", above, to=TensorProto.INT64), axis=1)
        frac = g.op("Cast", g.op("Sub", pos, below), to=TensorProto.FLOAT)
        return g.op("Add", a, g.op("Mul", g.op("Sub", b, a), frac))

    lo, hi = percentile(spec.low_percentile), percentile(spec.high_percentile)
    any_valid = g.op("Greater", n, f32)
    spread = g.op("And", any_valid, g.op("Greater", hi, lo))  # else the frame maps to 0, as the reference
    scale = g.op("Where", spread, g.op("Reciprocal", g.op("Where", spread, g.op("Sub", hi, lo), g.const(1.0))), f32)
    lo = g.op("Where", any_valid, lo, f32)  # no valid sample: lo is +inf, and must not make NaNs
    window = g.op("Clip", g.op("Mul", g.op("Sub", mean, g.op("Unsqueeze", lo, axes23)),
                               g.op("Unsqueeze", scale, axes23)), f32, g.const(1.0))
    image = g.op("Where", ok, window, f32)
    g.nodes.append(helper.make_node("Pad", [image, g.const([0, 0, top, left, 0, 0, s - nh - top, s - nw - left],
                                                           np.int64), f32], [OUTPUT], name="pre.canvas"))
    graph = helper.make_graph(
        g.nodes, f"preprocess_{h}x{w}_{np.dtype(dtype).name}",
        [helper.make_tensor_value_info(INPUT, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), ["batch", h, w])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", 1, s, s])],
        initializer=g.inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="latent-stream device preprocessing")  # fmt: skip
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model


def fuse(preprocess: Any, encoder: Any) -> Any:
    """One model: the preprocessing graph's output feeds the encoder's input; raw frames in, its outputs out."""
    from onnx import compose

    return compose.merge_models(preprocess, encoder, io_map=[(OUTPUT, encoder.graph.input[0].name)],
                                producer_name="latent-stream fused encoder")


def side_by_side(first: Any, second: Any) -> Any:
    """One model of two that read the same input: ``first``'s outputs, then ``second``'s (names prefixed)."""
    from onnx import compose, helper

    second = compose.add_prefix(second, "features.")
    shared, theirs = first.graph.input[0].name, second.graph.input[0].name
    nodes = list(second.graph.node)
    for node in nodes:
        node.input[:] = [shared if name == theirs else name for name in node.input]
    graph = helper.make_graph(
        list(first.graph.node) + nodes, "encoder and cluster features", [first.graph.input[0]],
        list(first.graph.output) + list(second.graph.output),
        initializer=list(first.graph.initializer) + list(second.graph.initializer),
        value_info=list(first.graph.value_info) + list(second.graph.value_info))
    opsets = {o.domain: o for o in [*second.opset_import, *first.opset_import]}
    model = helper.make_model(graph, opset_imports=list(opsets.values()),
                              functions=list(first.functions) + list(second.functions))
    model.ir_version = max(first.ir_version, second.ir_version)
    return model


class SessionRunner(Protocol):
    """What the fused encoder needs of `operators.bundle.OnnxEncoder`: sessions on its providers, runs on its
    device (IO binding on a GPU)."""

    device: str

    def new_session(self, model: bytes | Path) -> Any: ...

    def run(self, session: Any, x: np.ndarray) -> list[np.ndarray]: ...


class FusedEncoder:
    """encode_frames(raw frames) -> (latents, features): preprocessing, encoder and the bundle's cluster feature
    graph (``features_path``; without one the features are the latents) in one session.

    A session is built per (shape, dtype) when a frame first has it (logged, with the time it took) and the
    last `SESSIONS_KEPT` are kept. A batch of mixed shapes runs as one call per shape, in frame order.
    """

    def __init__(self, runner: SessionRunner, encoder_path: Path, spec: PreprocessSpec, *,
                 static_mask: np.ndarray | None = None, features_path: Path | None = None) -> None:
        self.runner = runner
        self.encoder_path = Path(encoder_path)
        self.features_path = features_path
        self.spec = spec
        self._static_mask = static_mask
        self._session: Callable[[tuple[int, int], str], Any] = functools.lru_cache(SESSIONS_KEPT)(self._build)

    def _build(self, shape: tuple[int, int], dtype: str) -> Any:
        import onnx

        t0 = time.perf_counter()
        encoder = onnx.load(str(self.encoder_path))
        if self.features_path is not None:
            encoder = side_by_side(encoder, onnx.load(str(self.features_path)))
        opset = next(o.version for o in encoder.opset_import if o.domain in ("", "ai.onnx"))
        pre = preprocess_graph(self.spec, shape, np.dtype(dtype), static_mask=self._static_mask, opset=opset,
                               ir_version=encoder.ir_version)
        session = self.runner.new_session(fuse(pre, encoder).SerializeToString())
        log.info("device preprocessing for %dx%d %s frames on %s: fused session built in %.1f s", *shape,
                 dtype, self.runner.device, time.perf_counter() - t0)
        return session

    def prepare(self, shape: tuple[int, int], dtype: np.dtype) -> None:
        """Build (or keep) the session of this frame shape and dtype before the first such frame arrives."""
        self._session(tuple(shape), np.dtype(dtype).str)

    def encode_frames(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        frames = [check_frame(im) for im in images]
        groups: dict[tuple[tuple[int, int], str], list[int]] = {}
        for i, f in enumerate(frames):
            groups.setdefault((f.shape, f.dtype.str), []).append(i)
        out: list[np.ndarray] = []
        for (shape, dtype), members in groups.items():
            # one frame is bound in place; a batch is stacked once on the host, then copied to the device once
            batch = frames[members[0]][None] if len(members) == 1 else np.stack([frames[i] for i in members])
            results = self.runner.run(self._session(shape, dtype), np.ascontiguousarray(batch))
            if not out:
                out = [np.empty((len(frames), r.shape[1]), np.float32) for r in results]
            for o, r in zip(out, results, strict=True):
                o[members] = r
        if not out:
            raise ValueError("no frames to encode")
        return out[0], out[-1]
