"""``--source URL``: one URL per source kind, parsed into a typed spec; bad URLs get a clear error that never
repeats a credential; the setting comes from the command line, the environment or the YAML file."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from operators.base import QueuePolicy
from stream.config import ServeSettings, load_settings
from stream.sources import (
    SourceURLError,
    Stream2Source,
    TiledSource,
    ZmqSource,
    build_source,
    parse_source,
)


@pytest.mark.parametrize(
    ("url", "spec"),
    [
        ("zmq+pull://127.0.0.1:5000", ZmqSource("pull", "tcp://127.0.0.1:5000")),
        ("zmq+sub://beamline.example:5001", ZmqSource("sub", "tcp://beamline.example:5001")),
        ("zmq+pull://[::1]:5000", ZmqSource("pull", "tcp://[::1]:5000")),
        ("stream2://10.0.0.5:31001", Stream2Source("tcp://10.0.0.5:31001", None)),
        ("stream2://dcu:31001?channel=threshold_2", Stream2Source("tcp://dcu:31001", "threshold_2")),
        ("tiled://localhost:8000/raw?field=pilatus_image", TiledSource("http://localhost:8000", "raw", "pilatus_image")),
        ("tiled+https://tiled.example.org/chx/raw/", TiledSource("https://tiled.example.org", "chx/raw", None)),
    ],
)
def test_each_source_kind_parses_to_its_spec(url: str, spec: object) -> None:
    assert parse_source(url) == spec


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://127.0.0.1:5000", "unknown source scheme http://"),
        ("127.0.0.1:5000", "unknown source scheme"),
        ("stream2://dcu", "needs HOST:PORT"),
        ("zmq+pull://h:5000/frames", "takes no path"),
        ("stream2://h:31001?chanel=x", "unknown parameter(s) chanel"),
        ("stream2://h:31001?channel=", "empty parameter(s) channel"),
        ("tiled://h:8000", "needs the PATH"),
        ("stream2://h:99999", "not a URL"),
    ],
)
def test_a_bad_source_url_is_refused_saying_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(SourceURLError) as caught:
        parse_source(url)
    assert says in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "tiled://alice:hunter2-secret@h:8000/raw",
        "tiled://h:8000/raw?api_key=hunter2-secret",
        "stream2://h:31001?token=hunter2-secret",
        "tiled+https://h/raw?field=x&password=hunter2-secret",
    ],
)
def test_a_credential_in_the_url_is_refused_and_never_repeated(url: str) -> None:
    with pytest.raises(SourceURLError) as caught:
        parse_source(url)
    assert "hunter2-secret" not in str(caught.value)
    assert "--source-api-key" in str(caught.value)
    with pytest.raises(ValidationError) as invalid:
        ServeSettings(source=url)
    assert all("hunter2-secret" not in error["msg"] for error in invalid.value.errors())


def test_without_source_the_zmq_options_are_the_source() -> None:
    settings = load_settings(zmq="tcp://127.0.0.1:6000", zmq_pattern="sub")
    assert settings.source_spec == ZmqSource("sub", "tcp://127.0.0.1:6000")
    assert settings.queue_policy is QueuePolicy.DROP_OLDEST


def test_a_source_that_cannot_push_back_gets_the_dropping_policy() -> None:
    assert load_settings(source="zmq+sub://127.0.0.1:6000").queue_policy is QueuePolicy.DROP_OLDEST
    assert load_settings(source="stream2://127.0.0.1:31001").queue_policy is QueuePolicy.BLOCK


def test_source_and_its_key_come_from_the_environment_or_the_yaml_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LATENT_STREAM_SOURCE", "stream2://dcu:31001?channel=threshold_1")
    monkeypatch.setenv("LATENT_STREAM_SOURCE_API_KEY", "key-from-env")
    settings = load_settings()
    assert settings.source_spec == Stream2Source("tcp://dcu:31001", "threshold_1")
    assert settings.source_api_key == "key-from-env"
    assert "key-from-env" not in repr(settings)

    monkeypatch.delenv("LATENT_STREAM_SOURCE")
    config = tmp_path / "serve.yaml"
    config.write_text("source: zmq+sub://127.0.0.1:5009\n")
    assert load_settings(config=config).source_spec == ZmqSource("sub", "tcp://127.0.0.1:5009")


def test_a_kind_without_a_registered_builder_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from stream import sources

    monkeypatch.delitem(sources.BUILDERS, "stream2")
    with pytest.raises(SourceURLError, match="stream2 sources are not available"):
        build_source(parse_source("stream2://127.0.0.1:31001"), None)  # type: ignore[arg-type]
