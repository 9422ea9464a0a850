"""The pack's model folders (``models/sgz``, ``models/scuf``), the weights dropdowns built from them, and the SCUF
loader's dropdowns over ComfyUI's ``models/diffusers``, ``models/checkpoints`` and ``models/clip_vision``.

ComfyUI's ``folder_paths`` is imported lazily and only if present: the pack is also imported outside ComfyUI
(the CLI, the tests), where the dropdowns list the shipped weights in ``lora_weights/`` only.

Dropdown values: shipped files appear as ``lora_weights/<file>``; files found in a registered model folder keep
the relative name ComfyUI gives them (e.g. ``Epoch99.pth`` or ``night/run3.safetensors``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

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


def inside_folder(choice: str, what: str, folder: str) -> str:
    """``choice`` as a relative ``/`` path that stays inside its model folder; ``ValueError`` for an absolute path or
    one that climbs out with ``..`` (a node value may come from an edited or downloaded graph, not the dropdown)."""
    parts = Path(choice.replace("\\", "/")).parts
    if not choice or Path(choice).is_absolute() or choice.startswith(("/", "\\")) or ".." in parts:
        raise ValueError(f"{what}: {choice!r} must name a file or folder inside {folder}, without '..' or an "
                         "absolute path")
    return "/".join(parts)


def resolve_weights(folder_name: str, choice: str) -> Path:
    """Path of a dropdown value from :func:`weight_choices`.

    Raises ``FileNotFoundError`` naming the value and the folders where such a file is expected, ``ValueError`` for a
    value that points outside them.
    """
    choice = inside_folder(choice, "scuf_weights" if folder_name == SCUF_FOLDER else "weights",
                           f"ComfyUI's models/{folder_name}/ or {SHIPPED_DIR}")
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


DIFFUSERS_FOLDER, CHECKPOINTS_FOLDER, CLIP_VISION_FOLDER = "diffusers", "checkpoints", "clip_vision"
DIFFUSERS_PREFIX, CHECKPOINTS_PREFIX = DIFFUSERS_FOLDER + "/", CHECKPOINTS_FOLDER + "/"
# The default names (what the hub downloads are saved as) are always listed first, even before the files exist:
# saved workflows and the templates stay valid, and running them lists every missing part with where it goes
# instead of failing validation with "value not in list". Every other dropdown entry exists.
DEFAULT_BASE = DIFFUSERS_PREFIX + "sd-turbo"
DEFAULT_CLIP = "clip-vit-base-patch32"
CLIP_FROM_BASE = "(image_encoder/ in the base model folder)"
DEFAULT_SCUF_WEIGHTS = "scuf_lowlight.safetensors"

CHECKPOINT_EXTENSIONS = (".safetensors", ".ckpt")
CLIP_EXTENSIONS = (".safetensors", ".pt", ".pth", ".bin")
# Ours are .safetensors; the official GEFU trainer writes torch.save dicts (.pkl), read with weights_only=True.
SCUF_EXTENSIONS = (".safetensors", ".pkl", ".pth", ".pt", ".ckpt")

BASE_DOWNLOAD_HELP = (
    "the diffusers folder of stabilityai/sd-turbo (model_index.json, unet/, vae/, text_encoder/, tokenizer/, "
    "scheduler/), or its single file sd_turbo.safetensors"
)
SD_TURBO_URL = "https://huggingface.co/stabilityai/sd-turbo"
CLIP_URL = "https://huggingface.co/openai/clip-vit-base-patch32"
SCUF_WEIGHTS_URL = "https://github.com/wangsen99/GEFU"
# Download sizes, rounded: what a user budgets before pressing Run.
SD_TURBO_SIZE = "about 5 GB"
CLIP_SIZE = "about 0.6 GB"
SCUF_WEIGHTS_SIZE = "the official checkpoint about 1 GB; after `lowlight convert-scuf` a few MB"

CLIP_DOWNLOAD_HELP = (
    "the transformers folder of openai/clip-vit-base-patch32 (config.json + model.safetensors), or an OpenAI CLIP "
    "ViT-B/32 state dict saved with torch.save(model.state_dict())"
)


# -------------------------------------------------------------------------- SCUF: SD-Turbo, CLIP, SCUF weights


def _walk(folder_name: str):
    """``(root, dirpath, subdirs, files)`` for every directory ComfyUI searches for ``folder_name`` (links followed)."""
    for root in folder_dirs(folder_name):
        if os.path.isdir(root):
            for dirpath, subdirs, files in os.walk(root, followlinks=True):
                subdirs.sort()
                yield root, dirpath, subdirs, files


def model_folders_with(folder_name: str, marker: str) -> List[str]:
    """Relative paths (``/``-separated) of the folders under ``models/<folder_name>`` that contain ``marker``."""
    found = []
    for root, dirpath, subdirs, files in _walk(folder_name):
        if dirpath != root and marker in files:
            found.append(Path(os.path.relpath(dirpath, root)).as_posix())
            subdirs[:] = []  # a model folder's own subfolders (unet/, vae/, ...) are not models
    return sorted(set(found))


def model_files(folder_name: str, extensions: Tuple[str, ...], skip_folders_with: Optional[str] = None) -> List[str]:
    """Relative paths of the files under ``models/<folder_name>`` ending in ``extensions``.

    Files inside a folder that contains ``skip_folders_with`` (e.g. a transformers folder's weights) are left out:
    that folder is listed as one model instead.
    """
    found = []
    for root, dirpath, subdirs, files in _walk(folder_name):
        if skip_folders_with and dirpath != root and skip_folders_with in files:
            subdirs[:] = []
            continue
        found += [
            Path(os.path.relpath(os.path.join(dirpath, f), root)).as_posix()
            for f in files
            if f.lower().endswith(extensions)
        ]
    return sorted(set(found))


def find_in_folder(folder_name: str, relative: str, want_dir: bool) -> Optional[Path]:
    """The first existing ``<dir>/<relative>`` of ``models/<folder_name>`` (a directory if ``want_dir``, else a file).

    ``relative`` must stay inside the folder (:func:`inside_folder`)."""
    relative = inside_folder(relative, folder_name, f"ComfyUI's models/{folder_name}/")
    for root in folder_dirs(folder_name):
        candidate = Path(root) / relative
        if (candidate.is_dir() if want_dir else candidate.is_file()):
            return candidate
    return None


def _places(folder_name: str) -> str:
    dirs = folder_dirs(folder_name)
    return ", ".join(dirs) if dirs else f"ComfyUI's models/{folder_name}/"


def _unique(items: List[str]) -> List[str]:
    return list(dict.fromkeys(items))


def base_choices() -> List[str]:
    """``diffusers/<folder>`` for folders with ``model_index.json``, ``checkpoints/<file>`` for single files; the
    default ``diffusers/sd-turbo`` always comes first (see :data:`DEFAULT_BASE`), everything else exists."""
    folders = [DIFFUSERS_PREFIX + name for name in model_folders_with(DIFFUSERS_FOLDER, "model_index.json")]
    files = [CHECKPOINTS_PREFIX + name for name in model_files(CHECKPOINTS_FOLDER, CHECKPOINT_EXTENSIONS)]
    return _unique([DEFAULT_BASE] + folders + files)


def _bases_with_image_encoder() -> bool:
    return any(
        (Path(root) / name / "image_encoder" / "config.json").is_file()
        for root in folder_dirs(DIFFUSERS_FOLDER)
        for name in model_folders_with(DIFFUSERS_FOLDER, "model_index.json")
    )


def clip_choices() -> List[str]:
    """CLIP image encoders: transformers folders and state-dict files in ``models/clip_vision`` (the default name
    first), and the base folder's own ``image_encoder/`` when a base folder has one."""
    folders = model_folders_with(CLIP_VISION_FOLDER, "config.json")
    files = model_files(CLIP_VISION_FOLDER, CLIP_EXTENSIONS, skip_folders_with="config.json")
    from_base = [CLIP_FROM_BASE] if _bases_with_image_encoder() else []
    return _unique([DEFAULT_CLIP] + folders + files + from_base)


def scuf_weight_choices() -> List[str]:
    """SCUF weights: the default name first, shipped ``lora_weights/scuf*.safetensors``, then every weights file in
    ``models/scuf``."""
    return _unique([DEFAULT_SCUF_WEIGHTS] + shipped_weights("scuf*.safetensors")
                   + model_files(SCUF_FOLDER, SCUF_EXTENSIONS))


def base_missing(choice: str) -> Optional[str]:
    """Why the base model ``choice`` cannot be used (where it goes, its size, where to download it), or None."""
    try:
        resolve_base(choice)
    except FileNotFoundError as exc:
        return str(exc)
    return None


def clip_missing(choice: str, base_choice: str) -> Optional[str]:
    try:
        base_path = resolve_base(base_choice)
    except FileNotFoundError:
        base_path = None
    if choice == CLIP_FROM_BASE and base_path is None:
        return None  # the base's own encoder: the base's message already says what is missing
    try:
        resolve_clip(choice, base_path)
    except FileNotFoundError as exc:
        return str(exc)
    return None


def any_scuf_weights() -> bool:
    """Whether any SCUF weights file is installed (shipped or in ``models/scuf``)."""
    return bool(shipped_weights("scuf*.safetensors") or model_files(SCUF_FOLDER, SCUF_EXTENSIONS))


def scuf_weights_missing(choice: Optional[str] = None) -> Optional[str]:
    """Why SCUF weights are not usable: the chosen file (``choice``) is absent, or (``choice=None``) there is none at
    all; with where they go, their size and where to download them. None when they are there."""
    if choice is None:
        if any_scuf_weights():
            return None
        choice = DEFAULT_SCUF_WEIGHTS
    else:
        try:
            resolve_weights(SCUF_FOLDER, choice)
            return None
        except FileNotFoundError:
            pass
    return (
        f"SCUF weights {choice!r} not found: put the official GEFU checkpoint (.pkl) or this project's .safetensors "
        f"into one of: {_places(SCUF_FOLDER)} ({SCUF_WEIGHTS_SIZE}). Download: {SCUF_WEIGHTS_URL}; convert once with "
        f"`lowlight convert-scuf official.pkl {'/'.join(folder_dirs(SCUF_FOLDER)[:1] or ['models/scuf'])}/"
        f"{DEFAULT_SCUF_WEIGHTS}`."
    )


def check_scuf_parts(model: str, clip: str, scuf_weights: Optional[str] = None) -> None:
    """Check the three parts SCUF needs (SD-Turbo base, CLIP image encoder, SCUF weights) before loading anything;
    ``FileNotFoundError`` listing every missing one, so a new user downloads everything after one run.

    ``scuf_weights=None`` (the base loader, which has no weights input): only whether any SCUF weights exist at all.
    """
    problems = [p for p in (base_missing(model), clip_missing(clip, model), scuf_weights_missing(scuf_weights)) if p]
    if problems:
        count = f"{len(problems)} of the 3 parts SCUF needs {'are' if len(problems) > 1 else 'is'} missing"
        raise FileNotFoundError(f"{count}:\n" + "\n".join(f"{i}. {p}" for i, p in enumerate(problems, 1))
                                + "\nThen run the graph again (no restart needed).")


def resolve_base(choice: str) -> Path:
    """Path of a :func:`base_choices` value (a diffusers folder or a single file); ``FileNotFoundError`` says where
    it goes, how big it is and where to download it. ``SCUFPipeline.from_path`` tells the two apart."""
    if choice.startswith(DIFFUSERS_PREFIX):
        name = inside_folder(choice[len(DIFFUSERS_PREFIX):], "model", f"ComfyUI's models/{DIFFUSERS_FOLDER}/")
        path = find_in_folder(DIFFUSERS_FOLDER, name, want_dir=True)
        if path is not None and (path / "model_index.json").is_file():
            return path
        where = f"put {BASE_DOWNLOAD_HELP.split(', or')[0]} into one of: {_places(DIFFUSERS_FOLDER)} as {name}/"
    elif choice.startswith(CHECKPOINTS_PREFIX):
        name = inside_folder(choice[len(CHECKPOINTS_PREFIX):], "model", f"ComfyUI's models/{CHECKPOINTS_FOLDER}/")
        path = find_in_folder(CHECKPOINTS_FOLDER, name, want_dir=False)
        if path is not None:
            return path
        where = f"put the single-file checkpoint {name} into one of: {_places(CHECKPOINTS_FOLDER)}"
    else:
        raise ValueError(f"model: {choice!r} is neither '{DIFFUSERS_PREFIX}<folder>' nor '{CHECKPOINTS_PREFIX}<file>'")
    raise FileNotFoundError(
        f"SD-Turbo base model {choice!r} not found: {where} ({SD_TURBO_SIZE}). Download {BASE_DOWNLOAD_HELP} from "
        f"{SD_TURBO_URL}."
    )


def resolve_clip(choice: str, base_path: Optional[Path]) -> Optional[Path]:
    """Path of a :func:`clip_choices` value (a folder or file); ``None`` = the base folder's ``image_encoder/``."""
    if choice == CLIP_FROM_BASE:
        if base_path is not None and (base_path / "image_encoder" / "config.json").is_file():
            return None
        raise FileNotFoundError(
            f"clip: the base model {base_path} has no image_encoder/ folder; choose a CLIP image encoder from "
            f"{_places(CLIP_VISION_FOLDER)} ({CLIP_DOWNLOAD_HELP})"
        )
    inside_folder(choice, "clip", f"ComfyUI's models/{CLIP_VISION_FOLDER}/")
    folder = find_in_folder(CLIP_VISION_FOLDER, choice, want_dir=True)
    if folder is not None and (folder / "config.json").is_file():
        return folder
    file = find_in_folder(CLIP_VISION_FOLDER, choice, want_dir=False)
    if file is not None:
        return file
    raise FileNotFoundError(
        f"CLIP image encoder {choice!r} not found: put {CLIP_DOWNLOAD_HELP} into one of: "
        f"{_places(CLIP_VISION_FOLDER)} (a folder named {choice}/ for the transformers layout; {CLIP_SIZE}). "
        f"Download: {CLIP_URL}."
    )


def file_stamp(path: Optional[Path]) -> tuple:
    """Changes when the file (or a folder's files) is replaced, so that a new download is loaded, not the cache."""
    if path is None:
        return ()
    if path.is_file():
        stat = path.stat()
        return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    stats = [(str(p.relative_to(path)), p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(path.rglob("*"))
             if p.is_file()]
    return (str(path.resolve()), tuple(stats))
