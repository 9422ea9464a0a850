"""Shared test fixtures: the read-only shared material beside the repository, and the real ComfyUI host."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # test helpers (comfy_host, ...) importable by test modules
from comfy_stubs import install_comfy_api  # noqa: E402

install_comfy_api()  # the node classes import ComfyUI's comfy_api.latest: a stand-in outside ComfyUI
from comfy_host import comfy_browser, comfy_server  # noqa: E402,F401  session fixtures: real ComfyUI + its web UI
from scuf_host import scuf_models  # noqa: E402,F401  session fixture: the tiny SCUF models in that server
from shared_material import shared_path  # noqa: E402
from tiny_scuf import tiny_scuf  # noqa: E402,F401  session fixture: the tiny SCUF model made in code


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared``; tests that take it are skipped on a clone without it (and fail under ``CI=true``)."""
    return shared_path()


@pytest.fixture(autouse=True)
def _scuf_models_in_real_server(request):
    """Every real-server test may run the SCUF workflows (workflows/api/scuf_*.json): stage their tiny models first."""
    if "comfy_server" in request.fixturenames:
        request.getfixturevalue("scuf_models")
