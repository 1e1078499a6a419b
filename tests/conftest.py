"""Fixtures shared across test modules."""

from __future__ import annotations

import pytest

from operators.bundle import ModelBundle


@pytest.fixture(scope="session")
def default_bundle() -> ModelBundle:
    """The shipped default bundle, loaded once and warmed up (its first encode pays for session set-up)."""
    b = ModelBundle.load()
    b.warmup()
    return b


@pytest.fixture(scope="session")
def adapted_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object]:
    """`latent-stream adapt` run once (torch blocked) on the real CBF scan: (bundle path, finished process)."""
    from adapt_support import CBF_SCAN, run_adapt

    out = tmp_path_factory.mktemp("adapted") / "bundle"
    done = run_adapt(str(CBF_SCAN), "--out", str(out))
    assert done.returncode == 0, f"adapt failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-4000:]}"
    return out, done
