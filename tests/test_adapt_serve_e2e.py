"""An adapted bundle served: a replay of the frames it was fitted on lands on their own reference points.

"Ordered in time" is measured on the live trajectory, two ways: for at least 90 % of the frames the nearest
other point on the map is a frame at most 2 steps away in time (a shuffled scan gets ~17 %), and the Spearman
correlation between the time separation and the map distance of every pair of frames is at least 0.5 (a
shuffled scan: ~0).
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from adapt_support import CBF_SCAN
from scipy.spatial.distance import pdist
from scipy.stats import spearmanr
from service_support import WsClient, start_service, stop_service, until

from operators.bundle import ModelBundle
from stream.replay import open_source, replay_source

pytestmark = pytest.mark.e2e


async def test_replaying_the_adapted_frames_puts_each_live_point_on_its_own_reference_point(
    adapted_bundle, tmp_path
) -> None:
    out, _ = adapted_bundle
    bundle = ModelBundle.load(out)
    ref = bundle.reference_embedding
    extent = float((ref.max(0) - ref.min(0)).max())  # the map's extent: the longer side of its bounding box
    service = start_service(tmp_path, extra_args=("--bundle", str(out)), wait_for_tiled=False)
    try:
        async with httpx.AsyncClient(base_url=service.http, timeout=30, trust_env=False) as http:
            reference = (await http.get("/api/reference")).json()
            assert reference["frames"] is True and reference["count"] == 24
            png = await http.get("/api/reference/frame/7")
            assert png.status_code == 200 and png.headers["content-type"] == "image/png"
            # only the bundle's own frames, by reference index: nothing else can be named
            assert (await http.get("/api/reference/frame/24")).status_code == 404
            assert (await http.get("/api/reference/frame/-1")).status_code == 404
            assert (await http.get("/api/reference/frame/..%2F..%2Fetc%2Fpasswd")).status_code in (404, 422)

        src = open_source(str(CBF_SCAN))
        async with WsClient(service.ws) as client:
            await replay_source(src, service.zmq, rate=20, run_id="adapted-replay", report_dir=tmp_path,
                                progress=False)  # fmt: skip
            await until(lambda: client.stopped("adapted-replay") and len(client.points("adapted-replay")) == 24,
                        120, "24 points and the run's stop")  # fmt: skip
        points = sorted(client.points("adapted-replay"), key=lambda p: p["index"])
    finally:
        stop_service(service)
    live = np.array([p["feature_vector"] for p in points], dtype=np.float64)
    assert [p["index"] for p in points] == list(range(24))
    off = np.linalg.norm(live - ref, axis=1) / extent
    assert off.max() <= 0.02, (
        f"live points off their reference point by up to {100 * off.max():.2f}% of the extent"
    )

    nearest = [int(np.argsort(np.linalg.norm(live - live[i], axis=1))[1]) for i in range(len(live))]
    local = np.mean([abs(j - i) <= 2 for i, j in enumerate(nearest)])
    rho = spearmanr(pdist(np.arange(len(live), dtype=float)[:, None]), pdist(live))[0]
    assert local >= 0.9 and rho >= 0.5, (
        f"trajectory not ordered: nearest-in-time {local:.2f}, spearman {rho:.2f}"
    )
