"""The pack inside a real ComfyUI 0.33 server (headless on CPU): node info, workflows, errors.

The server is the session fixture ``comfy_server`` (tests/comfy_host.py); the first run installs the host from
``../shared/hosts`` into a cache folder (about 4 minutes), later runs reuse it. Without that material the tests
are skipped (failed under ``CI=true``); ``LOWLIGHT_COMFY_HOST`` runs them in your own ComfyUI instead. Their
inputs and models are made from the repository (the bundled sample photo, a clip made with tests/media.py, the
shipped SGZ weights), so nothing else from ``../shared`` is needed.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from comfy_host import (
    EXAMPLE_FRAME_COUNT,
    EXAMPLE_FRAMES,
    EXAMPLE_IMAGE,
    REPO_ROOT,
    SGZ_PTH,
    PromptRejected,
    history_error,
    stage_examples,
)
from comfyui_lowlight import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WORKFLOWS = REPO_ROOT / "workflows"
UI_WORKFLOWS = sorted(WORKFLOWS.glob("*.json"))
API_WORKFLOWS = sorted((WORKFLOWS / "api").glob("*.json"))


@pytest.fixture(scope="module")
def server(comfy_server):
    stage_examples(comfy_server)
    return comfy_server


@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


def load_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def assert_enhanced(output: np.ndarray, source: np.ndarray):
    """Same size, clearly brighter, not blown out to white."""
    assert output.shape == source.shape
    assert output.mean() > source.mean() + 30, (output.mean(), source.mean())
    assert output.mean() < 200
    saturated = (output >= 250).all(axis=-1).mean()
    assert saturated < 0.05, f"{saturated:.1%} of the pixels are saturated white"


def test_object_info_lists_every_node_with_tooltips_and_types(object_info):
    for name, cls in NODE_CLASS_MAPPINGS.items():
        info = object_info[name]
        assert info["display_name"] == NODE_DISPLAY_NAME_MAPPINGS[name]
        assert info["category"] == "image/lowlight"
        assert info["description"] == cls.DESCRIPTION
        assert info["output"] == list(cls.RETURN_TYPES)
        assert info["output_name"] == list(cls.RETURN_NAMES)
        for section, local_inputs in cls.INPUT_TYPES().items():
            assert list(info["input"][section]) == list(local_inputs)
            for input_name, spec in info["input"][section].items():
                assert spec[1]["tooltip"] == local_inputs[input_name][1]["tooltip"], f"{name}.{input_name}"
                if isinstance(local_inputs[input_name][0], str):
                    assert spec[0] == local_inputs[input_name][0], f"{name}.{input_name} type"
    assert object_info["LowLightIlluminationPrompt"]["output"] == ["IMAGE", "MASK", "IMAGE", "MASK"]


def test_weights_dropdown_lists_shipped_and_model_folder_files(object_info):
    choices = object_info["LowLightSGZEnhance"]["input"]["required"]["weights"][0]
    # The shipped entry comes first; a .pth sits in models/sgz given by an extra_model_paths.yaml `sgz:` entry,
    # which the pack's own folder registration must keep.
    assert choices[0] == "lora_weights/sgz_lowlight.safetensors"
    assert SGZ_PTH in choices


@pytest.mark.parametrize("workflow", API_WORKFLOWS, ids=lambda p: p.stem)
def test_api_workflow_completes(server, workflow):
    entry = server.run(json.loads(workflow.read_text()))
    assert entry["status"]["status_str"] == "success", history_error(entry)
    saved = server.output_files(entry)
    assert saved, "the workflow saved no file"
    for paths in saved.values():
        for path in paths:
            assert path.is_file(), path
    check = SAVED_OUTPUT_CHECKS.get(workflow.stem)
    if check:
        check(server, entry, saved)


def check_enhance_image(server, entry, saved):
    (path,) = saved["3"]
    source = load_rgb(server.input_dir / EXAMPLE_IMAGE)
    output = load_rgb(path)
    assert_enhanced(output, source)

    # The saved PNG is what SGZPipeline computes for the same weights (8-bit rounding apart).
    from comfyui_lowlight.pipelines import SGZPipeline

    weights = entry["prompt"][2]["2"]["inputs"]["weights"]  # the graph as the server ran it
    weights_path = REPO_ROOT / weights if weights.startswith("lora_weights/") else server.models_dir / "sgz" / weights
    pipe = SGZPipeline.from_pretrained(weights_path, device="cpu")
    expected = pipe(torch.from_numpy(source / 255.0).permute(2, 0, 1)[None].float(), downscale=12, recurrences=8)
    expected = (expected[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255.0).round()
    assert np.abs(output - expected).max() <= 1.0


def check_before_after(server, entry, saved):
    (path,) = saved["6"]
    source = load_rgb(server.input_dir / EXAMPLE_IMAGE)
    side_by_side = load_rgb(path)
    height, width, _ = source.shape
    assert side_by_side.shape == (height, 2 * width, 3)
    np.testing.assert_array_equal(side_by_side[:, :width], source)  # before: untouched
    assert_enhanced(side_by_side[:, width:], source)  # after
    previews = {node_id for node_id, out in entry["outputs"].items() if out.get("images")}
    assert {"7", "8", "10"} <= previews  # factor, V and 1 - V previews


def check_video_frames(server, entry, saved):
    (path,) = saved["3"]
    with Image.open(server.input_dir / EXAMPLE_FRAMES) as source, Image.open(path) as output:
        assert output.n_frames == source.n_frames == EXAMPLE_FRAME_COUNT
        for before, after in zip(ImageSequence.Iterator(source), ImageSequence.Iterator(output)):
            before_rgb = np.asarray(before.convert("RGB"), dtype=np.float64)
            after_rgb = np.asarray(after.convert("RGB"), dtype=np.float64)
            assert after_rgb.shape == before_rgb.shape
            assert after_rgb.mean() > before_rgb.mean() + 15, (after_rgb.mean(), before_rgb.mean())
            assert (after_rgb >= 250).all(axis=-1).mean() < 0.05


SAVED_OUTPUT_CHECKS = {
    "sgz_enhance_image": check_enhance_image,
    "sgz_before_after": check_before_after,
    "sgz_video_frames": check_video_frames,
}


def enhance_graph(**sgz_inputs) -> dict:
    graph = json.loads((WORKFLOWS / "api" / "sgz_enhance_image.json").read_text())
    graph["2"]["inputs"].update(sgz_inputs)
    return graph


def test_unreadable_weights_give_a_node_error_and_the_server_keeps_serving(server):
    broken = server.models_dir / "sgz" / "broken.pth"
    broken.write_bytes(b"this is not a checkpoint")
    entry = server.run(enhance_graph(weights="broken.pth"))
    assert entry["status"]["status_str"] == "error"
    error = history_error(entry)
    assert error["node_id"] == "2" and error["node_type"] == "LowLightSGZEnhance"
    assert "could not read SGZ weights" in error["exception_message"]
    assert "broken.pth" in error["exception_message"]

    entry = server.run(enhance_graph())
    assert entry["status"]["status_str"] == "success", history_error(entry)


def test_invalid_values_are_rejected_per_node(server):
    with pytest.raises(PromptRejected) as rejected:
        server.queue_prompt(enhance_graph(weights="missing.pth", strength=7.5))
    errors = rejected.value.body["node_errors"]["2"]
    assert errors["class_type"] == "LowLightSGZEnhance"
    messages = " ".join(e["details"] + " " + e["message"] for e in errors["errors"])
    assert "missing.pth" in messages and "strength" in messages
    assert server.run(enhance_graph())["status"]["status_str"] == "success"


def input_type(node_info: dict, name: str):
    for section in ("required", "optional"):
        if name in node_info["input"].get(section, {}):
            spec = node_info["input"][section][name][0]
            return spec if isinstance(spec, str) else "COMBO"
    raise AssertionError(f"{node_info['name']} has no input {name!r}")


@pytest.mark.parametrize("workflow", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_ui_workflow_nodes_exist_and_links_match_types(object_info, workflow):
    graph = json.loads(workflow.read_text())
    nodes = {node["id"]: node for node in graph["nodes"]}
    for node in nodes.values():
        assert node["type"] in object_info, f"{workflow.name}: node type {node['type']} unknown to ComfyUI"
    assert graph["links"], "a workflow without links"
    for link_id, from_id, from_slot, to_id, to_slot, link_type in graph["links"]:
        source, target = nodes[from_id], nodes[to_id]
        produced = object_info[source["type"]]["output"][from_slot]
        target_input = target["inputs"][to_slot]
        assert target_input["link"] == link_id
        consumed = input_type(object_info[target["type"]], target_input["name"])
        assert produced == consumed == link_type, (
            f"{workflow.name}: link {link_id} {source['type']}[{from_slot}] {produced} -> "
            f"{target['type']}.{target_input['name']} {consumed} (saved as {link_type})"
        )


def test_every_ui_workflow_has_an_api_twin():
    assert UI_WORKFLOWS
    assert [p.name for p in UI_WORKFLOWS] == [p.name for p in API_WORKFLOWS]
