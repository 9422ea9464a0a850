"""The pack inside a real ComfyUI 0.33 server (headless on CPU): node info, workflows, errors.

The server is the session fixture ``comfy_server`` (tests/comfy_host.py); the first run installs the host from
``../shared/hosts`` into a cache folder (about 4 minutes), later runs reuse it. Without that material the tests
are skipped (failed under ``CI=true``); ``LOWLIGHT_COMFY_HOST`` runs them in your own ComfyUI instead. The
templates' inputs are the ones the pack itself copies into the (fresh) input folder when it loads, the models are
the shipped SGZ weights, so nothing else from ``../shared`` is needed.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from comfy_host import (
    EXAMPLE_FRAME_COUNT,
    EXAMPLE_FRAMES,
    EXAMPLE_IMAGE,
    PACK_LINK_NAME,
    REPO_ROOT,
    SGZ_PTH,
    UI_ONLY_NODE_TYPES,
    PromptRejected,
    history_error,
    input_as_loaded,
    stage_examples,
)
from comfyui_lowlight.nodes import node_classes
from comfyui_lowlight.nodes.example_inputs import EXAMPLE_INPUTS

WORKFLOWS = REPO_ROOT / "example_workflows"
UI_WORKFLOWS = sorted(WORKFLOWS.glob("*.json"))
API_WORKFLOWS = sorted((WORKFLOWS / "api").glob("*.json"))
SCHEMAS = [cls.define_schema() for cls in node_classes()]


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
    for schema in SCHEMAS:
        info = object_info[schema.node_id]
        assert info["display_name"] == schema.display_name
        assert info["category"] == "image/lowlight"
        assert info["description"] == schema.description
        assert info["output"] == [output.get_io_type() for output in schema.outputs]
        assert info["output_name"] == [output.display_name for output in schema.outputs]
        assert info["output_tooltips"] == [output.tooltip for output in schema.outputs]
        served = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        assert list(served) == [item.id for item in schema.inputs], schema.node_id  # widget order = saved order
        for item in schema.inputs:
            kind, spec = served[item.id]
            assert kind == item.get_io_type(), f"{schema.node_id}.{item.id} type"
            # (the "Not downloaded yet" mark depends on the files each side has: compared without it)
            unmarked = spec["tooltip"].split(" Not downloaded yet:")[0]
            assert unmarked == item.tooltip.split(" Not downloaded yet:")[0], f"{schema.node_id}.{item.id}"
            assert (item.id in info["input"].get("optional", {})) == item.optional, f"{schema.node_id}.{item.id}"
    assert object_info["LowLightIlluminationPrompt"]["output"] == ["IMAGE", "MASK", "IMAGE", "MASK"]
    assert object_info["LowLightSCUFLighten"]["input"]["required"]["scuf_pipe"][0] == "SCUF_PIPE"


def test_pack_is_a_v3_extension_with_help_pages(server, object_info):
    for schema in SCHEMAS:
        # V3 nodes report their module like ComfyUI's own V3 nodes; the help page is the one the UI fetches
        assert object_info[schema.node_id]["python_module"] == f"custom_nodes.{PACK_LINK_NAME}"
        page = server.get_bytes(f"/extensions/{PACK_LINK_NAME}/docs/{schema.node_id}.md").decode()
        assert page.startswith(f"# {schema.display_name}"), schema.node_id
        for item in schema.inputs:
            assert f"`{item.id}`" in page, f"{schema.node_id}.md does not explain input {item.id}"
        for output in schema.outputs:
            assert f"`{output.display_name}`" in page, f"{schema.node_id}.md does not explain output {output.id}"
        for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page):  # every picture it shows is served
            assert server.get_bytes(f"/extensions/{PACK_LINK_NAME}/docs/{image}")[:4] in (b"\x89PNG", b"\xff\xd8\xff\xe0",
                                                                                       b"\xff\xd8\xff\xdb")
        assert re.search(r"!\[[^\]]*\]\(([^)]+)\)", page), f"{schema.node_id}.md has no picture"
    log = server.log_path.read_text(errors="replace")
    assert "comfyui-lowlight" in log and "Traceback" not in log


def test_templates_are_listed_with_their_thumbnails_and_inputs_were_installed(server):
    listed = server.get("/workflow_templates")[PACK_LINK_NAME]
    assert sorted(listed) == [path.stem for path in UI_WORKFLOWS]  # the API twins (api/) are not templates
    methods = [name.split("_")[1] for name in sorted(listed)]  # "01_sgz_enhance_image" -> "sgz"
    assert methods == sorted(methods, key=lambda method: method != "sgz"), "SGZ templates come first by name"
    for name in listed:
        template = json.loads(server.get_bytes(f"/api/workflow_templates/{PACK_LINK_NAME}/{name}.json"))
        assert template == json.loads((WORKFLOWS / f"{name}.json").read_text())
        thumbnail = server.get_bytes(f"/api/workflow_templates/{PACK_LINK_NAME}/{name}.jpg")
        assert thumbnail[:3] == b"\xff\xd8\xff", f"{name}.jpg is not a JPEG"
        notes = [n for n in template["nodes"] if n["type"] == "MarkdownNote"]
        assert len(notes) == 1 and notes[0]["title"] and "Needs" in notes[0]["widgets_values"][0], name
    # The pack copied its sample inputs into the fresh input folder when it loaded: the templates run as shipped.
    for name, source in EXAMPLE_INPUTS.items():
        assert (server.input_dir / name).read_bytes() == source.read_bytes(), name


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
    source = input_as_loaded(server, EXAMPLE_IMAGE).astype(np.float64)
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


def check_before_after(server, entry, saved, image=EXAMPLE_IMAGE):
    (path,) = saved["6"]
    source = input_as_loaded(server, image).astype(np.float64)
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
    "01_sgz_enhance_image": check_enhance_image,
    "02_sgz_before_after": check_before_after,
    "03_sgz_frames_batch": check_video_frames,
}


@pytest.mark.parametrize("size", [(333, 217), (1000, 751), (120, 480)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_before_after_works_for_any_input_size(server, size):
    # The before | after template stitches the two images (core ImageStitch): no fixed pad, no overlap.
    name = f"night_{size[0]}x{size[1]}.png"
    Image.open(REPO_ROOT / "assets" / "sample_night.jpg").convert("RGB").resize(size).save(server.input_dir / name)
    graph = json.loads((WORKFLOWS / "api" / "02_sgz_before_after.json").read_text())
    graph["1"]["inputs"]["image"] = name
    entry = server.run(graph)
    assert entry["status"]["status_str"] == "success", history_error(entry)
    check_before_after(server, entry, server.output_files(entry), image=name)


def enhance_graph(**sgz_inputs) -> dict:
    graph = json.loads((WORKFLOWS / "api" / "01_sgz_enhance_image.json").read_text())
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
        assert node["type"] in object_info or node["type"] in UI_ONLY_NODE_TYPES, (
            f"{workflow.name}: node type {node['type']} unknown to ComfyUI")
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


def test_api_graph_saved_before_newer_sgz_options_still_runs(server):
    # An API graph from before an option joined the SGZ table (only the first four): the pipeline's default applies.
    from comfyui_lowlight.pipelines.sgz.options import SGZ_OPTIONS

    graph = enhance_graph()
    first_release = ("recurrences", "downscale", "strength", "temporal_smoothing")
    for name in SGZ_OPTIONS:
        if name not in first_release:
            del graph["2"]["inputs"][name]
    entry = server.run(graph)
    assert entry["status"]["status_str"] == "success", history_error(entry)
    current = server.run(enhance_graph())
    assert current["status"]["status_str"] == "success", history_error(current)
    (old,), (new,) = server.output_files(entry)["3"], server.output_files(current)["3"]
    np.testing.assert_array_equal(load_rgb(old), load_rgb(new))  # the defaults are the template's values
