"""The C-VAE: the paper's size, the lite encoder's shapes, and exports that match PyTorch."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from operators.model.cvae import (
    CONFIGS,
    CVAEConfig,
    WindowAttentionBlock,
    build,
    count_parameters,
    vae_loss,
    view_contrast_loss,
)


def test_paper_config_has_about_123m_parameters() -> None:
    with torch.device("meta"):  # count without allocating 0.5 GB
        model = build("paper")
    n = count_parameters(model)
    assert 110e6 <= n <= 135e6, n
    cfg = CONFIGS["paper"]
    assert (cfg.depth, cfg.input_size, cfg.latent_dim, cfg.beta) == (5, 512, 512, 0.5)


def test_lite_forward_gives_reconstruction_mean_and_logvar() -> None:
    torch.manual_seed(0)
    model = build("lite")
    x = torch.rand(2, 1, 512, 512)
    logits, mu, logvar = model(x)
    assert logits.shape == x.shape and mu.shape == (2, 512) and logvar.shape == (2, 512)
    loss, recon, kl = vae_loss(logits, x, mu, logvar, beta=0.5)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(recon.item() + 0.5 * kl.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_eval_mode_encodes_the_mean_deterministically() -> None:
    model = build("lite").eval()
    x = torch.rand(1, 1, 512, 512)
    with torch.no_grad():
        _, mu, _ = model(x)
        assert torch.equal(model.encode_mean(x), mu)
        assert torch.equal(model.encode_mean(x), model.encode_mean(x))


def test_shifted_window_attention_keeps_windows_apart_across_the_wraparound() -> None:
    blk = WindowAttentionBlock(dim=16, size=8, window=4, heads=2, shift=2, mlp_ratio=1.0)
    mask = blk.attn_mask
    assert mask.shape == (4, 16, 16)
    assert (mask[0] == 0).all()  # the top-left window never wraps
    assert (mask[-1] < 0).any()  # the bottom-right one mixes wrapped regions and must mask them


def test_config_round_trips_through_a_dict() -> None:
    cfg = CONFIGS["lite"]
    assert CVAEConfig.from_dict(cfg.to_dict()) == cfg


def test_onnx_and_torchscript_exports_match_pytorch(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from operators.model.export import ENCODER_ONNX, ENCODER_STATIC_ONNX, ENCODER_TORCHSCRIPT, export_all

    torch.manual_seed(0)
    model = build("lite").eval()
    res = export_all(model, tmp_path, torchscript=True)
    assert set(res.parity) == {ENCODER_ONNX, ENCODER_STATIC_ONNX, ENCODER_TORCHSCRIPT}
    for name, err in res.parity.items():
        assert err < 1e-4, (name, err)

    import onnxruntime as ort

    static = ort.InferenceSession(str(tmp_path / ENCODER_STATIC_ONNX), providers=["CPUExecutionProvider"])
    assert static.get_inputs()[0].shape == [1, 1, 512, 512]
    dyn = ort.InferenceSession(str(tmp_path / ENCODER_ONNX), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((3, 1, 512, 512), dtype=np.float32)
    out = dyn.run(None, {"image": x})[0]
    assert out.shape == (3, 512)  # the batch axis is dynamic
    with torch.no_grad():
        ref = model.encode_mean(torch.from_numpy(x)).numpy()
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-4


def test_view_contrast_loss_is_low_when_each_view_lies_closest_to_its_partner() -> None:
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(8, 32, generator=g)
    near = torch.cat([mu, 3.0 * mu + 0.05 * torch.randn(8, 32, generator=g)])  # scale does not matter
    swapped = torch.cat([mu, mu.roll(1, dims=0)])  # every view's nearest latent is another sample's
    assert view_contrast_loss(near, 0.1) < 0.01
    assert view_contrast_loss(swapped, 0.1) > 5.0
