"""The benchmark harness: `python -m benchmarks` measures the real service and writes its results.

No timing is asserted here (numbers depend on the machine); what users rely on is that the harness runs
end to end on a tiny configuration and writes the JSON keys, the markdown table and the plots.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from benchmarks.cli import parse_rates
from benchmarks.e2e import frame_lag_within, stage_means_ms
from benchmarks.machine import machine_info
from benchmarks.report import BenchResult, E2ERun, StageResult, markdown
from benchmarks.stats import LatencyStats

REQUIRED_KEYS = (
    "e2e_p50_ms",
    "e2e_p99_ms",
    "max_throughput_fps",
    "reference_p50_ms",
    "speedup_vs_reference",
    "cold_start_s",
    "frames_lost",
    "stages",
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(600)
def test_bench_runs_the_service_end_to_end_and_writes_json_markdown_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    md = tmp_path / "results.md"
    plots = tmp_path / "plots"
    cmd = [
        sys.executable, "-m", "benchmarks", "--quick",
        "--rates", "20", "--frames", "4", "--stage-iters", "3",
        "--json", str(out), "--markdown", str(md), "--plots", str(plots),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=580, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    doc = json.loads(out.read_text())
    for key in REQUIRED_KEYS:
        assert key in doc, key
    # The service really ran: every frame sent at the fixed rate came back as a point over the websocket.
    run = next(r for r in doc["e2e"] if r["mode"] == "facility" and r["rate_hz"] == 20)
    assert run["sent"] == 4 and run["received"] == 4 and doc["frames_lost"] == 0
    assert {r["mode"] for r in doc["e2e"]} == {"facility", "embedded"}
    # Embedded mode: a client asked for every frame once, and the writer accounted for every frame stored.
    stored = next(r for r in doc["e2e"] if r["mode"] == "embedded")
    assert stored["fetch_checked"] == 4 and stored["stored_within"]["+Inf"] == 4
    assert isinstance(doc["e2e_p50_ms"], float) and doc["e2e_p50_ms"] > 0
    assert isinstance(doc["cold_start_s"], float) and doc["cold_start_s"] > 0
    # Every stage of the per-frame path was timed.
    for prefix in ("decode", "preprocess", "encode[onnx-cpu", "project[", "cluster", "publish", "path["):
        assert any(name.startswith(prefix) for name in doc["stages"]), prefix
    # The reference pipeline ran on the same bundle, or the report says exactly why not.
    if doc["reference_p50_ms"] is None:
        assert "reference pipeline" in doc["skipped"]
    else:
        assert doc["speedup_vs_reference"] == pytest.approx(doc["reference_p50_ms"] / doc["path_p50_ms"])
        assert doc["speedup_vs_reference_e2e"] == pytest.approx(doc["reference_p50_ms"] / doc["e2e_p50_ms"])
    assert doc["machine"]["cpu_model"] and doc["machine"]["libraries"]["onnxruntime"]

    # ... and the service's own account of where each frame's time went
    assert {"decode", "preprocess", "encode", "total"} <= set(run["service_stage_means_ms"])
    assert run["service_stage_means_ms"]["total"] >= run["service_stage_means_ms"]["encode"] > 0
    assert "| end-to-end p50 (ms) |" in md.read_text()
    assert "Inside the service, mean ms per frame" in md.read_text()
    for name in ("latency_distribution.png", "throughput_vs_rate.png"):
        assert (plots / name).read_bytes()[:8] == PNG_MAGIC


def test_stage_means_come_from_the_difference_of_two_metrics_scrapes() -> None:
    before = (
        'latent_stream_stage_seconds_sum{stage="encode"} 1.0\n'
        'latent_stream_stage_seconds_count{stage="encode"} 100.0\n'
        'latent_stream_stage_seconds_bucket{le="0.01",stage="encode"} 90.0\n'
    )
    after = (
        'latent_stream_stage_seconds_sum{stage="encode"} 1.5\n'
        'latent_stream_stage_seconds_count{stage="encode"} 200.0\n'
        'latent_stream_stage_seconds_sum{stage="decode"} 0.2\n'
        'latent_stream_stage_seconds_count{stage="decode"} 100.0\n'
        'latent_stream_stage_seconds_sum{stage="cluster"} 0.0\n'
        'latent_stream_stage_seconds_count{stage="cluster"} 0.0\n'
    )
    assert stage_means_ms(before, after) == pytest.approx({"encode": 5.0, "decode": 2.0})


def test_frames_stored_within_each_lag_bound_come_from_the_writers_histogram_between_two_scrapes() -> None:
    before = (
        'latent_stream_persist_frame_lag_seconds_bucket{le="0.5"} 10.0\n'
        'latent_stream_persist_frame_lag_seconds_bucket{le="2.0"} 12.0\n'
        'latent_stream_persist_frame_lag_seconds_bucket{le="+Inf"} 12.0\n'
    )
    after = (
        'latent_stream_persist_frame_lag_seconds_bucket{le="0.5"} 13.0\n'
        'latent_stream_persist_frame_lag_seconds_bucket{le="2.0"} 20.0\n'
        'latent_stream_persist_frame_lag_seconds_bucket{le="+Inf"} 22.0\n'
    )
    within = frame_lag_within(before, after)
    assert within == {"0.5": 3, "2.0": 8, "+Inf": 10}
    run = _run("embedded", 10.0, 10, 10, 0.03)
    run.stored_within, run.fetch_window_s = within, 2.0
    assert run.stored_p50_at_most_s == 2.0  # 3 of 10 within 0.5 s, 8 of 10 within 2 s
    run.fetch_ok = run.fetch_checked = 2
    result = BenchResult(machine=machine_info(), config={})
    result.e2e = [run]
    assert "2/2 within 2 s; all frames: 8/10 written within 2 s, p50 <= 2 s" in markdown(result)


def _run(mode: str, rate: float | None, sent: int, received: int, p50_s: float) -> E2ERun:
    lat = [p50_s] * received
    return E2ERun(mode=mode, rate_hz=rate, sent=sent, received=received, duration_s=1.0,
                  throughput_fps=float(received), latency=LatencyStats.from_seconds(lat), latencies_s=lat)  # fmt: skip


def test_headline_is_facility_mode_at_10_hz_and_losses_count_only_fixed_rates() -> None:
    result = BenchResult(machine=machine_info(), config={})
    result.e2e = [
        _run("facility", 5.0, 50, 50, 0.010),
        _run("facility", 10.0, 100, 98, 0.020),
        _run("facility", None, 200, 150, 0.500),  # as fast as it goes: back-pressure, not loss
        _run("embedded", 10.0, 100, 99, 0.030),
    ]
    result.reference = StageResult("reference", LatencyStats.from_seconds([0.100]))
    result.stages = [StageResult("path[preprocess -> encode -> project -> cluster, batch 1]",
                                 LatencyStats.from_seconds([0.008]))]  # fmt: skip
    summary = result.summary()
    assert summary["e2e_headline"] == "facility @ 10 Hz"
    assert summary["e2e_p50_ms"] == pytest.approx(20.0)
    assert summary["frames_lost"] == 3
    assert summary["frames_lost_at_max_rate"] == 50
    assert summary["speedup_vs_reference"] == pytest.approx(12.5)  # like for like: 100 ms / the 8 ms path
    assert summary["speedup_vs_reference_e2e"] == pytest.approx(5.0)  # 100 ms / 20 ms end to end
    assert "facility | 10 Hz | 100 | 98 | 2 |" in markdown(result)


def test_rates_accept_hz_and_max_and_reject_nonsense() -> None:
    assert parse_rates("5, 10,20,max") == [5.0, 10.0, 20.0, None]
    for bad in ("fast-ish", "0", "-3", ""):
        with pytest.raises(typer.BadParameter):
            parse_rates(bad)


def test_latency_stats_refuse_an_empty_sample() -> None:
    with pytest.raises(ValueError, match="no latency samples"):
        LatencyStats.from_seconds([])
    stats = LatencyStats.from_seconds([0.001, 0.002, 0.003, 0.004])
    assert math.isclose(stats.p50_ms, 2.5) and stats.n == 4


def test_encoder_device_benchmark_times_what_this_machine_has_and_names_what_it_could_not(tmp_path: Path) -> None:
    import onnxruntime as ort

    from benchmarks.encode_devices import main as encode_devices

    out = tmp_path / "encode.json"
    encode_devices(["--models", "lite", "--providers", "cpu", "cuda_fp32", "--batches", "1", "2",
                    "--iters", "5", "--max-seconds", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    assert [(r["provider"], r["batch"]) for r in rows] == [("cpu", 1), ("cpu", 2)] + (
        [("cuda_fp32", 1), ("cuda_fp32", 2)] if has_cuda else [])
    assert all(r["latency"]["n"] >= 5 and r["ms_per_frame_p50"] > 0 for r in rows)
    assert all(r["rel_err_vs_cpu"] is None for r in rows if r["provider"] == "cpu")
    # raw frames to latents, host preprocessing then the encoder against the fused session, on each provider
    pipeline = json.loads(out.read_text())["pipeline_rows"]
    assert [(r["provider"], r["batch"], r["path"]) for r in pipeline if r["provider"] == "cpu"] == [
        ("cpu", 1, "separate"), ("cpu", 1, "fused"), ("cpu", 2, "separate"), ("cpu", 2, "fused")]
    fused = [r for r in pipeline if r["path"] == "fused"]
    assert all(r["build_s"] > 0 and r["rel_err_vs_separate"] < 1e-5 and r["image_err"] < 1e-6 for r in fused)
