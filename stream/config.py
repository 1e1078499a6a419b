"""Configuration of ``latent-stream serve``, in one place.

Every option is settable, highest priority first, by: the command line (init keywords), the environment
(``LATENT_STREAM_<NAME>``, e.g. ``LATENT_STREAM_ZMQ_PATTERN=sub``), a YAML file (``--config`` /
``LATENT_STREAM_CONFIG``), then the defaults below. Unknown keys in the YAML file are an error, so a typo
never silently falls back to a default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from operators.base import DEFAULT_QUEUE_BYTES, QueuePolicy
from stream.protocol import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_FRAME_NUMBER,
    DEFAULT_MAX_METADATA_BYTES,
    DEFAULT_MAX_METADATA_DEPTH,
    DEFAULT_MAX_PIXELS,
    Limits,
)
from stream.sources.url import SourceSpec, ZmqSource, parse_source

ENV_PREFIX = "LATENT_STREAM_"


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    config: Path | None = Field(None, description="YAML file with any of these options")
    # ARCHITECTURE.md "Commands": the public serve options.
    zmq: str = Field("tcp://127.0.0.1:5000", description="address of the frame source; the service connects")
    zmq_pattern: Literal["pull", "sub"] = Field("pull", description="pull (lossless) or sub (PUB sources)")
    # stream/sources/url.py: zmq+pull:// | zmq+sub:// | stream2:// | tiled:// | tiled+https://
    source: str | None = Field(None, description="frame source URL (default: --zmq with --zmq-pattern)")
    source_api_key: str | None = Field(None, repr=False, description="API key for a source that needs one")
    # The key `latent-stream adapt` read its Tiled sources with (TILED_API_KEY there) reads them again here.
    reference_api_key: str | None = Field(
        None, repr=False, validation_alias=AliasChoices("reference_api_key", f"{ENV_PREFIX}REFERENCE_API_KEY",
                                                        "TILED_API_KEY"),
        description="API key for reference frames the bundle recorded on a Tiled server (or TILED_API_KEY)",
    )
    host: str = Field("127.0.0.1", description="HTTP/websocket bind address")
    port: int = Field(8765, ge=0, le=65535, description="HTTP/websocket port")
    bundle: Path | None = Field(None, description="model bundle directory (default: the shipped bundle)")
    tiled: str = Field("embedded", description="'embedded' or the URL of a facility Tiled server")
    tiled_port: int = Field(8000, ge=0, le=65535, description="port of the embedded Tiled server")
    tiled_api_key: str | None = Field(None, description="Tiled API key (generated for embedded when unset)")
    data_dir: Path = Field(Path("data"), description="where the embedded Tiled catalog and files live")
    token: str | None = Field(None, description="require this token from websocket and REST clients")
    # Who may use the bridge (frontend_bridge/access.py), besides the loopback names and a non-wildcard host.
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="more host names clients may address the service by; * for any"
    )
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="web origins (scheme://host[:port]) whose pages may use the service, besides its own "
        "and loopback ones; * for any",
    )
    metrics_public: bool = Field(False, description="serve /metrics without the token")

    @field_validator("allowed_hosts", "allowed_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        """A comma-separated string (command line, environment) or a YAML list."""
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    # Internals, with defaults that suit one Pilatus 2M at up to ~100 Hz on a small machine.
    queue_size: int = Field(32, ge=1, description="frames held between receive and compute")
    queue_policy: QueuePolicy | None = Field(
        None, description="block | drop_oldest | drop_newest (default: block for pull, drop_oldest for sub)"
    )
    # Batching saves little per frame on a 2-core CPU (benchmarks: encode 6.9 vs 6.2 ms at batch 1 vs 4)
    # while a batch of 8 holds its first frame ~55 ms: 4 keeps latency near one frame's.
    max_batch: int = Field(4, ge=1, description="most frames computed together when they queue up")
    rcvhwm: int = Field(16, ge=1, description="ZeroMQ receive high-water mark (messages)")
    max_frame_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="pixels of the largest frame accepted")
    max_frame_bytes: int = Field(DEFAULT_MAX_BYTES, ge=1, description="bytes of the largest frame accepted")
    # What one sender can make the service hold or pass on: beyond each, a message is rejected (counted by
    # reason); past queue_bytes of waiting frames, the queue policy applies as past queue_size.
    queue_bytes: int = Field(DEFAULT_QUEUE_BYTES, ge=1, description="bytes of frames held before compute")
    max_frame_number: int = Field(
        DEFAULT_MAX_FRAME_NUMBER, ge=0, le=2**63 - 1, description="largest frame number accepted"
    )
    max_metadata_bytes: int = Field(
        DEFAULT_MAX_METADATA_BYTES, ge=1024, description="bytes of a message besides its pixels"
    )
    max_metadata_depth: int = Field(DEFAULT_MAX_METADATA_DEPTH, ge=2, description="levels of nested keys")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the encoder runs: cuda (needs latent-stream[gpu]; else CPU, logged), cpu, auto"
    )
    device_preprocess: Literal["auto", "on", "off"] = Field(
        "auto", description="preprocess in the encoder's session, raw frames to the device (auto: on a GPU)"
    )
    # Scale out (operators/workers/): the per-frame heavy work on Ray actors; 1 stays in-process, without Ray.
    workers: int = Field(1, ge=1, description="Ray workers for preprocess/encode/project (needs latent-stream[ray])")
    ray_address: str | None = Field(None, description="an existing Ray cluster (default: start a local one)")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs each Ray worker reserves")
    # 1 where Tiled shares 2 cores with the service (benchmarks/results/README.md, "One compute thread or two")
    ort_threads: int | None = Field(
        None, ge=1, description="threads for one frame's compute (ONNX Runtime, preprocessing); default min(2, cores)"
    )
    publish_timeout: float = Field(1.0, gt=0, description="seconds a publisher may take per message")
    # The live page's side (frontend_bridge/hub.py, app.py): what the service holds for clients.
    max_points: int = Field(200_000, ge=1, description="points of the current run kept in memory for clients")
    max_past_points: int | None = Field(
        None, ge=0, description="points of finished runs kept in memory (default: max_points); older from Tiled"
    )
    max_runs: int = Field(32, ge=1, description="finished runs remembered in memory")
    lse_queue: int = Field(4096, ge=1, description="messages queued per /lse client (oldest dropped beyond)")
    ws_queue: int = Field(8192, ge=1, description="messages queued per /ws client (closed with 1013 beyond)")
    max_aggregate: int = Field(200, ge=1, description="most frames one aggregate request may name")
    # Persistence (operators/persist/writer.py, write_loop.py): the Tiled writer's buffer and batching.
    persist_buffer_bytes: int = Field(
        512 * 2**20, ge=1, description="bytes of frames waiting for Tiled (oldest frame dropped beyond)"
    )
    persist_max_batch: int = Field(16, ge=1, description="most rows written to Tiled in one request")
    persist_patch_bytes: int = Field(64 * 2**20, ge=1, description="most frame bytes sent to Tiled in one request")
    persist_rows_interval: float = Field(1.0, gt=0, description="seconds rows wait to be written as a batch")
    persist_frames_linger: float = Field(0.3, ge=0, description="seconds a frame waits for others to join its write")
    persist_give_up_after: float = Field(
        300.0, gt=0, description="seconds a write is retried while Tiled is unreachable"
    )
    persist_failed_attempts: int = Field(3, ge=1, description="tries of a write Tiled fails with a 5xx")
    persist_request_timeout: float = Field(30.0, gt=0, description="seconds one Tiled request may take")
    persist_drain_timeout: float = Field(2.0, ge=0, description="seconds the writer may take at shutdown")
    persist_wait: float = Field(
        5.0, ge=0, description="embedded Tiled: seconds the pipeline may wait per batch while over 3/4 of the frame "
        "buffer waits for the disk, so that every frame is stored (0: never wait; frames beyond the buffer are "
        "dropped and counted)"
    )
    max_frame_index: int = Field(
        1_000_000, ge=0, description="largest frame number stored in a run's image array (rows kept beyond)"
    )
    drain_timeout: float = Field(2.0, ge=0, description="seconds to finish queued frames at shutdown")
    log_level: str = Field("INFO", description="logging level")

    @field_validator("tiled")
    @classmethod
    def _tiled_is_embedded_or_url(cls, value: str) -> str:
        if value != "embedded" and not value.startswith(("http://", "https://")):
            raise ValueError("tiled must be 'embedded' or an http(s):// URL")
        return value.rstrip("/")

    @field_validator("source")
    @classmethod
    def _source_is_a_known_url(cls, value: str | None) -> str | None:
        if value is not None:
            parse_source(value)  # SourceURLError (a ValueError) says what is wrong, never a credential
        return value

    @model_validator(mode="after")
    def _policy_follows_pattern(self) -> ServeSettings:
        if self.queue_policy is None:
            # PULL is lossless: push back on the sender. SUB cannot push back: stay live, count drops.
            can_push_back = self.source_spec.can_push_back
            self.queue_policy = QueuePolicy.BLOCK if can_push_back else QueuePolicy.DROP_OLDEST
        return self

    @property
    def source_spec(self) -> SourceSpec:
        """Where frames come from: ``source``, else the msgpack ingest at ``zmq`` with ``zmq_pattern``."""
        return parse_source(self.source) if self.source else ZmqSource(self.zmq_pattern, self.zmq)

    @property
    def limits(self) -> Limits:
        return Limits(
            max_pixels=self.max_frame_pixels,
            max_bytes=self.max_frame_bytes,
            max_frame_number=self.max_frame_number,
            max_metadata_bytes=self.max_metadata_bytes,
            max_metadata_depth=self.max_metadata_depth,
        )

    @property
    def embedded_tiled(self) -> bool:
        return self.tiled == "embedded"

    @property
    def tiled_base_url(self) -> str:
        """Where frame URIs point: the embedded server on 127.0.0.1, or the facility server."""
        return f"http://127.0.0.1:{self.tiled_port}" if self.embedded_tiled else self.tiled

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        yaml_path = _yaml_path(init_settings)
        if yaml_path is not None:
            if not yaml_path.is_file():
                raise FileNotFoundError(f"config file not found: {yaml_path}")
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_path))
        return tuple(sources)


def _yaml_path(init_settings: PydanticBaseSettingsSource) -> Path | None:
    kwargs: dict[str, Any] = getattr(init_settings, "init_kwargs", {})
    value = kwargs.get("config") or os.environ.get(f"{ENV_PREFIX}CONFIG")
    return Path(value) if value else None


def load_settings(**overrides: Any) -> ServeSettings:
    """Settings from command-line overrides (None means 'not given'), the environment and YAML."""
    return ServeSettings(**{k: v for k, v in overrides.items() if v is not None})
