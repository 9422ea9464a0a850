"""Image captions for SCUF's caption consistency (paper sec. 3.2): written once by BLIP, read by the trainer.

Captions file (JSON, written atomically)::

    {"format": "comfyui-lowlight/scuf-captions", "format_version": 1, "captioner": "<model>",
     "low": {"<path relative to the low folder, '/'-separated>": "<caption>", ...},
     "normal": {"<path relative to the normal folder>": "<caption>", ...}}

:func:`match_captions` checks that a file covers exactly the images the trainer found (both ways), so a captions
file made for another dataset fails before any model is loaded. As the official caption script, night words are
mapped to day words (``night`` -> ``day``, ...) by default: the caption describes the content, and the darken /
lighten prompts carry the lighting.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..media.atomic_files import atomic_output

CAPTIONS_FORMAT = "comfyui-lowlight/scuf-captions"
CAPTIONS_VERSION = 1
DOMAINS = ("low", "normal")
DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-base"
#: The official caption script's ``NIGHT2DAY`` mapping (applied in this order, whole words here).
NIGHT_TO_DAY = (
    ("low-light", "normal-light"), ("low light", "normal light"), ("nighttime", "daytime"), ("night", "day"),
    ("evening", "morning"), ("dark", "bright"), ("dim", "clear"), ("moonlit", "sunny"), ("shadows", "sunlight"),
)
_MAX_LISTED = 10


class CaptionsError(ValueError):
    """A captions file that is malformed or does not match the training images."""


def night_to_day(text: str) -> str:
    """Replace night words by day words (whole words, case-insensitive)."""
    for old, new in NIGHT_TO_DAY:
        text = re.sub(rf"\b{re.escape(old)}\b", new, text, flags=re.IGNORECASE)
    return text


def relative_key(path, root) -> str:
    """The key of an image in a captions file: its path relative to its folder, '/'-separated."""
    # abspath, not resolve: a symlinked image inside the folder keeps its name inside the folder
    return Path(os.path.abspath(path)).relative_to(os.path.abspath(root)).as_posix()


def save_captions(path, captions: dict[str, dict[str, str]], captioner: str) -> None:
    """Write ``{"low": {key: caption}, "normal": {...}}`` atomically (temp file in the same folder + rename)."""
    path = os.fspath(path)
    data = {"format": CAPTIONS_FORMAT, "format_version": CAPTIONS_VERSION, "captioner": captioner}
    for domain in DOMAINS:
        data[domain] = dict(sorted(captions.get(domain, {}).items()))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_output(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(data, handle, ensure_ascii=False, indent=1)


def load_captions(path) -> dict[str, dict[str, str]]:
    """Read a captions file -> ``{"low": {key: caption}, "normal": {...}}`` (raises :class:`CaptionsError`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CaptionsError(f"--captions: file not found: {path} (write it with the `caption` subcommand)")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CaptionsError(f"{path}: not a JSON captions file ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != CAPTIONS_FORMAT:
        raise CaptionsError(f"{path}: not a SCUF captions file (expected \"format\": \"{CAPTIONS_FORMAT}\")")
    if data.get("format_version") != CAPTIONS_VERSION:
        raise CaptionsError(f"{path}: format_version {data.get('format_version')!r} is not supported")
    out = {}
    for domain in DOMAINS:
        entries = data.get(domain)
        if not isinstance(entries, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in entries.items()
        ):
            raise CaptionsError(f"{path}: \"{domain}\" must map image paths to caption strings")
        out[domain] = entries
    return out


def _listing(items) -> str:
    items = sorted(items)
    more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


def match_captions(captions: dict[str, dict[str, str]], domain: str, keys: list[str], path="captions") -> list[str]:
    """Captions of ``keys`` (relative image paths of ``domain``), in order; error if the file does not match.

    The file must hold exactly these images: missing ones and extra ones (another dataset, renamed files) are
    both errors, listed in the message.
    """
    entries = captions[domain]
    missing = [k for k in keys if k not in entries]
    extra = sorted(set(entries) - set(keys))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} {domain} image(s) have no caption: {_listing(missing)}")
        if extra:
            parts.append(f"{len(extra)} {domain} caption(s) name images that are not in the folder (or are "
                         f"unreadable): {_listing(extra)}")
        raise CaptionsError(f"{path} does not match the --{domain} images: " + "; ".join(parts)
                            + ". Re-run the `caption` subcommand for this data.")
    empty = [k for k in keys if not entries[k].strip()]
    if empty:
        raise CaptionsError(f"{path}: empty caption for {domain} image(s) {_listing(empty)}")
    return [entries[k] for k in keys]


def load_captioner(model: str = DEFAULT_CAPTIONER, device=None, local_files_only: bool | None = None):
    """``(processor, BlipForConditionalGeneration)`` from a hub id or folder (transformers, imported lazily)."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    kwargs = {} if local_files_only is None else {"local_files_only": local_files_only}
    try:
        processor = BlipProcessor.from_pretrained(model, **kwargs)
        net = BlipForConditionalGeneration.from_pretrained(model, **kwargs)
    except OSError as exc:
        raise OSError(
            f"captioner {model!r} could not be loaded (a BLIP captioning model: hub id such as "
            f"'{DEFAULT_CAPTIONER}' or a local folder; download it with `huggingface-cli download "
            f"{DEFAULT_CAPTIONER}`): {exc}"
        ) from exc
    net.requires_grad_(False).eval()
    return processor, (net.to(device) if device is not None else net)


def caption_images(images, processor, model, batch_size: int = 8, max_new_tokens: int = 30,
                   day_words: bool = True, progress=None) -> list[str]:
    """Captions for a list of ``HxWx3`` uint8 arrays / PIL images (greedy decoding, deterministic)."""
    import torch

    device = next(model.parameters()).device
    captions = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        inputs = processor(images=batch, return_tensors="pt").to(device)
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        for text in processor.batch_decode(ids, skip_special_tokens=True):
            text = " ".join(text.split())
            captions.append(night_to_day(text) if day_words else text)
        if progress is not None:
            progress.update(len(batch))
    return captions
