"""Weights files that must be refused at load, naming the file (issue 18 rows 3, 9, 10, 11).

The bad files are made here: NaN/inf tensors (a diverged run), a pickle whose ``__reduce__`` calls ``os.system``
(it must not run), random bytes named ``.safetensors``, and int32 tensors. Every loader goes through
``pipelines/weights_files.py``: SGZ (``load_sgz_weights``), SCUF (``load_scuf_file``/``read_scuf_weights``, the
adapter loader node), RetinexNet (``load_decomnet``) and the CLIP image encoder (``load_clip_image_encoder``).
"""

import os

import pytest
import torch
from safetensors.torch import save_file

from comfyui_lowlight.pipelines.scuf.clip_encoder import load_clip_image_encoder
from comfyui_lowlight.pipelines.scuf.modules import SCUFConfig
from comfyui_lowlight.pipelines.scuf.retinex import load_decomnet
from comfyui_lowlight.pipelines.scuf.weights import (
    SCUFWeightsError,
    load_scuf_file,
    read_scuf_weights,
    save_scuf_file,
)
from comfyui_lowlight.pipelines.sgz.model import (
    SHIPPED_WEIGHTS,
    EnhancementFactorEstimator,
    load_sgz_weights,
    save_sgz_weights,
)
from comfyui_lowlight.pipelines.weights_files import WeightsFileError
from test_scuf_nodes import comfy, scuf, staged  # noqa: F401  (fixtures: stub ComfyUI with the tiny SCUF model)
from tiny_scuf import tiny_decomnet  # noqa: F401  (session fixture: random DecomNet weights)

SCUF_TENSORS = {"image_proj.proj.weight": torch.randn(8, 4), "image_proj.norm.bias": torch.zeros(4)}


class _Exploit:
    """Pickled, calls ``os.system`` on load: the loaders must refuse it without running it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _sgz_file(tmp_path, name, change):
    """The shipped SGZ weights with ``change(state_dict)`` applied, saved as ``name`` (.safetensors or .pth)."""
    state = {k: v.clone() for k, v in load_sgz_weights(SHIPPED_WEIGHTS).state_dict().items()}
    change(state)
    path = tmp_path / name
    if path.suffix == ".safetensors":
        save_file(state, str(path), metadata={"padding_mode": "zeros"})
    else:
        torch.save(state, path)
    return path


def _scuf_file(tmp_path, name, tensors):
    path = tmp_path / name
    save_scuf_file(path, tensors, SCUFConfig())
    return path


# ------------------------------------------------------------------------------------ row 3: NaN / inf


@pytest.mark.parametrize("name", ["nan.safetensors", "inf.pth"])
def test_sgz_weights_with_nan_or_inf_are_refused_naming_file_and_tensor(tmp_path, name):
    bad = float("nan") if name.startswith("nan") else float("inf")
    path = _sgz_file(tmp_path, name, lambda state: state["e_conv3.depth_conv.weight"].view(-1)[5:7].fill_(bad))
    with pytest.raises(WeightsFileError) as refused:
        load_sgz_weights(path)
    message = str(refused.value)
    assert str(path) in message and "'e_conv3.depth_conv.weight'" in message and "NaN/inf" in message
    assert "2 NaN/inf" in message


def test_scuf_weights_with_nan_are_refused_naming_file_and_tensor(tmp_path):
    path = _scuf_file(tmp_path, "diverged.safetensors",
                      {**SCUF_TENSORS, "image_proj.norm.bias": torch.tensor([0.0, float("nan"), 1.0, float("-inf")])})
    for load in (load_scuf_file, read_scuf_weights):
        with pytest.raises(SCUFWeightsError, match=r"diverged\.safetensors: tensor 'image_proj\.norm\.bias' holds 2 "
                                                   r"NaN/inf"):
            load(path)
    fine = read_scuf_weights(_scuf_file(tmp_path, "fine.safetensors", SCUF_TENSORS))
    assert fine.tensors.keys() == SCUF_TENSORS.keys()


# ------------------------------------------------------------------------------------ row 11: integer weights


def test_integer_weights_are_refused_naming_file_tensor_and_float_dtypes(tmp_path):
    sgz = _sgz_file(tmp_path, "int.safetensors",
                    lambda state: state.update({"e_conv1.point_conv.weight": torch.ones_like(
                        state["e_conv1.point_conv.weight"], dtype=torch.int32)}))
    scuf_path = _scuf_file(tmp_path, "int_scuf.safetensors",
                           {**SCUF_TENSORS, "image_proj.proj.weight": torch.ones(8, 4, dtype=torch.int32)})
    cases = [(load_sgz_weights, sgz, "e_conv1.point_conv.weight"),
             (read_scuf_weights, scuf_path, "image_proj.proj.weight")]
    for load, path, tensor in cases:
        with pytest.raises(WeightsFileError) as refused:
            load(path)
        message = str(refused.value)
        assert str(path) in message and f"'{tensor}'" in message and "int32" in message
        assert "float32, float16, bfloat16" in message


# ------------------------------------------------------------------------------------ row 9: pickles with code


def test_pickles_with_code_are_refused_by_every_loader_with_our_message(tmp_path, tiny_decomnet):  # noqa: F811
    marker = tmp_path / "pwned"
    payload = {"e_conv1.point_conv.weight": torch.zeros(1), "payload": _Exploit(marker)}
    loaders = {
        "sgz.pth": load_sgz_weights,
        "official_scuf.pkl": read_scuf_weights,
        "decomp.pth": load_decomnet,
        "clip.pt": load_clip_image_encoder,
    }
    for name, load in loaders.items():
        path = tmp_path / name
        torch.save(payload, path)
        with pytest.raises(WeightsFileError) as refused:
            load(path)
        message = str(refused.value)
        assert str(path) in message, name
        assert "contains code" in message and "posix.system" in message, message  # what was blocked
        assert "weights_only=False" not in message and "will likely succeed" not in message, message
        assert refused.value.__cause__ is None and refused.value.__suppress_context__  # torch's advice not chained
    assert not marker.exists()
    assert isinstance(load_decomnet(tiny_decomnet), torch.nn.Module)  # plain state dicts still load


# ------------------------------------------------------------------------------------ row 10: random bytes


def test_random_bytes_as_safetensors_are_not_a_valid_safetensors_file(tmp_path):
    path = tmp_path / "random.safetensors"
    path.write_bytes(os.urandom(4096))
    for load in (load_sgz_weights, load_scuf_file, read_scuf_weights):
        with pytest.raises(WeightsFileError, match=f"not a valid safetensors file: {path}"):
            load(path)
    with pytest.raises(SCUFWeightsError):  # still the SCUF error type for callers that catch it
        load_scuf_file(path)


def test_scuf_node_says_not_a_valid_safetensors_file(staged):  # noqa: F811
    from comfyui_lowlight.nodes.scuf_nodes import SCUFAdapterLoader, SCUFLoadSDTurbo

    path = staged.models_dir / "scuf" / "random.safetensors"
    path.write_bytes(os.urandom(4096))
    (base,) = SCUFLoadSDTurbo.execute(model="diffusers/sd-turbo", clip="clip_tiny.pt", dtype="float32").args
    with pytest.raises(ValueError) as refused:
        SCUFAdapterLoader.execute(scuf_pipe=base, scuf_weights="random.safetensors", adapter_scale=1.0)
    message = str(refused.value)
    assert f"not a valid safetensors file: {path}" in message
    assert "cannot be used with the base model" not in message
    assert str(staged.models_dir / "scuf") in message  # where valid weights go
    SCUFAdapterLoader.execute(scuf_pipe=base, scuf_weights="official.pkl", adapter_scale=1.0)  # base still usable


def test_sgz_float_weights_still_load_and_round_trip(tmp_path):
    model = EnhancementFactorEstimator()
    path = save_sgz_weights(model, tmp_path / "ok.safetensors")
    loaded = load_sgz_weights(path)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("content", [b"this is not a checkpoint", b"", bytes(range(256)) * 4])
def test_garbage_pth_is_not_a_readable_checkpoint_naming_the_file(tmp_path, content):
    """Arbitrary bytes make torch's unpickler fail in many ways (IndexError, EOFError, ...): always our message."""
    from comfyui_lowlight.pipelines.sgz.model import load_sgz_weights

    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError) as raised:
        load_sgz_weights(path)
    message = str(raised.value)
    assert "could not read SGZ weights" in message and str(path) in message
