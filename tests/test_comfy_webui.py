"""The pack's UI-format workflows in the real ComfyUI 0.33 web UI (frontend 1.49), in headless Chromium (selenium).

Each template (``example_workflows/*.json``) is loaded the way the UI's template browser does
(``app.loadGraphData`` of the JSON the server serves at ``/api/workflow_templates/<pack>/<name>.json``), must open
with nothing flagged (no missing node types, models or input files, no error overlay, no dialog), must produce
exactly its API twin ``example_workflows/api/<name>.json`` when the UI converts it (``app.graphToPrompt``), and is
then run from the UI (the Run button's ``app.queuePrompt``); a screenshot of the graph with its results goes to
``docs/images/comfy_<name without its number>.png`` (used by the README).

The twins are what the UI's "Export (API)" writes. After a deliberate change to a template (or to the frontend
the tests run), ``LOWLIGHT_REGENERATE_API_TWINS=1 python -m pytest tests/test_comfy_webui.py`` rewrites them from
the UI, and ``LOWLIGHT_REGENERATE_THUMBNAILS=1`` rewrites the templates' thumbnails ``<name>.jpg`` from the run
(the saved output of an SGZ template; the graph with its results for a SCUF one, whose tiny test models only make
noise); review the diff before committing it.
"""

import json
import os

import pytest
from PIL import Image

from comfy_host import PACK_LINK_NAME, REPO_ROOT, stage_examples
from comfyui_lowlight.nodes import node_classes

WORKFLOWS = REPO_ROOT / "example_workflows"
SCREENSHOTS = REPO_ROOT / "docs" / "images"
THUMBNAIL_WIDTH = 512


@pytest.fixture(scope="module")
def browser(comfy_browser, scuf_models):
    stage_examples(scuf_models)  # (scuf_models: the SCUF workflows' tiny models, staged too)
    comfy_browser.refresh_node_definitions()  # the page opened before the files were there
    return comfy_browser


def test_pack_nodes_are_registered_in_the_ui(browser):
    ids = [cls.define_schema().node_id for cls in node_classes()]
    categories = browser.driver.execute_script(
        "return Object.fromEntries(arguments[0].map((t) => [t, LiteGraph.registered_node_types[t]?.category]));", ids,
    )
    assert categories == {name: "image/lowlight" for name in ids}


def write_thumbnail(browser, workflow, entry, screenshot):
    """``<template>.jpg`` from this run: the first saved image (a video's middle frame) of an SGZ template, the graph
    screenshot otherwise."""
    source = screenshot
    if workflow.stem.split("_")[1] == "sgz":
        saved = browser.server.output_files(entry)
        source = next(path for paths in saved.values() for path in paths)
    if source.suffix.lower() in (".mp4", ".mkv", ".webm"):  # a saved video: its middle frame
        import av

        with av.open(str(source)) as container:
            frames = [frame.to_image() for frame in container.decode(video=0)]
        image = frames[len(frames) // 2]
    else:
        with Image.open(source) as opened:
            image = opened.convert("RGB")
    image.thumbnail((THUMBNAIL_WIDTH, THUMBNAIL_WIDTH))
    image.save(workflow.with_suffix(".jpg"), quality=85)


# Widgets the frontend adds to a node for display only (Load Video's player). The server ignores them, and the
# frontend adds them once the media has loaded, so whether an export has them depends on timing.
_PREVIEW_WIDGETS = frozenset({"video-preview"})


def _without_preview_widgets(prompt: dict) -> dict:
    return {
        node_id: {**node, "inputs": {k: v for k, v in node["inputs"].items() if k not in _PREVIEW_WIDGETS}}
        for node_id, node in prompt.items()
    }


@pytest.mark.parametrize("workflow", sorted(WORKFLOWS.glob("*.json")), ids=lambda p: p.stem)
def test_ui_workflow_loads_converts_runs_and_is_screenshotted(browser, workflow):
    served = browser.server.get(f"/api/workflow_templates/{PACK_LINK_NAME}/{workflow.name}")  # as the UI fetches it
    flagged = browser.load_workflow(served)
    assert flagged is None, f"{workflow.name}: {flagged}"
    twin_path = WORKFLOWS / "api" / workflow.name
    if os.environ.get("LOWLIGHT_REGENERATE_API_TWINS") == "1":
        twin_path.write_text(browser.export_api() + "\n")
    twin = json.loads(twin_path.read_text())
    assert _without_preview_widgets(browser.graph_to_prompt()) == _without_preview_widgets(twin)

    prompt_id, shown = browser.queue_and_wait()
    entry = browser.server.get(f"/history/{prompt_id}")[prompt_id]
    produced = {node_id: len(out["images"]) for node_id, out in entry["outputs"].items() if out.get("images")}
    assert shown == produced  # every output node shows every image its run produced (batches: all frames)
    path = browser.screenshot_graph(SCREENSHOTS / f"comfy_{workflow.stem.split('_', 1)[1]}.png")
    with Image.open(path) as shot:
        assert shot.width >= 800 and shot.height >= 500
        assert len(set(shot.convert("L").resize((64, 40)).tobytes())) > 20  # a drawn graph, not a blank canvas
    if os.environ.get("LOWLIGHT_REGENERATE_THUMBNAILS") == "1":
        write_thumbnail(browser, workflow, entry, path)
    with Image.open(workflow.with_suffix(".jpg")) as thumbnail:  # every template ships one
        assert thumbnail.format == "JPEG" and max(thumbnail.size) <= THUMBNAIL_WIDTH
