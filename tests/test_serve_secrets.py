"""`latent-stream serve` never logs the embedded Tiled server's API key: it says where the key file is, and
the data directory it uses is private to its owner (issue 14, finding 8)."""

from __future__ import annotations

import stat
from pathlib import Path

import httpx
import pytest
from service_support import start_service, stop_service

pytestmark = pytest.mark.e2e


def test_the_log_says_where_the_generated_key_is_never_the_key_and_the_data_dir_is_private(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)  # as a shared /data directory often is
    service = start_service(tmp_path)
    try:
        key_file = data_dir / "tiled-api-key"
        key = key_file.read_text().strip()
        r = httpx.get(f"{service.tiled_url}/api/v1/metadata/", headers={"Authorization": f"Apikey {key}"})
        assert r.status_code == 200  # the key in the file is the one the server wants
    finally:
        rc, _ = stop_service(service)
    log = service.log_text()
    assert rc == 0, log[-3000:]
    assert key not in log
    assert f"generated an API key, kept in {key_file.resolve()}" in log
    assert f"{data_dir} was open to other users (mode 755)" in log
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
