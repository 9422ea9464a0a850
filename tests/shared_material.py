"""Where the tests find ``../shared`` (read-only material beside the repository) and what happens without it.

A user's clone has no ``../shared``: tests that need it are *skipped* with a reason naming the missing path, and
everything else still runs on material the repository ships or the tests make. Under ``CI=true`` nothing may hide
behind a skip: a missing folder, host or browser is a *failure*.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# LOWLIGHT_SHARED_DIR overrides the location (e.g. a path that does not exist, to see what a plain clone sees).
SHARED = Path(os.environ.get("LOWLIGHT_SHARED_DIR") or REPO_ROOT.parent / "shared").resolve()


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str) -> None:
    """Skip the calling test with ``reason`` on a user's machine; fail it under ``CI=true``."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing prerequisite is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


def shared_path(*parts: str) -> Path:
    """``../shared/<parts>``, or skip (fail in CI) naming the missing folder or file."""
    path = SHARED.joinpath(*parts)
    if not SHARED.is_dir():
        unavailable(f"needs the shared material folder {SHARED} (absent on a plain clone)")
    if not path.exists():
        unavailable(f"needs {path} (not found in the shared material)")
    return path
