"""Atomic file writes: the one way this package writes a file that must never be seen half-written.

Every writer (images, videos, weights, captions, training state) writes under a hidden temporary name in the
destination's folder and renames it over the destination with ``os.replace`` only when the write succeeded; on
any error or interrupt the temporary file is removed and the destination is untouched. The leading dot makes
folder scans skip a leftover of a killed run, and the kept extension lets writers infer the format from it.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temporary_path_for(path: str | os.PathLike) -> Path:
    """A unique hidden path beside ``path`` that keeps its extension (writers infer the format from it)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.part{path.suffix}")


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The destination's folder must exist. On any error (or interrupt) the temporary file is removed and ``path``
    is untouched.
    """
    temporary = temporary_path_for(path)
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
