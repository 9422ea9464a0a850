"""The SCUF nodes inside the real ComfyUI 0.33 server (headless on CPU), with the tiny SCUF model made in code
(tests/tiny_scuf.py).

The tiny models take the names the workflows use (tests/scuf_host.py). Parity: every saved PNG equals what
:class:`SCUFPipeline` computes for the same input, after ComfyUI's SaveImage quantisation (``uint8(255 x)``,
truncated), within 1 level per channel. The float outputs of the nodes themselves are compared with the pipeline
at 1e-5 in tests/test_scuf_nodes.py.

The SCUF workflows are also covered by the pack-wide real-server tests (the conftest fixture stages the tiny SCUF
models for every test that uses the server): tests/test_comfy_server.py runs every API workflow and checks every
UI workflow's links against /object_info; tests/test_comfy_webui.py opens every UI workflow in the web UI (no
missing nodes, converts to its API twin, runs) and writes the screenshots docs/images/comfy_scuf_*.png.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_host import EXAMPLE_IMAGE, REPO_ROOT, history_error, input_as_loaded
from scuf_host import BASE_NAME, CLIP_FILE_NAME, CLIP_FOLDER_NAME, SCUF_CONVERTED_NAME, SCUF_OFFICIAL_NAME

WORKFLOWS = REPO_ROOT / "example_workflows"
SCUF_NODES = ("LowLightSCUFLoadSDTurbo", "LowLightSCUFAdapterLoader", "LowLightSCUFLighten")
UINT8_TOLERANCE = 1  # levels, after SaveImage's truncation to uint8


@pytest.fixture(scope="module")
def server(scuf_models):
    return scuf_models


@pytest.fixture(scope="module")
def reference_pipe(tiny_scuf):
    return tiny_scuf.pipeline("official")  # the models the server has (tests/scuf_host.py)


@pytest.fixture(scope="module")
def source(server) -> torch.Tensor:
    """The example image as ComfyUI's LoadImage gives it: ``[1, 3, H, W]`` float32 = uint8 / 255."""
    array = input_as_loaded(server, EXAMPLE_IMAGE).astype(np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def api_graph(name: str, **changes) -> dict:
    """An API workflow with ``{node_id: {input: value}}`` changes applied."""
    graph = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    for node_id, inputs in changes.items():
        graph[node_id]["inputs"].update(inputs)
    return graph


def saved_image(server, entry: dict, node_id: str) -> np.ndarray:
    assert entry["status"]["status_str"] == "success", history_error(entry)
    (path,) = server.output_files(entry)[node_id]
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def quantised(expected: np.ndarray) -> np.ndarray:
    """SaveImage's conversion of a float image: ``clip(255 x, 0, 255).astype(uint8)`` (truncation)."""
    return np.clip(255.0 * expected, 0, 255).astype(np.uint8).astype(np.int16)


def assert_matches(saved: np.ndarray, expected_float: np.ndarray):
    expected = quantised(expected_float)
    assert saved.shape == expected.shape
    diff = np.abs(saved - expected)
    assert diff.max() <= UINT8_TOLERANCE, f"max {diff.max()} levels, {np.mean(diff > 0):.2%} of values differ"


def scuf_expected(pipe, image: torch.Tensor, **kwargs) -> np.ndarray:
    return pipe(image, output_type="np", **kwargs).images[0]


def test_scuf_nodes_in_object_info_with_tooltips_types_and_staged_files(server):
    from comfyui_lowlight.nodes import node_classes

    info = server.object_info()
    schemas = {schema.node_id: schema for schema in (cls.define_schema() for cls in node_classes())}
    for name in SCUF_NODES:
        schema = schemas[name]
        node = info[name]
        assert node["display_name"] == schema.display_name
        assert node["category"] == "image/lowlight" and node["description"] == schema.description
        assert node["output"] == [o.get_io_type() for o in schema.outputs]
        assert node["output_name"] == [o.display_name for o in schema.outputs]
        for section in ("required", "optional"):
            for input_name, spec in node["input"].get(section, {}).items():
                assert spec[1]["tooltip"].strip(), f"{name}.{input_name}"
    loader = info["LowLightSCUFLoadSDTurbo"]["input"]["required"]
    assert loader["model"][1]["options"] == ["diffusers/sd-turbo"]  # only what exists (the tiny base)
    assert {"clip-vit-base-patch32", "clip_tiny.pt"} <= set(loader["clip"][1]["options"])
    assert not any(c.startswith("clip-vit-base-patch32/") for c in loader["clip"][1]["options"])  # the folder
    weights = info["LowLightSCUFAdapterLoader"]["input"]["required"]["scuf_weights"][1]["options"]
    assert {SCUF_CONVERTED_NAME, SCUF_OFFICIAL_NAME} <= set(weights)
    lighten = info["LowLightSCUFLighten"]["input"]
    assert lighten["required"]["scuf_pipe"][0] == "SCUF_PIPE"
    assert lighten["optional"]["illumination_mask"][0] == "MASK"
    assert lighten["optional"]["illumination_image"][0] == "IMAGE"


def test_lighten_workflow_matches_scuf_pipeline(server, reference_pipe, source):
    saved = saved_image(server, server.run(api_graph("05_scuf_lighten_image")), "6")
    # The workflow feeds Illumination Prompt's 1 - V, which is the pipeline's default image prompt.
    assert_matches(saved, scuf_expected(reference_pipe, source))


def test_official_checkpoint_and_sampled_latent_match_the_pipeline(server, reference_pipe, source):
    graph = api_graph("05_scuf_lighten_image", **{"3": {"scuf_weights": SCUF_OFFICIAL_NAME, "adapter_scale": 0.5},
                                                "5": {"sample_latent": True, "seed": 1234}})
    saved = saved_image(server, server.run(graph), "6")
    expected = scuf_expected(reference_pipe, source, adapter_scale=0.5, sample_latent=True,
                             generator=torch.Generator().manual_seed(1234))
    assert_matches(saved, expected)
    assert np.abs(quantised(expected) - quantised(scuf_expected(reference_pipe, source))).max() > 1  # it mattered


def test_side_by_side_workflow_is_sgz_left_and_scuf_right(server, reference_pipe, source):
    from comfyui_lowlight.pipelines import SGZPipeline

    entry = server.run(api_graph("06_scuf_vs_sgz_side_by_side"))
    saved = saved_image(server, entry, "8")
    height, width = source.shape[-2:]
    assert saved.shape == (height, 2 * width, 3)
    weights = entry["prompt"][2]["2"]["inputs"]["weights"]
    weights_path = REPO_ROOT / weights if weights.startswith("lora_weights/") else server.models_dir / "sgz" / weights
    sgz = SGZPipeline.from_pretrained(weights_path, device="cpu")(source, downscale=12, recurrences=8)
    assert_matches(saved[:, :width], sgz[0].permute(1, 2, 0).clamp(0, 1).numpy())
    assert_matches(saved[:, width:], scuf_expected(reference_pipe, source))


def test_custom_prompt_and_edited_mask_workflow_matches_the_pipeline(server, reference_pipe, source):
    from comfyui_lowlight.pipelines.media.illumination import inverted_value_channel

    graph = api_graph("07_scuf_custom_prompt_mask")
    entry = server.run(graph)
    saved = saved_image(server, entry, "9")
    lighten, threshold = graph["8"]["inputs"], graph["5"]["inputs"]["value"]
    mask = (inverted_value_channel(source)[0, 0] > threshold).float()  # Illumination Prompt -> ThresholdMask
    expected = scuf_expected(reference_pipe, source, prompt=lighten["prompt"], illumination=mask)
    assert_matches(saved, expected)
    assert np.abs(quantised(expected) - quantised(scuf_expected(reference_pipe, source))).max() > 1
    assert entry["outputs"]["7"]["images"], "the edited mask is previewed"


def test_scuf_without_downloads_names_every_missing_part_and_the_server_keeps_serving(server):
    # A fresh install: none of the three parts downloaded (the staged tiny models moved away for this test).
    staged = [server.models_dir / "diffusers" / BASE_NAME, server.models_dir / "clip_vision" / CLIP_FOLDER_NAME,
              server.models_dir / "clip_vision" / CLIP_FILE_NAME, server.models_dir / "scuf" / SCUF_CONVERTED_NAME,
              server.models_dir / "scuf" / SCUF_OFFICIAL_NAME]
    parked = server.session_dir / "parked_models"
    parked.mkdir(exist_ok=True)
    for path in staged:
        path.rename(parked / f"{path.parent.name}__{path.name}")
    try:
        info = server.object_info()["LowLightSCUFLoadSDTurbo"]["input"]["required"]
        assert info["model"][1]["options"] == ["diffusers/sd-turbo"]  # only the default name, marked
        assert "Not downloaded yet: 'diffusers/sd-turbo'" in info["model"][1]["tooltip"]
        entry = server.run(api_graph("05_scuf_lighten_image"))  # the template as shipped validates and runs
        assert entry["status"]["status_str"] == "error"
        error = history_error(entry)
        assert error["node_id"] == "2" and error["node_type"] == "LowLightSCUFLoadSDTurbo"
        message = error["exception_message"]
        assert message.startswith("3 of the 3 parts SCUF needs are missing"), message
        for expected in ("'diffusers/sd-turbo'", str(server.models_dir / "diffusers"), "huggingface.co/stabilityai/sd-turbo",
                         "'clip-vit-base-patch32'", str(server.models_dir / "clip_vision"),
                         "huggingface.co/openai/clip-vit-base-patch32", SCUF_CONVERTED_NAME,
                         str(server.models_dir / "scuf"), "github.com/wangsen99/GEFU", "GB"):
            assert expected in message, expected
        sgz = server.run(json.loads((WORKFLOWS / "api" / "01_sgz_enhance_image.json").read_text()))
        assert sgz["status"]["status_str"] == "success", history_error(sgz)  # the server keeps serving
    finally:
        for path in staged:
            (parked / f"{path.parent.name}__{path.name}").rename(path)
    assert server.run(api_graph("05_scuf_lighten_image"))["status"]["status_str"] == "success"


def test_mismatched_scuf_weights_name_the_file_and_folder_and_the_server_keeps_serving(server, tmp_path):
    from comfyui_lowlight.pipelines.scuf.weights import load_scuf_file, save_scuf_file

    converted = server.models_dir / "scuf" / SCUF_CONVERTED_NAME
    tensors, config, _, _ = load_scuf_file(converted)
    key = next(k for k in tensors if k.endswith("to_k_ca.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 8)  # another text-encoder width
    save_scuf_file(tmp_path / "scuf_other_base.safetensors", tensors, config)
    server.add_model("scuf", tmp_path / "scuf_other_base.safetensors")

    entry = server.run(api_graph("05_scuf_lighten_image", **{"3": {"scuf_weights": "scuf_other_base.safetensors"}}))
    assert entry["status"]["status_str"] == "error"
    error = history_error(entry)
    assert error["node_id"] == "3" and error["node_type"] == "LowLightSCUFAdapterLoader"
    message = error["exception_message"]
    assert "scuf_other_base.safetensors" in message and str(server.models_dir / "scuf") in message
    assert key in message  # which tensor does not fit
    assert server.run(api_graph("05_scuf_lighten_image"))["status"]["status_str"] == "success"
