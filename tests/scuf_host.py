"""The tiny SCUF fixture (``../shared/reference/scuf``) placed in a real ComfyUI server's model folders.

The SCUF workflows (``workflows/scuf_*.json``) name the files a user would download; here the tiny models take
those names, so the workflows run unchanged:

- ``models/diffusers/sd-turbo`` -> the tiny diffusers base folder (a link);
- ``models/clip_vision/clip-vit-base-patch32/`` -> the tiny OpenAI CLIP converted to the transformers layout;
- ``models/clip_vision/clip_tiny.pt`` -> the tiny OpenAI CLIP state dict itself (a link);
- ``models/scuf/scuf_lowlight.safetensors`` -> the official tiny checkpoint converted with this project's converter;
- ``models/scuf/scuf_official_tiny.pkl`` -> the official tiny checkpoint as is (a link).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from comfy_host import ComfyServer, stage_examples

BASE_NAME = "sd-turbo"
CLIP_FOLDER_NAME = "clip-vit-base-patch32"
CLIP_FILE_NAME = "clip_tiny.pt"
SCUF_CONVERTED_NAME = "scuf_lowlight.safetensors"
SCUF_OFFICIAL_NAME = "scuf_official_tiny.pkl"


def scuf_fixture_dir(shared: Path) -> Path:
    return shared / "reference" / "scuf"


def convert_official(shared: Path, output: Path) -> Path:
    """The official tiny checkpoint converted to our format with the project's converter CLI (once per path)."""
    if not output.is_file():
        fixture = scuf_fixture_dir(shared)
        subprocess.run(
            [sys.executable, "-m", "comfyui_lowlight.pipelines.scuf_weights", "convert",
             str(fixture / SCUF_OFFICIAL_NAME), str(output), "--unet-config", str(fixture / "base" / "unet")],
            check=True, capture_output=True, text=True,
        )
    return output


def clip_transformers_folder(shared: Path, output: Path) -> Path:
    """The tiny OpenAI-format CLIP saved as a transformers ``CLIPVisionModelWithProjection`` folder."""
    if not (output / "config.json").is_file():
        from comfyui_lowlight.pipelines.clip_image_encoder import load_clip_image_encoder

        load_clip_image_encoder(scuf_fixture_dir(shared) / CLIP_FILE_NAME).save_pretrained(output)
    return output


def stage_scuf_models(server: ComfyServer, shared: Path) -> None:
    """Put the tiny SCUF models under the workflows' names in ``server``'s model folders (idempotent)."""
    stage_examples(server, shared)  # the example image and the SGZ weights the side-by-side workflow uses
    fixture = scuf_fixture_dir(shared)
    made = server.session_dir / "scuf_made"
    made.mkdir(exist_ok=True)
    server.add_model("diffusers", fixture / "base", BASE_NAME)
    server.add_model("clip_vision", clip_transformers_folder(shared, made / CLIP_FOLDER_NAME), CLIP_FOLDER_NAME)
    server.add_model("clip_vision", fixture / CLIP_FILE_NAME)
    server.add_model("scuf", convert_official(shared, made / SCUF_CONVERTED_NAME))
    server.add_model("scuf", fixture / SCUF_OFFICIAL_NAME)


@pytest.fixture(scope="session")
def scuf_models(comfy_server, shared_dir) -> ComfyServer:
    """The session's real ComfyUI server with the tiny SCUF models in its folders."""
    stage_scuf_models(comfy_server, shared_dir)
    return comfy_server
