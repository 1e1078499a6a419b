"""Serve configuration (flags > environment > YAML > defaults) and the command line's surface."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from operators.base import QueuePolicy
from operators.bundle import compute_threads
from stream.config import ServeSettings, load_settings

CLI = str(Path(sys.executable).with_name("latent-stream"))


def test_defaults_are_the_documented_ones() -> None:
    s = load_settings()
    assert (s.zmq, s.zmq_pattern, s.host, s.port) == ("tcp://127.0.0.1:5000", "pull", "127.0.0.1", 8765)
    assert (s.tiled, s.tiled_port, s.token) == ("embedded", 8000, None)
    assert s.tiled_base_url == "http://127.0.0.1:8000"


def test_pull_blocks_and_sub_drops_oldest_unless_a_policy_is_given() -> None:
    assert load_settings(zmq_pattern="pull").queue_policy is QueuePolicy.BLOCK
    assert load_settings(zmq_pattern="sub").queue_policy is QueuePolicy.DROP_OLDEST
    assert load_settings(zmq_pattern="sub", queue_policy="block").queue_policy is QueuePolicy.BLOCK


def test_flags_beat_environment_beat_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("port: 9001\nzmq_pattern: sub\ntiled: http://tiled.facility:8000/\nmax_batch: 4\n")
    monkeypatch.setenv("LATENT_STREAM_PORT", "9002")
    monkeypatch.setenv("LATENT_STREAM_MAX_BATCH", "2")
    s = load_settings(config=config, max_batch=16)
    assert s.port == 9002  # environment over YAML
    assert s.max_batch == 16  # flag over environment
    assert s.zmq_pattern == "sub"  # YAML over default
    assert s.tiled_base_url == "http://tiled.facility:8000"


def test_compute_threads_are_a_serve_setting_the_bundle_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LATENT_STREAM_ORT_THREADS", "1")
    assert load_settings().ort_threads == 1  # the variable the benchmarks set, read in one place
    assert compute_threads(None) == min(2, os.cpu_count() or 1)  # the bundle takes what serve passes
    assert compute_threads(3) == 3


def test_a_config_path_from_the_environment_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("queue_size: 7\n")
    monkeypatch.setenv("LATENT_STREAM_CONFIG", str(config))
    assert load_settings().queue_size == 7


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"zmq_pattern": "push"}, "zmq_pattern"),
        ({"tiled": "somewhere"}, "tiled"),
        ({"port": 70000}, "port"),
        ({"queue_policy": "sometimes"}, "queue_policy"),
        ({"queue_size": 0}, "queue_size"),
    ],
)
def test_bad_values_are_refused_naming_the_option(values: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        load_settings(**values)
    assert field in str(caught.value)


def test_a_typo_in_the_yaml_file_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("prot: 9000\n")
    with pytest.raises(ValidationError, match="prot"):
        load_settings(config=config)


def test_the_shipped_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[1] / "deploy" / "config.example.yaml"
    assert load_settings(config=example).zmq == "tcp://127.0.0.1:5000"


def test_the_shipped_example_config_names_every_setting() -> None:
    example = (Path(__file__).resolve().parents[1] / "deploy" / "config.example.yaml").read_text()
    named = set(re.findall(r"^#? ?([a-z_]+):", example, re.MULTILINE))
    assert set(ServeSettings.model_fields) - {"config"} <= named


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], check=False, capture_output=True, text=True, timeout=120)


def test_help_lists_every_command_without_loading_them() -> None:
    done = _cli("--help")
    assert done.returncode == 0
    for command in ("serve", "simulate", "demo", "replay", "train", "export", "fit", "bench"):
        assert command in done.stdout


def test_serve_refuses_a_bad_option_with_a_message_and_no_traceback() -> None:
    done = _cli("serve", "--zmq-pattern", "push")
    assert done.returncode == 2
    assert "zmq_pattern" in done.stderr and "Traceback" not in done.stderr


def test_serve_reports_a_missing_bundle_clearly(tmp_path: Path) -> None:
    done = _cli("serve", "--bundle", str(tmp_path / "nope"), "--tiled", "http://127.0.0.1:9", "--port", "0")
    assert done.returncode == 1
    assert "cannot load the model bundle" in done.stderr and "Traceback" not in done.stderr


def test_simulate_refuses_an_unknown_scenario() -> None:
    done = _cli("simulate", "--scenario", "volcano", "--frames", "1")
    assert done.returncode == 2 and "valid scenarios" in done.stderr


def test_the_tiled_key_adapt_read_its_sources_with_reads_reference_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TILED_API_KEY", "adapt-key")  # what `latent-stream adapt` used
    assert load_settings().reference_api_key == "adapt-key"
    monkeypatch.setenv("LATENT_STREAM_REFERENCE_API_KEY", "serve-key")
    assert load_settings().reference_api_key == "serve-key"
    assert load_settings(reference_api_key="flag-key").reference_api_key == "flag-key"


# Where the environment may be read: the settings, torchrun's launcher contract, and the embedded Tiled
# server's child, which gets its key by environment because argv is visible to every user.
ENVIRONMENT_READERS = {"stream/config.py", "operators/model/cli.py", "operators/model/train.py",
                       "operators/persist/server.py"}  # fmt: skip


def test_no_module_reads_the_environment_behind_the_settings() -> None:
    repo = Path(__file__).resolve().parents[1]
    readers = {
        str(path.relative_to(repo))
        for package in ("stream", "operators", "frontend_bridge")
        for path in (repo / package).rglob("*.py")
        if re.search(r"os\.environ|os\.getenv", path.read_text())
    }
    assert readers <= ENVIRONMENT_READERS
