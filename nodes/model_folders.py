"""The pack's model folders (``models/sgz``, ``models/scuf``) and the weights dropdowns built from them.

ComfyUI's ``folder_paths`` is imported lazily and only if present: the pack is also imported outside ComfyUI
(the CLI, the tests), where the dropdowns list the shipped weights in ``lora_weights/`` only.

Dropdown values: shipped files appear as ``lora_weights/<file>``; files found in a registered model folder keep
the relative name ComfyUI gives them (e.g. ``Epoch99.pth`` or ``night/run3.safetensors``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, List

PACK_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_DIR = PACK_ROOT / "lora_weights"
SHIPPED_PREFIX = "lora_weights/"

SGZ_FOLDER = "sgz"
SCUF_FOLDER = "scuf"
# Ours are safetensors; official checkpoints are .pth/.pt/.ckpt state dicts (read with weights_only=True).
WEIGHT_EXTENSIONS = (".safetensors", ".pth", ".pt", ".ckpt")


def _folder_paths():
    """ComfyUI's ``folder_paths`` module, or ``None`` outside ComfyUI."""
    try:
        import folder_paths
    except ImportError:
        return None
    return folder_paths


def register_model_folders(folder_names: Iterable[str] = (SGZ_FOLDER, SCUF_FOLDER)) -> bool:
    """Register ``models/<name>`` for each name with ComfyUI, keeping paths ``extra_model_paths.yaml`` already set.

    ComfyUI reads ``extra_model_paths.yaml`` before it imports custom nodes, so an ``sgz:`` entry there may
    already have created the folder name (with no extensions): the default folder is appended to those paths and
    the weight extensions are added. Returns ``False`` when ComfyUI is not importable (nothing to register).
    """
    folder_paths = _folder_paths()
    if folder_paths is None:
        return False
    for name in folder_names:
        default_dir = os.path.join(folder_paths.models_dir, name)
        entry = folder_paths.folder_names_and_paths.get(name)
        if entry is None:
            folder_paths.folder_names_and_paths[name] = ([default_dir], set(WEIGHT_EXTENSIONS))
            continue
        paths, extensions = entry
        if default_dir not in paths:
            paths.append(default_dir)
        extensions = set(extensions) | set(WEIGHT_EXTENSIONS)
        folder_paths.folder_names_and_paths[name] = (paths, extensions)
    return True


def shipped_weights(pattern: str) -> List[str]:
    """Dropdown names of the files in ``lora_weights/`` matching ``pattern`` (e.g. ``"sgz*.safetensors"``)."""
    if not SHIPPED_DIR.is_dir():
        return []
    return [SHIPPED_PREFIX + p.name for p in sorted(SHIPPED_DIR.glob(pattern)) if p.is_file()]


def weight_choices(folder_name: str, shipped_pattern: str, default_shipped: str) -> List[str]:
    """Dropdown values: the shipped weights first, then the files of ComfyUI's ``models/<folder_name>``.

    ``default_shipped`` (a file name in ``lora_weights/``) is always listed first, even before it exists, so that
    saved workflows stay valid and running them says where the file is expected instead of failing validation.
    """
    choices = [SHIPPED_PREFIX + default_shipped]
    choices += [c for c in shipped_weights(shipped_pattern) if c not in choices]
    folder_paths = _folder_paths()
    if folder_paths is not None and folder_name in folder_paths.folder_names_and_paths:
        choices += [
            name
            for name in folder_paths.get_filename_list(folder_name)
            if name.lower().endswith(WEIGHT_EXTENSIONS) and name not in choices
        ]
    return choices


def folder_dirs(folder_name: str) -> List[str]:
    """The directories ComfyUI searches for ``folder_name`` (empty outside ComfyUI)."""
    folder_paths = _folder_paths()
    if folder_paths is None or folder_name not in folder_paths.folder_names_and_paths:
        return []
    return list(folder_paths.folder_names_and_paths[folder_name][0])


def resolve_weights(folder_name: str, choice: str) -> Path:
    """Path of a dropdown value from :func:`weight_choices`.

    Raises ``FileNotFoundError`` naming the value and the folders where such a file is expected.
    """
    if choice.startswith(SHIPPED_PREFIX):
        path = SHIPPED_DIR / choice[len(SHIPPED_PREFIX):]
        if path.is_file():
            return path
    else:
        folder_paths = _folder_paths()
        found = folder_paths.get_full_path(folder_name, choice) if folder_paths is not None else None
        if found:
            return Path(found)
    places = [str(SHIPPED_DIR)] + folder_dirs(folder_name)
    raise FileNotFoundError(
        f"weights {choice!r} not found; put the file in one of: {', '.join(places)} "
        f"(ComfyUI model folder name {folder_name!r})"
    )
