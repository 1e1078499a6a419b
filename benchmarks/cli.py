"""`latent-stream bench` (also `python -m benchmarks`): stages, reference pipeline, end to end, report.

The CLI engineer registers `bench` on the main typer app; it is a plain typer-compatible function.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from benchmarks.report import BenchResult

log = logging.getLogger("benchmarks")

QUICK_RATES: tuple[float | None, ...] = (10.0, None)
FULL_RATES: tuple[float | None, ...] = (5.0, 10.0, 20.0, None)


def parse_rates(text: str) -> list[float | None]:
    """'5,10,20,max' -> [5.0, 10.0, 20.0, None]; `max` means as fast as the service takes frames."""
    rates: list[float | None] = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        if part in ("max", "inf", "fast"):
            rates.append(None)
            continue
        try:
            value = float(part)
        except ValueError:
            raise typer.BadParameter(f"rate {part!r} is neither a number of Hz nor 'max'") from None
        if value <= 0:
            raise typer.BadParameter(f"rate must be > 0 Hz, got {value:g}")
        rates.append(value)
    if not rates:
        raise typer.BadParameter("no rates given")
    return rates


def _parse_env(items: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--service-env wants KEY=VALUE, got {item!r}")
        env[key] = value
    return env


@dataclass(slots=True)
class BenchOptions:
    quick: bool = False
    rates: list[float | None] = field(default_factory=lambda: list(FULL_RATES))
    embedded_rates: list[float | None] | None = None
    frames: int = 300  # per end-to-end run
    distinct_frames: int = 32
    bundle: Path | None = None
    stages: bool = True
    reference: bool = True
    e2e: bool = True
    seed: int = 0
    stage_iters: int | None = None  # override the per-stage call count (tiny runs in tests)
    service_args: list[str] = field(default_factory=list)  # extra `latent-stream serve` options
    service_env: dict[str, str] = field(default_factory=dict)  # extra environment for the service

    @classmethod
    def make(cls, quick: bool, rates: str | None, frames: int | None, bundle: Path | None) -> BenchOptions:
        parsed = parse_rates(rates) if rates else list(QUICK_RATES if quick else FULL_RATES)
        fixed = [r for r in parsed if r is not None]
        # Embedded mode is checked at 10 Hz (the target) or the given fixed rates in quick runs.
        embedded = ([10.0] if 10.0 in fixed or not fixed else fixed[:1]) if quick else None
        return cls(
            quick=quick,
            rates=parsed,
            embedded_rates=embedded,
            frames=frames if frames is not None else (120 if quick else 300),  # 120: p99 is not just the max
            distinct_frames=8 if quick else 32,
            bundle=bundle,
        )


def bench_frames(n: int, seed: int = 0) -> list:
    """`n` distinct full-size PILATUS3 2M frames (1679 x 1475 int32) from the synthetic beamline."""
    from benchmarks.frames import synthetic_frames

    return synthetic_frames(n, seed)


def run_bench(opts: BenchOptions, command: str = "") -> BenchResult:
    from benchmarks.e2e import E2EPlan, ServiceConfig, run_e2e
    from benchmarks.machine import machine_info
    from benchmarks.report import BenchResult
    from benchmarks.timing import Budget

    t_start = time.perf_counter()
    machine = machine_info()
    budget = Budget.quick() if opts.quick else Budget()
    if opts.stage_iters is not None:
        budget = Budget(warmup=min(budget.warmup, 2), iters=opts.stage_iters, max_seconds=budget.max_seconds,
                        min_iters=min(budget.min_iters, opts.stage_iters))  # fmt: skip
    frames = bench_frames(opts.distinct_frames, opts.seed)
    result = BenchResult(
        machine=machine,
        config={
            "quick": opts.quick,
            "rates_hz": [r if r is not None else "max" for r in opts.rates],
            "embedded_rates_hz": [r if r is not None else "max" for r in (opts.embedded_rates or opts.rates)],
            "frames_per_run": opts.frames,
            "distinct_frames": len(frames),
            "frame_shape": list(frames[0].shape),
            "frame_dtype": str(frames[0].dtype),
            "bundle": str(opts.bundle) if opts.bundle else "default",
            "service_args": opts.service_args,
            "service_env": opts.service_env,
            "stage_budget": {
                "warmup": budget.warmup,
                "iters": budget.iters,
                "max_seconds": budget.max_seconds,
            },
        },
        command=command,
    )
    if opts.stages or opts.reference:
        from benchmarks.stages import load_models, run_reference_for, run_stages

        models = load_models(opts.bundle)
        result.config["bundle_name"] = models.autoencoder_model
        if opts.stages:
            log.info("timing stages")
            result.stages, result.skipped = run_stages(models, frames, budget, quick=opts.quick)
        if opts.reference:
            log.info("running the reference pipeline")
            ref = run_reference_for(models, frames, budget)
            if isinstance(ref, str):
                result.skipped["reference pipeline"] = ref
            else:
                best, result.reference_variants = ref
                result.reference, result.reference_stages = best.total, best.steps
                result.reference_latencies_s = best.latencies_s
        del models
    if opts.e2e:
        log.info("running the service end to end")
        plan = E2EPlan(rates=opts.rates, frames_per_run=opts.frames, embedded_rates=opts.embedded_rates)
        e2e = asyncio.run(
            run_e2e(
                frames,
                plan,
                ServiceConfig(bundle=opts.bundle, extra_args=opts.service_args, env=opts.service_env),
            )
        )
        result.e2e = e2e.runs
        result.cold_start_s = e2e.cold_start_s
        result.config["cold_start_first_point_at_client_s"] = e2e.cold_start_first_point_s
        result.config["cold_start_phases_s"] = e2e.cold_start_phases
    result.config["bench_wall_s"] = time.perf_counter() - t_start
    return result


def bench(
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="A short run (under 3 minutes on 2 cores).")] = False,
    rates: Annotated[
        str | None,
        typer.Option(
            "--rates", help="End-to-end input rates in Hz, comma separated; 'max' = as fast as it goes."
        ),
    ] = None,
    frames: Annotated[int | None, typer.Option("--frames", min=1, help="Frames per end-to-end run.")] = None,
    markdown: Annotated[
        Path | None, typer.Option("--markdown", help="Write the markdown table here.")
    ] = None,
    plots: Annotated[
        Path | None, typer.Option("--plots", help="Write PNG plots into this directory.")
    ] = None,
    bundle: Annotated[
        Path | None, typer.Option("--bundle", help="Model bundle (default: the shipped one).")
    ] = None,
    stages: Annotated[bool, typer.Option("--stages/--no-stages", help="Time each stage.")] = True,
    reference: Annotated[
        bool, typer.Option("--reference/--no-reference", help="Run the reference pipeline.")
    ] = True,
    e2e: Annotated[bool, typer.Option("--e2e/--no-e2e", help="Run the service end to end.")] = True,
    stage_iters: Annotated[
        int | None, typer.Option("--stage-iters", min=1, help="Calls timed per stage.")
    ] = None,
    service_arg: Annotated[
        list[str] | None,
        typer.Option(
            "--service-arg", help="Extra `serve` option, repeatable (e.g. --service-arg=--max-batch=1)."
        ),
    ] = None,
    service_env: Annotated[
        list[str] | None,
        typer.Option(
            "--service-env",
            help="KEY=VALUE for the service's environment, repeatable (e.g. LATENT_STREAM_ORT_THREADS=1).",
        ),
    ] = None,
) -> None:
    """Measure every stage, the reference pipeline and the whole service; write JSON, markdown and plots."""
    from benchmarks.report import markdown as to_markdown
    from benchmarks.report import write_json, write_markdown, write_plots

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("httpx", "numba", "onnx_ir", "onnxscript"):  # per-request / per-pass chatter
        logging.getLogger(noisy).setLevel(logging.WARNING)
    opts = BenchOptions.make(quick, rates, frames, bundle)
    opts.stages, opts.reference, opts.e2e = stages, reference, e2e
    opts.stage_iters, opts.service_args = stage_iters, list(service_arg or [])
    opts.service_env = _parse_env(service_env or [])
    command = "latent-stream bench " + " ".join(shlex.quote(a) for a in sys.argv[1:] if a != "bench")
    result = run_bench(opts, command=command.strip())
    if json_path is not None:
        write_json(result, json_path)
        log.info("wrote %s", json_path)
    if markdown is not None:
        write_markdown(result, markdown)
        log.info("wrote %s", markdown)
    if plots is not None:
        for path in write_plots(result, plots):
            log.info("wrote %s", path)
    typer.echo(to_markdown(result))
