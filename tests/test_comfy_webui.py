"""The pack's UI-format workflows in the real ComfyUI web UI, in headless Chromium (selenium).

Each workflow is loaded the way the UI's Load does (``app.loadGraphData``), must open without the
missing-node dialog, must produce exactly its API twin when the UI converts it, and is then queued from the UI;
a screenshot of the graph with its results goes to ``docs/images/comfy_<workflow>.png`` (used by the README).
"""

import json

import pytest
from PIL import Image

from comfy_host import OFFICIAL_SGZ, REPO_ROOT, SHIPPED_SGZ_CHOICE, stage_examples
from comfyui_lowlight import NODE_CLASS_MAPPINGS

WORKFLOWS = REPO_ROOT / "workflows"
SCREENSHOTS = REPO_ROOT / "docs" / "images"


@pytest.fixture(scope="module")
def browser(comfy_browser, comfy_server, shared_dir):
    stage_examples(comfy_server, shared_dir)
    return comfy_browser


def test_pack_nodes_are_registered_in_the_ui(browser):
    categories = browser.driver.execute_script(
        "return Object.fromEntries(arguments[0].map((t) => [t, LiteGraph.registered_node_types[t]?.category]));",
        list(NODE_CLASS_MAPPINGS),
    )
    assert categories == {name: "image/lowlight" for name in NODE_CLASS_MAPPINGS}


@pytest.mark.parametrize("workflow", sorted(WORKFLOWS.glob("*.json")), ids=lambda p: p.stem)
def test_ui_workflow_loads_converts_runs_and_is_screenshotted(browser, workflow):
    dialog = browser.load_workflow(json.loads(workflow.read_text()))
    assert dialog is None, f"{workflow.name}: {dialog}"
    twin = json.loads((WORKFLOWS / "api" / workflow.name).read_text())
    assert browser.graph_to_prompt() == twin

    if not (REPO_ROOT / SHIPPED_SGZ_CHOICE).is_file():  # until trained weights ship, run with the official ones
        for node_id, node in twin.items():
            if node["inputs"].get("weights") == SHIPPED_SGZ_CHOICE:
                browser.set_widget_values(int(node_id), {"weights": OFFICIAL_SGZ})
    browser.queue_and_wait()
    path = browser.screenshot_graph(SCREENSHOTS / f"comfy_{workflow.stem}.png")
    with Image.open(path) as shot:
        assert shot.width >= 800 and shot.height >= 500
        assert len(set(shot.convert("L").resize((64, 40)).getdata())) > 20  # a drawn graph, not a blank canvas
