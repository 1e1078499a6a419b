"""Tiled node URIs are parsed in one place (operators.tiled_layout) for the bridge and the Tiled reader."""

from __future__ import annotations

import pytest

from frontend_bridge.frames import BadFrameURL, FrameFetcher, FrameURLRejected
from operators.tiled_layout import NodeURI, frame_uri, parse_node_uri
from stream.readers import open_source
from stream.readers.source import ReplayError


def test_a_frame_uri_parses_back_into_its_server_node_and_slice() -> None:
    assert parse_node_uri(frame_uri("http://tiled:8000/prefix/", "run-1a2b", 7)) == NodeURI(
        "http://tiled:8000/prefix", "run-1a2b/primary/image", "7"
    )
    assert parse_node_uri("https://t/api/v1/metadata/a/b%20c/") == NodeURI("https://t", "a/b%20c", "")
    with pytest.raises(ValueError, match="not a Tiled node URI"):
        parse_node_uri("http://tiled:8000/api/v1/search/run")


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("http://other:8000/prefix/api/v1/array/full/run/primary/image?slice=0", FrameURLRejected),
        ("http://tiled:8000/api/v1/array/full/run/primary/image?slice=0", FrameURLRejected),  # not under the prefix
        ("http://tiled:8000/prefix/x/api/v1/array/full/run/primary/image", FrameURLRejected),
        ("http://tiled:8000/prefix/api/v1/search/run", FrameURLRejected),
        ("http://tiled:99999/prefix/api/v1/array/full/run", FrameURLRejected),  # no URL: port out of range
        ("http://tiled:8000/prefix/api/v1/array/full/run/../secret", BadFrameURL),
    ],
)
async def test_the_bridge_fetches_only_frames_on_its_own_server(url: str, error: type[Exception]) -> None:
    fetcher = FrameFetcher("http://tiled:8000/prefix", None)
    try:
        assert fetcher.parse("http://TILED:8000/prefix/api/v1/array/full/run/primary/image?slice=3") == NodeURI(
            "http://TILED:8000/prefix", "run/primary/image", "3"
        )
        with pytest.raises(error):
            fetcher.parse(url)
    finally:
        await fetcher.aclose()


def test_replay_refuses_a_tiled_url_that_names_no_node_before_connecting() -> None:
    with pytest.raises(ReplayError, match="not a Tiled node URI"):
        open_source("http://127.0.0.1:1/api/v1/search/run", api_key=None)
