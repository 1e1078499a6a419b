"""The projection approximator without PyTorch: scikit-learn's MLPRegressor, exported as a plain ONNX graph.

The graph does what `operators.projection.fit_approximator`'s torch module does, so `OnnxProjector` serves
it unchanged: input `latent` (B, D) float32 -> L2-normalise -> standardise -> Linear/ReLU ... Linear ->
un-standardise -> output `xy` (B, 2). It is built with the `onnx` package's helpers (opset 17, where
ReduceL2 takes its axes as an attribute), not converted, so nothing but numpy weights goes in.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from operators.projection import l2_normalise

log = logging.getLogger(__name__)

OPSET = 17
IR_VERSION = 8  # loads in every onnxruntime the project allows (>= 1.20)


@dataclass(frozen=True)
class MlpApproximator:
    """Weights of latent -> 2 in serving order: x_std = (l2(x) - mu) / sd; y = mlp(x_std) * ysd + ymu."""

    mu: np.ndarray
    sd: np.ndarray
    ymu: np.ndarray
    ysd: np.ndarray
    weights: list[np.ndarray]
    biases: list[np.ndarray]

    def predict(self, latents: np.ndarray) -> np.ndarray:
        """The same arithmetic as the ONNX graph, in numpy (for checks before export)."""
        h = (l2_normalise(latents) - self.mu) / self.sd
        for k, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = h @ w + b
            if k < len(self.weights) - 1:
                h = np.maximum(h, 0.0)
        return (h * self.ysd + self.ymu).astype(np.float32)


def fit_mlp_approximator(
    latents: np.ndarray,
    embedding: np.ndarray,
    *,
    hidden: tuple[int, ...] = (256, 128),
    max_iter: int = 2000,
    seed: int = 0,
) -> MlpApproximator:
    """Fit the MLP on (latents, their UMAP embedding); the caller checks it against umap-learn's transform."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPRegressor

    x = l2_normalise(latents).astype(np.float64)
    y = np.asarray(embedding, np.float64)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    ymu, ysd = y.mean(0), y.std(0) + 1e-6
    mlp = MLPRegressor(hidden_layer_sizes=hidden, activation="relu", solver="adam", alpha=1e-4,
                       learning_rate_init=2e-3, batch_size=min(256, len(x)), max_iter=max_iter,
                       tol=1e-6, n_iter_no_change=50, random_state=seed)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # few points: it stops at max_iter, that is fine
        mlp.fit((x - mu) / sd, (y - ymu) / ysd)
    log.info("projection approximator: %d iterations, training loss %.2e", mlp.n_iter_, mlp.loss_)
    f32 = np.float32
    return MlpApproximator(mu.astype(f32), sd.astype(f32), ymu.astype(f32), ysd.astype(f32),
                           [w.astype(f32) for w in mlp.coefs_], [b.astype(f32) for b in mlp.intercepts_])  # fmt: skip


def export_mlp_onnx(approx: MlpApproximator, path: Path) -> Path:
    """Write the approximator as an ONNX graph `latent` (B, D) -> `xy` (B, 2)."""
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(np.asarray(v, np.float32), name) for name, v in
             (("mu", approx.mu), ("sd", approx.sd), ("ymu", approx.ymu), ("ysd", approx.ysd),
              ("eps", np.float32(1e-12)))]  # fmt: skip
    nodes = [
        helper.make_node("ReduceL2", ["latent"], ["norm"], axes=[-1], keepdims=1),
        helper.make_node("Max", ["norm", "eps"], ["norm_safe"]),
        helper.make_node("Div", ["latent", "norm_safe"], ["unit"]),
        helper.make_node("Sub", ["unit", "mu"], ["centred"]),
        helper.make_node("Div", ["centred", "sd"], ["h0"]),
    ]
    last = len(approx.weights) - 1
    for k, (w, b) in enumerate(zip(approx.weights, approx.biases, strict=True)):
        inits += [numpy_helper.from_array(w, f"w{k}"), numpy_helper.from_array(b, f"b{k}")]
        nodes.append(helper.make_node("Gemm", [f"h{k}", f"w{k}", f"b{k}"], [f"z{k}"]))
        out = f"h{k + 1}" if k < last else "y_std"
        nodes.append(helper.make_node("Relu", [f"z{k}"], [out]) if k < last else
                     helper.make_node("Identity", [f"z{k}"], [out]))  # fmt: skip
    nodes += [helper.make_node("Mul", ["y_std", "ysd"], ["y_scaled"]),
              helper.make_node("Add", ["y_scaled", "ymu"], ["xy"])]  # fmt: skip
    return _save(nodes, inits, int(approx.mu.shape[0]), path, "umap_mlp_approximator")


def _save(nodes: list, inits: list, dim: int, path: Path, name: str) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("latent", TensorProto.FLOAT, ["batch", dim])],
        [helper.make_tensor_value_info("xy", TensorProto.FLOAT, ["batch", 2])],
        initializer=inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="latent-stream adapt")  # fmt: skip
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return Path(path)


@dataclass(frozen=True)
class KernelApproximator:
    """latent -> softmax(beta * cosine similarity to the fitted frames) @ their UMAP positions.

    umap-learn's `transform` starts a new point at the membership-weighted mean of its nearest fitted
    neighbours' positions; this is that placement with a softmax in place of the fuzzy weights, its sharpness
    `beta` chosen by leave-one-out on the fitted frames. A fitted frame maps (nearly) onto its own position.
    """

    keys: np.ndarray  # (N, D) L2-normalised latents of the fitted frames
    values: np.ndarray  # (N, 2) their UMAP positions
    beta: float

    def predict(self, latents: np.ndarray) -> np.ndarray:
        return _soft_neighbours(l2_normalise(latents) @ self.keys.T, self.values, self.beta)


def _soft_neighbours(sims: np.ndarray, values: np.ndarray, beta: float) -> np.ndarray:
    logits = beta * sims.astype(np.float64)
    logits -= logits.max(1, keepdims=True)
    w = np.exp(logits)
    w /= w.sum(1, keepdims=True)
    return (w @ values).astype(np.float32)


BETAS = (5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0)


def fit_kernel_approximator(latents: np.ndarray, embedding: np.ndarray) -> KernelApproximator:
    keys = l2_normalise(latents)
    values = np.asarray(embedding, np.float32)
    sims = keys @ keys.T
    np.fill_diagonal(sims, -np.inf)  # leave one out: each frame placed by the others
    errors = [
        float(np.sqrt(((_soft_neighbours(sims, values, b) - values) ** 2).sum(1).mean())) for b in BETAS
    ]
    beta = BETAS[int(np.argmin(errors))]
    log.info("kernel approximator: beta %g (leave-one-out rms %.3f)", beta, min(errors))
    return KernelApproximator(keys, values, beta)


def export_kernel_onnx(approx: KernelApproximator, path: Path) -> Path:
    """Write the kernel approximator as an ONNX graph `latent` (B, D) -> `xy` (B, 2)."""
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(np.asarray(v, np.float32), name) for name, v in
             (("keys_t", approx.keys.T), ("values", approx.values), ("beta", np.float32(approx.beta)),
              ("eps", np.float32(1e-12)))]  # fmt: skip
    nodes = [
        helper.make_node("ReduceL2", ["latent"], ["norm"], axes=[-1], keepdims=1),
        helper.make_node("Max", ["norm", "eps"], ["norm_safe"]),
        helper.make_node("Div", ["latent", "norm_safe"], ["unit"]),
        helper.make_node("MatMul", ["unit", "keys_t"], ["sims"]),
        helper.make_node("Mul", ["sims", "beta"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["weights"], axis=-1),
        helper.make_node("MatMul", ["weights", "values"], ["xy"]),
    ]
    return _save(nodes, inits, int(approx.keys.shape[1]), path, "umap_kernel_approximator")
