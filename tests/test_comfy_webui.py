"""The pack's UI-format workflows in the real ComfyUI 0.33 web UI (frontend 1.49), in headless Chromium (selenium).

Each workflow is loaded the way the UI's Load does (``app.loadGraphData``), must open with nothing flagged
(no missing node types, models or input files, no error overlay, no dialog), must produce exactly its API twin
``workflows/api/<name>.json`` when the UI converts it (``app.graphToPrompt``), and is then run from the UI;
a screenshot of the graph with its results goes to ``docs/images/comfy_<workflow>.png`` (used by the README).

The twins are what the UI's "Export (API)" writes. After a deliberate change to a UI workflow (or to the frontend
the tests run), ``LOWLIGHT_REGENERATE_API_TWINS=1 python -m pytest tests/test_comfy_webui.py`` rewrites them from
the UI; review the diff before committing it.
"""

import json
import os

import pytest
from PIL import Image

from comfy_host import REPO_ROOT, stage_examples
from comfyui_lowlight import NODE_CLASS_MAPPINGS

WORKFLOWS = REPO_ROOT / "workflows"
SCREENSHOTS = REPO_ROOT / "docs" / "images"


@pytest.fixture(scope="module")
def browser(comfy_browser, scuf_models):
    stage_examples(scuf_models)  # (scuf_models: the SCUF workflows' tiny models, staged too)
    comfy_browser.refresh_node_definitions()  # the page opened before the files were there
    return comfy_browser


def test_pack_nodes_are_registered_in_the_ui(browser):
    categories = browser.driver.execute_script(
        "return Object.fromEntries(arguments[0].map((t) => [t, LiteGraph.registered_node_types[t]?.category]));",
        list(NODE_CLASS_MAPPINGS),
    )
    assert categories == {name: "image/lowlight" for name in NODE_CLASS_MAPPINGS}


@pytest.mark.parametrize("workflow", sorted(WORKFLOWS.glob("*.json")), ids=lambda p: p.stem)
def test_ui_workflow_loads_converts_runs_and_is_screenshotted(browser, workflow):
    flagged = browser.load_workflow(json.loads(workflow.read_text()))
    assert flagged is None, f"{workflow.name}: {flagged}"
    twin_path = WORKFLOWS / "api" / workflow.name
    if os.environ.get("LOWLIGHT_REGENERATE_API_TWINS") == "1":
        twin_path.write_text(browser.export_api() + "\n")
    twin = json.loads(twin_path.read_text())
    assert browser.graph_to_prompt() == twin

    prompt_id, shown = browser.queue_and_wait()
    entry = browser.server.get(f"/history/{prompt_id}")[prompt_id]
    produced = {node_id: len(out["images"]) for node_id, out in entry["outputs"].items() if out.get("images")}
    assert shown == produced  # every output node shows every image its run produced (batches: all frames)
    path = browser.screenshot_graph(SCREENSHOTS / f"comfy_{workflow.stem}.png")
    with Image.open(path) as shot:
        assert shot.width >= 800 and shot.height >= 500
        assert len(set(shot.convert("L").resize((64, 40)).tobytes())) > 20  # a drawn graph, not a blank canvas
