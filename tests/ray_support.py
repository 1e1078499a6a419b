"""A real Ray cluster for the tests: a head and a second node, each a `ray start --block` process on 127.0.0.1.

Each node has one CPU, so two workers of one CPU each are placed one per node. Both processes run in their own
process group and are stopped by signalling those groups (never `ray stop`, which stops every Ray on the
machine). Token authentication with a token of the tests' own, passed to whatever joins (`env`).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from service_support import free_port

RAY = str(Path(sys.executable).with_name("ray"))


@dataclass
class RayCluster:
    address: str
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]]
    logs: list[Path]

    def stop(self) -> None:
        """`ray start --block` stops the node's processes when it gets SIGTERM; the group is killed after."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            try:  # whatever of the node is left (a worker process)
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def start_cluster(tmp: Path) -> RayCluster:
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--object-store-memory",
              str(128 * 1024**2), "--disable-usage-stats"]
    cluster = RayCluster(f"127.0.0.1:{port}", env, [], [])
    for name, args in (("head", ["--head", "--port", str(port), "--include-dashboard", "false"]),
                       ("second", ["--address", f"127.0.0.1:{port}", "--resources", '{"second_node": 1}'])):
        log = tmp / f"ray-{name}.log"
        with open(log, "wb") as out:
            cluster.procs.append(subprocess.Popen([RAY, "start", *args, *common], stdout=out,
                                                  stderr=subprocess.STDOUT, env=env, start_new_session=True))
        cluster.logs.append(log)
        _wait_for(log, "block forever", cluster)
    return cluster


def _wait_for(log: Path, text: str, cluster: RayCluster, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if any(p.poll() is not None for p in cluster.procs):
            break
        time.sleep(0.2)
    cluster.stop()
    raise RuntimeError(f"ray start did not come up:\n{log.read_text(errors='replace')[-3000:]}")
