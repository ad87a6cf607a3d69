"""Golden files: the expected SHA-256 of a packet, committed with the code (shared by the
bitstream, entropy and session tests)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def check_golden(path: Path, digest: str) -> None:
    """A missing golden file fails the test; `UPDATE_GOLDEN=1 pytest tests/test_bitstream.py
    tests/test_entropy.py tests/test_session.py` (re)writes them, only for a deliberate format
    or model change."""
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(digest + "\n")
    if not path.exists():
        pytest.fail(f"golden file {path} is missing: restore it from git, or (only for a deliberate "
                    f"format change) write it with UPDATE_GOLDEN=1")
    assert digest == path.read_text().strip(), f"packet bytes differ from {path.name}"
