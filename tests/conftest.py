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
