"""The small sample inputs the pack's templates (``example_workflows/``) load, put into ComfyUI's input folder.

A template opens and runs as shipped only if the files its Load Image / Load Video nodes name exist in ComfyUI's
``input/`` folder. When ComfyUI loads the pack, each sample is copied there once under its ``lowlight_`` name
if no file of that name exists: a user's file is never overwritten, and a sample the user deleted or edited is
left as they left it until the name is free again. The copy is atomic (temporary file, then a hard link that
fails if the name was taken meanwhile), so a half-written sample is never seen.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Dict, Optional

from ..pipelines.media.atomic_files import temporary_path_for
from .model_folders import PACK_ROOT

ASSETS = PACK_ROOT / "assets"
# Input-folder name -> shipped file. Names carry the pack's prefix so that they never meet a user's own files.
EXAMPLE_INPUTS: Dict[str, Path] = {
    "lowlight_sample_night.jpg": ASSETS / "sample_night.jpg",
    "lowlight_night_frames.webp": ASSETS / "night_frames.webp",
    "lowlight_night_clip.mp4": ASSETS / "night_clip.mp4",
}


def _input_directory() -> Optional[Path]:
    try:
        import folder_paths
    except ImportError:
        return None
    return Path(folder_paths.get_input_directory())


def copy_if_absent(source: Path, target: Path) -> bool:
    """Copy ``source`` to ``target`` unless ``target`` exists (never overwrites, never leaves a partial file)."""
    if target.exists() or target.is_symlink():
        return False
    temporary = temporary_path_for(target)
    try:
        shutil.copyfile(source, temporary)
        os.link(temporary, target)  # fails with FileExistsError if the name was taken meanwhile
        return True
    except FileExistsError:
        return False
    finally:
        temporary.unlink(missing_ok=True)


def install_example_inputs(input_dir: Optional[Path] = None) -> list:
    """Copy each sample missing from ComfyUI's input folder (``input_dir`` or ``folder_paths``'s); returns the names
    copied. Problems (read-only folder, ...) are logged, never raised: they must not stop ComfyUI from starting."""
    input_dir = input_dir or _input_directory()
    if input_dir is None:
        return []
    copied = []
    for name, source in EXAMPLE_INPUTS.items():
        try:
            input_dir.mkdir(parents=True, exist_ok=True)
            if copy_if_absent(source, input_dir / name):
                copied.append(name)
        except OSError as exc:
            logging.warning("comfyui-lowlight: could not copy the template input %s into %s: %s", name, input_dir, exc)
    return copied
