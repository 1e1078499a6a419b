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


def test_fine_tuning_starts_from_another_runs_weights_with_a_fresh_schedule(tiny_cache, tmp_path) -> None:
    base = TrainSettings(data=str(tiny_cache), out=str(tmp_path / "base"), config="lite", epochs=4,
                         batch_size=2, max_steps=2, threads=1)
    base_ck = torch.load(train(base), map_location="cpu", weights_only=False)
    tune = TrainSettings(data=str(tiny_cache), out=str(tmp_path / "tune"), config="lite", epochs=1,
                         batch_size=2, lr=1e-4, threads=1, init_from=str(tmp_path / "base" / "last.pt"))
    tuned = torch.load(train(tune), map_location="cpu", weights_only=False)
    assert tuned["step"] == 4  # one epoch of 8 frames at batch 2: its own schedule, from step 0
    assert tuned["scheduler"]["T_max"] == 4
    assert tuned["optimizer"]["param_groups"][0]["initial_lr"] == pytest.approx(1e-4)
    # it started from the base weights: a few small steps keep it close to them, unlike a fresh init
    fresh = torch.load(train(TrainSettings(data=str(tiny_cache), out=str(tmp_path / "fresh"), config="lite",
                                           epochs=1, batch_size=2, lr=1e-4, threads=1, seed=5)),
                       map_location="cpu", weights_only=False)

    def dist(a, b):
        return sum(float((a[k].float() - b[k].float()).norm()) for k in a if a[k].is_floating_point())

    assert dist(tuned["model"], base_ck["model"]) < 0.5 * dist(fresh["model"], base_ck["model"])


def test_fine_tuning_refuses_a_checkpoint_of_another_configuration(tiny_cache, tmp_path) -> None:
    base = TrainSettings(data=str(tiny_cache), out=str(tmp_path / "base"), config="lite", epochs=1,
                         batch_size=2, max_steps=1, threads=1)
    ck = torch.load(train(base), map_location="cpu", weights_only=False)
    ck["config"]["latent_dim"] = 7
    torch.save(ck, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="different model configuration"):
        train(TrainSettings(data=str(tiny_cache), out=str(tmp_path / "tune"), config="lite", epochs=1,
                            batch_size=2, max_steps=1, threads=1, init_from=str(tmp_path / "other.pt")))
