"""`generate_scan`: stream synthetic detector frames of a scenario, with ground-truth phases."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from stream.detector import PILATUS3_2M, Detector
from stream.synthetic.scenarios import (
    _SCENARIOS,
    SCENARIOS,
    TRAINING_PHASES,
    ScenarioSpec,
    Variation,
    _Scenario,
    scenario_id,
)
from stream.synthetic.scene import Renderer, ScanGeometry, Scene

log = logging.getLogger(__name__)

BEAM_JITTER_PX = 3  # beam-centre wander between scans (and between training frames)
FLUX_RANGE = (0.5, 2.0)  # per-scan exposure x beam-current factor (log-uniform)
TRAINING_FLUX_RANGE = (0.3, 3.0)
FLUX_FLICKER = 0.02  # frame-to-frame beam-intensity fluctuation (relative, 1 sigma)
_PAIRS_STREAM = 4242  # random-stream id of training pairs, apart from every scenario's
_PILATUS_PIXELS = PILATUS3_2M.height * PILATUS3_2M.width


@dataclass(frozen=True)
class SyntheticFrame:
    """One synthetic detector frame with its ground truth.

    image: int32 (H, W) counts; gap pixels are -1 (as PILATUS writes them), dead pixels 0.
    phase: the dominant phase's id (index into SCENARIOS[scenario].phases); phase_name: its name.
    t: seconds since scan start. geometry: the frame's beam centre, distance, wavelength, flux.
    """

    image: np.ndarray
    index: int
    phase: int
    phase_name: str
    t: float
    geometry: ScanGeometry | None = None


def phase_labels(scenario: str, n_frames: int) -> list[int]:
    """Ground-truth phase ids of a scan's frames, without rendering (training: not defined)."""
    spec = _spec(scenario)
    if not spec.boundaries and len(spec.phases) > 1:
        raise ValueError("training frames draw their phase at random; render them to get labels")
    return [spec.phase_at(i, n_frames) for i in range(n_frames)]


def generate_scan(
    scenario: str,
    n_frames: int,
    *,
    seed: int = 0,
    detector: Detector = PILATUS3_2M,
    frame_period_s: float = 0.1,
) -> Iterator[SyntheticFrame]:
    """Yield `n_frames` frames of `scenario` (a key of SCENARIOS), deterministic in `seed`.

    Nuisance parameters (beam centre, flux, feature positions and widths, hot and dead pixels) are
    drawn per seed; the noise of frame i depends only on (seed, i). "training" draws an independent
    random phase and nuisance set for every frame.
    """
    _spec(scenario)  # validated eagerly: a bad name fails at the call, not at the first next()
    if n_frames < 0:
        raise ValueError(f"n_frames must be >= 0, got {n_frames}")
    if not frame_period_s > 0:
        raise ValueError(f"frame_period_s must be > 0, got {frame_period_s}")
    renderer = Renderer(detector)
    log.debug("synthetic scan %s: %d frames, seed %d, detector %s", scenario, n_frames, seed, detector.name)
    if scenario == "training":
        return _training_frames(renderer, n_frames, seed, frame_period_s)
    return _scenario_frames(_SCENARIOS[scenario], renderer, n_frames, seed, frame_period_s)


def _spec(scenario: str) -> ScenarioSpec:
    try:
        return SCENARIOS[scenario]
    except KeyError:
        valid = ", ".join(sorted(SCENARIOS))
        raise ValueError(f"unknown scenario {scenario!r}; valid scenarios: {valid}") from None


def _scenario_frames(
    sc: _Scenario, renderer: Renderer, n: int, seed: int, period: float
) -> Iterator[SyntheticFrame]:
    spec, det = sc.spec, renderer.detector
    sid = scenario_id(spec.name)
    rng = np.random.default_rng([seed, sid])
    variation = Variation.draw(rng)
    jitter = tuple(int(j) for j in rng.integers(-BEAM_JITTER_PX, BEAM_JITTER_PX + 1, size=2))
    flux = float(np.exp(rng.uniform(*np.log(FLUX_RANGE))))
    hot, dead = draw_defects(rng, det)
    assert spec.geometry is not None
    base = spec.geometry.realise(det, jitter, flux)  # type: ignore[arg-type]
    edges = [0.0, *(b * n for b in spec.boundaries), float(n)]
    fade = min(8.0, max(2.0, sc.fade_fraction * n))
    for i in range(n):
        phase = spec.phase_at(i, n)
        frame_rng = np.random.default_rng([seed, sid, i])
        geom = _with_flux(base, flux * max(0.5, 1.0 + FLUX_FLICKER * frame_rng.standard_normal()))
        scene = _scene_at(sc, i, phase, edges, fade, variation, geom, det)
        image = renderer.render(scene, geom, seed=seed ^ sid, index=i, hot=hot, dead=dead)
        yield SyntheticFrame(image, i, phase, spec.phases[phase], i * period, geom)


def _scene_at(
    sc: _Scenario,
    i: int,
    phase: int,
    edges: list[float],
    fade: float,
    v: Variation,
    g: ScanGeometry,
    det: Detector,
) -> Scene:
    """The scene of frame i: its phase's state at its progress, cross-faded with the neighbouring
    phase near a boundary (w = 0.5 exactly at the boundary)."""

    def state(k: int) -> Scene:
        lo, hi = edges[k], edges[k + 1]
        p = min(1.0, max(0.0, (i - lo) / (hi - lo))) if hi > lo else 0.0
        return sc.scene(k, p, v, g, det)

    scene = state(phase)
    n_phases = len(sc.spec.phases)
    if phase + 1 < n_phases and edges[phase + 1] - i < fade / 2:  # approaching the next boundary
        w = _smoothstep((i - edges[phase + 1]) / fade + 0.5)
        scene = Scene.blend(scene, state(phase + 1), w)
    elif phase > 0 and i - edges[phase] < fade / 2:  # just past a boundary
        w = _smoothstep((i - edges[phase]) / fade + 0.5)
        scene = Scene.blend(state(phase - 1), scene, w)
    return scene


def generate_training_pairs(
    n_pairs: int, *, seed: int = 0, detector: Detector = PILATUS3_2M
) -> Iterator[tuple[SyntheticFrame, SyntheticFrame]]:
    """Yield `n_pairs` pairs of training frames: one sample state seen under two nuisance draws.

    The two views share the scenario, phase, progress, coexistence, feature positions, widths and
    orientation; each has its own feature amplitudes, flux, beam-centre jitter, hot and dead pixels and
    counting noise. Training the encoder to map both views to one latent (a contrastive term) teaches it
    that amplitude drift is not a change of state, which is what separates a weak new feature (the
    aggregate arch of film formation) from the fading of an old one. Phase ids are TRAINING_PHASES indices.
    """
    if n_pairs < 0:
        raise ValueError(f"n_pairs must be >= 0, got {n_pairs}")
    renderer = Renderer(detector)
    names = SCENARIOS["training"].phases
    for i in range(n_pairs):
        rng = np.random.default_rng([seed, _PAIRS_STREAM, i])
        gid = int(rng.integers(len(TRAINING_PHASES)))
        state = _TrainingState.draw(rng, gid, Variation.draw(rng))
        views = []
        for view in (0, 1):
            variation = state.variation.with_new_amps(rng)
            geom = _training_geometry(rng, state.scenario, detector)
            hot, dead = draw_defects(rng, detector)
            scene = replace(state, variation=variation).scene(geom, detector)
            image = renderer.render(scene, geom, seed=seed * 2 + view, index=i, hot=hot, dead=dead)
            views.append(SyntheticFrame(image, i, gid, names[gid], 0.0, geom))
        yield views[0], views[1]


@dataclass(frozen=True)
class _TrainingState:
    """A random state of one phase of one scenario: what a training frame shows, before nuisance."""

    scenario: _Scenario
    phase: int
    progress: float
    variation: Variation
    blend: tuple[int, float, float] | None  # coexistence: (other phase, its progress, its volume fraction)

    @staticmethod
    def draw(rng: np.random.Generator, gid: int, variation: Variation) -> _TrainingState:
        name, phase = TRAINING_PHASES[gid]
        sc = _SCENARIOS[name]
        progress = float(rng.uniform())
        n_phases = len(sc.spec.phases)
        blend = None
        if n_phases > 1 and rng.uniform() < 0.25:  # coexistence with a neighbour, still dominant
            other = phase + 1 if phase == 0 or (phase + 1 < n_phases and rng.uniform() < 0.5) else phase - 1
            blend = (other, 0.0 if other > phase else 1.0, float(rng.uniform(0.0, 0.45)))
        return _TrainingState(sc, phase, progress, variation, blend)

    def scene(self, geom: ScanGeometry, det: Detector) -> Scene:
        scene = self.scenario.scene(self.phase, self.progress, self.variation, geom, det)
        if self.blend is None:
            return scene
        other, p_other, w = self.blend
        return Scene.blend(scene, self.scenario.scene(other, p_other, self.variation, geom, det), w)


def _training_geometry(rng: np.random.Generator, sc: _Scenario, det: Detector) -> ScanGeometry:
    jitter = tuple(int(j) for j in rng.integers(-BEAM_JITTER_PX, BEAM_JITTER_PX + 1, size=2))
    flux = float(np.exp(rng.uniform(*np.log(TRAINING_FLUX_RANGE))))
    return sc.spec.geometry.realise(det, jitter, flux)  # type: ignore[union-attr,arg-type]


def _training_frames(renderer: Renderer, n: int, seed: int, period: float) -> Iterator[SyntheticFrame]:
    det = renderer.detector
    names = SCENARIOS["training"].phases
    for i in range(n):
        rng = np.random.default_rng([seed, scenario_id("training"), i])
        gid = int(rng.integers(len(TRAINING_PHASES)))
        sc = _SCENARIOS[TRAINING_PHASES[gid][0]]
        geom = _training_geometry(rng, sc, det)
        state = _TrainingState.draw(rng, gid, Variation.draw(rng))
        hot, dead = draw_defects(rng, det)
        image = renderer.render(state.scene(geom, det), geom, seed=seed, index=i, hot=hot, dead=dead)
        yield SyntheticFrame(image, i, gid, names[gid], i * period, geom)


def draw_defects(rng: np.random.Generator, det: Detector) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """Hot pixels (flat indices, constant counts 1e3..1e6) and dead pixels (flat indices), off the gaps."""
    area = det.height * det.width / _PILATUS_PIXELS
    n_hot = max(1, round(rng.integers(10, 40) * area))
    n_dead = max(1, round(rng.integers(5, 30) * area))
    sensitive = np.flatnonzero(~det.gap_mask().reshape(-1)) if area < 0.05 else None
    if sensitive is not None:  # small detector: draw exactly from sensitive pixels
        picks = rng.choice(sensitive, size=min(sensitive.size, n_hot + n_dead), replace=False)
    else:  # full size: rejection is cheaper than listing 2.4 M sensitive pixels
        cand = rng.choice(det.height * det.width, size=2 * (n_hot + n_dead), replace=False)
        picks = cand[~det.gap_mask().reshape(-1)[cand]][: n_hot + n_dead]
    hot_idx, dead_idx = picks[:n_hot], picks[n_hot:]
    hot_counts = np.exp(rng.uniform(math.log(1e3), math.log(1e6), size=hot_idx.size)).astype(np.int32)
    return (hot_idx, hot_counts), dead_idx


def _with_flux(g: ScanGeometry, flux: float) -> ScanGeometry:
    return replace(g, flux=flux)


def _smoothstep(t: float) -> float:
    t = min(1.0, max(0.0, t))
    return t * t * (3.0 - 2.0 * t)
