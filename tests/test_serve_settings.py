"""Every serve setting reaches the part it configures, and `serve --help` shows the defaults the settings declare."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry

from frontend_bridge.hub import Hub
from frontend_bridge.wire import ModelInfo
from operators.persist.write_loop import WriteSettings
from operators.persist.writer import TiledWriter
from stream.config import ServeSettings
from stream.serve import make_hub, make_writer
from stream.serve_cli import shown_default

CLI = str(Path(sys.executable).with_name("latent-stream"))
MODEL = ModelInfo("test:1", "test:1")
UNREACHABLE = "http://127.0.0.1:9"


def test_serve_help_shows_each_setting_with_its_declared_default() -> None:
    done = subprocess.run([CLI, "serve", "--help"], check=True, capture_output=True, text=True, timeout=120)
    # each option's block runs from its line to the next option's line; compared without the wrapping
    blocks = re.split(r"\n  (?=--)", done.stdout)
    by_option = {block.split(" <")[0].split("  ")[0].strip(): _unwrapped(block) for block in blocks[1:]}
    for name, field in ServeSettings.model_fields.items():
        option = f"--{name.replace('_', '-')}"
        block = by_option.get(option) or by_option[f"{option} / --no-{name.replace('_', '-')}"]
        assert field.description and _unwrapped(field.description) in block, name
        default = shown_default(field)
        if default is not False:
            assert _unwrapped(f"[default: ({default})]") in block, name


def _unwrapped(text: str) -> str:
    return re.sub(r"\s+", "", text)


def test_non_default_settings_reach_the_writer_and_the_hub(tmp_path: Path) -> None:
    s = ServeSettings(data_dir=tmp_path, max_points=11, max_past_points=7, max_runs=3, lse_queue=5, ws_queue=6,
                      persist_buffer_bytes=1234, persist_max_batch=2, persist_patch_bytes=4321,
                      persist_rows_interval=0.5, persist_frames_linger=0.05, persist_give_up_after=9.0,
                      persist_failed_attempts=1, persist_request_timeout=4.0, max_frame_index=99,
                      max_metadata_bytes=2048, max_metadata_depth=3)  # fmt: skip
    writer = make_writer(s, UNREACHABLE, None)
    assert writer.settings == WriteSettings(max_batch=2, max_patch_bytes=4321, rows_interval=0.5,
                                            frames_linger=0.05, give_up_after=9.0, failed_attempts=1)  # fmt: skip
    assert (writer.max_buffer_bytes, writer.max_frame_index, writer.request_timeout) == (1234, 99, 4.0)
    hub = make_hub(s, MODEL, CollectorRegistry())
    assert (hub.max_points, hub.max_past_points, hub.max_runs) == (11, 7, 3)
    assert hub.queue_bounds == {"lse": 5, "ws": 6}
    assert (hub.max_metadata_bytes, hub.max_metadata_depth) == (2048, 3)


def test_the_parts_own_defaults_are_the_settings_defaults(tmp_path: Path) -> None:
    """Tests and benchmarks build the parts without settings: they get what a beamline gets by default."""
    s = ServeSettings(data_dir=tmp_path)
    from_settings = make_writer(s, UNREACHABLE, None)
    alone = TiledWriter(UNREACHABLE, None, data_dir=tmp_path, local_frames=True)
    assert from_settings.settings == alone.settings
    assert (from_settings.max_buffer_bytes, from_settings.max_frame_index, from_settings.request_timeout) == (
        alone.max_buffer_bytes, alone.max_frame_index, alone.request_timeout)  # fmt: skip
    hub, hub_alone = make_hub(s, MODEL, CollectorRegistry()), Hub(MODEL)
    assert (hub.max_points, hub.max_past_points, hub.max_runs, hub.queue_bounds) == (
        hub_alone.max_points, hub_alone.max_past_points, hub_alone.max_runs, hub_alone.queue_bounds)  # fmt: skip
    assert (hub.max_metadata_bytes, hub.max_metadata_depth) == (hub_alone.max_metadata_bytes,
                                                               hub_alone.max_metadata_depth)  # fmt: skip
