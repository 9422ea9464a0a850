"""Retinex decomposition for SCUF's reflectance consistency: DecomNet (random weights in the official layout, and the
official weights from ../shared) and the classical fallback."""

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from comfyui_lowlight.pipelines.scuf.retinex import ClassicalRetinex, DecomNet, build_decomposer, load_decomnet
from shared_material import shared_path
from tiny_scuf import low_light_image, tiny_decomnet  # noqa: F401  (session fixture: random DecomNet weights)


@pytest.fixture(scope="module")
def decomp_path():
    """The official RetinexNet weights (skipped, or failed under CI=true, without ../shared)."""
    return shared_path("reference", "retinex", "decomp.pth")


def _lol(shared_dir, split: str, name: str = "1.png", crop: int | None = 96) -> torch.Tensor:
    array = np.array(Image.open(shared_dir / "data" / "lol_eval15" / split / name).convert("RGB"))
    if crop is not None:
        array = array[100:100 + crop, 200:200 + crop]
    return torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255


def _reference_decomnet(state: dict, image: torch.Tensor):
    """The README's description, written independently with explicit replicate padding."""
    def conv(x, name, pad):
        return F.conv2d(F.pad(x, (pad,) * 4, mode="replicate"), state[f"DecomNet.{name}.weight"],
                        state[f"DecomNet.{name}.bias"])

    x = torch.cat([image.max(dim=1, keepdim=True).values, image], dim=1)
    x = conv(x, "net1_conv0", 4)
    for i in (0, 2, 4, 6, 8):
        x = torch.relu(conv(x, f"net1_convs.{i}", 1))
    x = conv(x, "net1_recon", 1)
    return torch.sigmoid(x[:, :3]), torch.sigmoid(x[:, 3:])


def _check_architecture(path, image: torch.Tensor) -> None:
    net = load_decomnet(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    with torch.no_grad():
        r, l = net(image)
        r_ref, l_ref = _reference_decomnet(state, image)
    assert r.shape == (1, 3, 40, 40) and l.shape == (1, 1, 40, 40)
    assert torch.allclose(r, r_ref, atol=1e-5) and torch.allclose(l, l_ref, atol=1e-5)
    assert not any(p.requires_grad for p in net.parameters()) and not net.training


def test_decomnet_matches_the_described_architecture(tiny_decomnet):  # noqa: F811
    """Random weights in the official layout: the loaded network computes what the README describes."""
    image = torch.from_numpy(np.array(low_light_image(40, 40, seed=5))).permute(2, 0, 1)[None].float() / 255
    _check_architecture(tiny_decomnet, image)


def test_official_decomnet_matches_the_described_architecture(shared_dir, decomp_path):
    _check_architecture(decomp_path, _lol(shared_dir, "low", crop=40))


def test_decomnet_weights_decompose_real_images(shared_dir, decomp_path):
    net = load_decomnet(decomp_path)
    low, high = _lol(shared_dir, "low", crop=None), _lol(shared_dir, "high", crop=None)
    with torch.no_grad():
        r_low, l_low = net(low)
        r_high, _ = net(high)
        torch.manual_seed(0)
        r_rand, l_rand = DecomNet()(low)
    # trained weights reconstruct I = R * L; a random network does not
    assert (r_low * l_low - low).abs().mean() < 0.01
    assert (r_rand * l_rand - low).abs().mean() > 0.05
    # reflectance is (more) illumination invariant: the low and normal exposures of a scene (600x400) agree better
    assert (r_low - r_high).abs().mean() < 0.85 * (low - high).abs().mean()
    assert 0 <= r_low.min() and r_low.max() <= 1


def test_load_decomnet_errors(tmp_path, tiny_decomnet):  # noqa: F811
    with pytest.raises(FileNotFoundError, match="not found"):
        load_decomnet(tmp_path / "missing.pth")
    state = torch.load(tiny_decomnet, map_location="cpu", weights_only=True)
    state.pop("DecomNet.net1_recon.bias")
    partial = tmp_path / "partial.pth"
    torch.save(state, partial)
    with pytest.raises(ValueError, match="partial.pth.*DecomNet"):
        load_decomnet(partial)
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps(print))  # a global that weights_only refuses to resolve
    with pytest.raises(ValueError, match="weights_only"):
        load_decomnet(evil)
    # keys without the wrapper prefix load too
    bare = tmp_path / "bare.pth"
    full = torch.load(tiny_decomnet, map_location="cpu", weights_only=True)
    torch.save({k.split(".", 1)[1]: v for k, v in full.items()}, bare)
    assert torch.equal(load_decomnet(bare).net1_conv0.weight, full["DecomNet.net1_conv0.weight"])


def test_classical_retinex_properties():
    torch.manual_seed(0)
    image = torch.rand(2, 3, 24, 20) * 0.8 + 0.1
    r, l = ClassicalRetinex()(image)
    assert r.shape == image.shape and l.shape == (2, 1, 24, 20)
    assert 0 <= r.min() and r.max() <= 1 and 0 < l.min() and l.max() <= 1
    # invariant to a global brightness scale (what reflectance consistency relies on)
    r_dark, l_dark = ClassicalRetinex()(image * 0.25)
    assert torch.allclose(r, r_dark, atol=1e-5) and torch.allclose(l_dark, l * 0.25, atol=1e-6)
    # without smoothing the decomposition is exact: R * L = I, and max over channels of R is 1
    r0, l0 = ClassicalRetinex(sigma=0)(image)
    assert torch.allclose(r0 * l0, image, atol=1e-6)
    assert torch.allclose(r0.amax(dim=1), torch.ones(2, 24, 20))
    # tiny images (smaller than the blur kernel) work; bad input is rejected
    assert ClassicalRetinex(sigma=3)(torch.rand(1, 3, 2, 3))[0].shape == (1, 3, 2, 3)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        ClassicalRetinex()(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="sigma"):
        ClassicalRetinex(sigma=-1)


def test_build_decomposer_choice(tiny_decomnet):  # noqa: F811
    assert isinstance(build_decomposer(None), ClassicalRetinex)
    assert isinstance(build_decomposer(tiny_decomnet), DecomNet)
