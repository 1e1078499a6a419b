"""Training: checkpoints carry everything needed to resume, the model comes back from them, and the
contrastive term on paired views pulls the two views of a state together."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from operators.model.cvae import view_contrast_loss
from operators.model.data import load_cache
from operators.model.train import TrainSettings, _epoch_batches, load_model, parse_settings, train
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


@pytest.fixture()
def tiny_pairs(tmp_path):
    """8 states seen twice: smooth random patterns, the second view dimmer and noisier."""
    stem = tmp_path / "pairs"
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 1, (8, 1, 16, 16)).repeat(32, axis=2).repeat(32, axis=3)
    gain = rng.uniform(0.6, 1.0, (8, 1, 1, 1))
    second = np.clip(base * gain + rng.normal(0, 0.05, base.shape), 0, 1)
    np.save(stem.with_suffix(".npy"), np.rint(255 * np.concatenate([base, second], axis=1)).astype(np.uint8))
    np.save(stem.with_suffix(".phases.npy"), np.arange(8, dtype=np.int64))
    stem.with_suffix(".json").write_text(json.dumps(
        {"kind": "pairs", "scenario": "test", "seed": 1, "n_pairs": 8, "preprocessing": PreprocessSpec().to_dict()}))
    return stem


def _view_contrast(checkpoint, pairs_stem) -> float:
    cache = load_cache(pairs_stem)
    with torch.no_grad():
        mu = load_model(checkpoint).encode_mean(torch.from_numpy(cache.batch(np.arange(len(cache)))))
    return float(view_contrast_loss(mu, 0.1))


def test_the_contrastive_term_pulls_the_two_views_of_each_state_together(tiny_pairs, tmp_path) -> None:
    def run(name: str, weight: float):
        s = TrainSettings(data=str(tiny_pairs), out=str(tmp_path / name), config="lite", epochs=3, batch_size=8,
                          lr=1e-3, schedule="constant", threads=1, contrast_weight=weight)
        return train(s)

    plain, contrastive = run("plain", 0.0), run("contrastive", 1e5)
    history = [json.loads(line) for line in (tmp_path / "contrastive" / "history.jsonl").read_text().splitlines()]
    assert len(history) == 6 and all("contrast" in h for h in history)  # 8 pairs, 4 a step, 3 epochs
    assert {h["lr"] for h in history} == {1e-3}
    assert _view_contrast(contrastive, tiny_pairs) < 0.5 * _view_contrast(plain, tiny_pairs)


def test_the_contrastive_term_needs_a_cache_of_pairs(tiny_cache, tmp_path) -> None:
    with pytest.raises(ValueError, match="training pairs"):
        train(TrainSettings(data=str(tiny_cache), out=str(tmp_path / "run"), config="lite", batch_size=2,
                            max_steps=1, threads=1, contrast_weight=1.0))


def test_settings_travel_to_torchrun_workers_as_a_command_line() -> None:
    s = TrainSettings(data="d", out="o", epochs=3, lr=2e-4, schedule="constant", beta=0.25, resume=True, amp=False,
                      init_from="runs/a/last.pt", contrast_weight=4000.0, max_steps=7)
    assert parse_settings(s.to_argv()) == s
    assert parse_settings(TrainSettings(data="d", out="o").to_argv()) == TrainSettings(data="d", out="o")


def test_scenario_batches_draw_every_batch_from_one_scenario_and_each_pair_at_most_once() -> None:
    groups = np.repeat([0, 1, 2], [13, 9, 6])
    batches = _epoch_batches(np.random.default_rng(3), len(groups), 4, 0, 1, groups)
    assert len(batches) == 3 + 2 + 1  # whole batches only
    assert all(len(set(groups[b])) == 1 for b in batches)
    drawn = np.concatenate(batches)
    assert len(set(drawn.tolist())) == len(drawn)
    order = [int(groups[b[0]]) for b in batches]
    assert order != sorted(order)  # scenarios take turns through the epoch


def test_distributed_ranks_take_disjoint_batches_and_the_same_number_of_steps() -> None:
    for groups in (None, np.repeat([0, 1], [11, 10])):
        shards = [_epoch_batches(np.random.default_rng(5), 21, 2, rank, 2, groups) for rank in (0, 1)]
        assert len(shards[0]) == len(shards[1]) > 0
        a, b = (set(np.concatenate(sh).tolist()) for sh in shards)
        assert not a & b
