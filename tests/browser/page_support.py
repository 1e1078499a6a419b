"""What the page tests share besides fixtures: the page probe and screenshots as test artifacts."""

from __future__ import annotations

import re
from pathlib import Path

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"


class PageProbe:
    """A page plus what it did: requests that left 127.0.0.1 (blocked: the page must work offline) and errors."""

    def __init__(self, page: object) -> None:
        self.page = page
        self.external_requests: list[str] = []
        self.errors: list[str] = []

    def check_clean(self, expected: tuple[str, ...] = ()) -> None:
        """No network beyond 127.0.0.1 and no errors, except browser logs containing one of `expected`."""
        assert not self.external_requests, f"the page tried to reach the network: {self.external_requests}"
        errors = [e for e in self.errors if not any(x in e for x in expected)]
        assert not errors, f"errors in the page: {errors}"


def screenshot(page: object, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
