"""The tiny SCUF model of tests/tiny_scuf.py (made in code, no ``../shared``) placed in a real ComfyUI server's
model folders.

The SCUF templates (``example_workflows/*_scuf_*.json``) name the files a user would download; here the tiny models take
those names, so the workflows run unchanged:

- ``models/diffusers/sd-turbo`` -> the tiny diffusers base folder (a link);
- ``models/clip_vision/clip-vit-base-patch32/`` -> the tiny OpenAI CLIP in the transformers layout (a link);
- ``models/clip_vision/clip_tiny.pt`` -> the tiny OpenAI CLIP state dict itself (a link);
- ``models/scuf/scuf_lowlight.safetensors`` -> the tiny official-format checkpoint converted with this project's
  converter CLI;
- ``models/scuf/scuf_official_tiny.pkl`` -> the tiny official-format checkpoint as is (a link).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from comfy_host import ComfyServer, stage_examples
from tiny_scuf import SCUFFixture

BASE_NAME = "sd-turbo"
CLIP_FOLDER_NAME = "clip-vit-base-patch32"
CLIP_FILE_NAME = "clip_tiny.pt"
SCUF_CONVERTED_NAME = "scuf_lowlight.safetensors"
SCUF_OFFICIAL_NAME = "scuf_official_tiny.pkl"


def convert_official(fixture: SCUFFixture, output: Path) -> Path:
    """The official-format checkpoint converted to our format with the project's converter CLI (once per path)."""
    if not output.is_file():
        subprocess.run(
            [sys.executable, "-m", "comfyui_lowlight", "convert-scuf",
             str(fixture.official), str(output), "--unet-config", str(fixture.base / "unet")],
            check=True, capture_output=True, text=True,
        )
        if not output.is_file():
            raise AssertionError(f"lowlight convert-scuf exited 0 but wrote no {output}")
    return output


def stage_scuf_models(server: ComfyServer, fixture: SCUFFixture) -> None:
    """Put the tiny SCUF models under the workflows' names in ``server``'s model folders (idempotent)."""
    stage_examples(server)  # the example image and the SGZ weights the side-by-side workflow uses
    made = server.session_dir / "scuf_made"
    made.mkdir(exist_ok=True)
    server.add_model("diffusers", fixture.base, BASE_NAME)
    server.add_model("clip_vision", fixture.clip_folder, CLIP_FOLDER_NAME)
    server.add_model("clip_vision", fixture.clip, CLIP_FILE_NAME)
    server.add_model("scuf", convert_official(fixture, made / SCUF_CONVERTED_NAME))
    server.add_model("scuf", fixture.official, SCUF_OFFICIAL_NAME)


@pytest.fixture(scope="session")
def scuf_models(comfy_server, tiny_scuf) -> ComfyServer:
    """The session's real ComfyUI server with the tiny SCUF models in its folders."""
    stage_scuf_models(comfy_server, tiny_scuf)
    return comfy_server
