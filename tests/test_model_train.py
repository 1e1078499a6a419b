"""Training: checkpoints carry everything needed to resume, and the model comes back from them."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from operators.model.train import TrainSettings, load_model, train
from operators.preprocess import PreprocessSpec


@pytest.fixture()
def tiny_cache(tmp_path):
    stem = tmp_path / "cache"
    rng = np.random.default_rng(0)
    np.save(stem.with_suffix(".npy"), rng.integers(0, 255, (8, 512, 512), dtype=np.uint8))
    np.save(stem.with_suffix(".phases.npy"), np.zeros(8, np.int64))
    stem.with_suffix(".json").write_text(json.dumps(
        {"scenario": "test", "seed": 0, "n_frames": 8, "preprocessing": PreprocessSpec().to_dict(),
         "phase_names": {"0": "noise"}}))
    return stem


def test_training_resumes_from_its_checkpoint(tiny_cache, tmp_path) -> None:
    out = tmp_path / "run"
    s = TrainSettings(data=str(tiny_cache), out=str(out), config="lite", epochs=4, batch_size=2,
                      max_steps=2, threads=1)
    ck = train(s)
    first = torch.load(ck, map_location="cpu", weights_only=False)
    assert first["step"] == 2 and first["config"]["name"] == "lite"
    s.max_steps, s.resume = 3, True
    second = torch.load(train(s), map_location="cpu", weights_only=False)
    assert second["step"] == 3
    assert second["scheduler"]["last_epoch"] == 3  # the schedule continued, not restarted
    changed = [k for k, v in first["model"].items() if not torch.equal(v, second["model"][k])]
    assert changed
    model = load_model(ck)
    assert not model.training and model.cfg.name == "lite"
