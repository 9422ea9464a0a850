"""Winograd F(2x2, 3x3) convs of the SCUF VAE's CPU inference copy (pipelines/scuf/winograd.py): the same conv as
oneDNN's within bfloat16 rounding, against float64; swapped in only where it pays; the bfloat16 pipeline with every
3x3 conv of the tiny SCUF model through it still meets the precision goals."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tiny_scuf import tiny_scuf  # noqa: F401  session fixture: the tiny SCUF model (no ../shared needed)

pytest.importorskip("numba")


@pytest.fixture(scope="module")
def scuf(tiny_scuf):  # noqa: F811
    return tiny_scuf


def _relative_error(out, reference):
    return ((out.double() - reference).abs().mean() / reference.abs().mean()).item()


@pytest.mark.parametrize("shape", [(2, 8, 6, 5, 7), (1, 16, 16, 1, 1), (1, 4, 4, 2, 3), (1, 24, 40, 19, 22)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("block_rows", [1, 3, None])
def test_winograd_conv_is_the_conv_within_bfloat16_rounding(shape, bias, block_rows, monkeypatch):
    """Against the float64 conv of the same bfloat16 input and kernel: at most ~4x oneDNN's bfloat16 conv error
    (which rounds once; Winograd rounds transformed input, transformed kernel and products), any size, odd edges,
    batches, one or several blocks of tile rows."""
    from comfyui_lowlight.pipelines.scuf import winograd

    n, c, k, h, w = shape
    if block_rows is not None:
        monkeypatch.setattr(winograd, "BLOCK_BYTES", 32 * c * ((w + 1) // 2) * block_rows)
    generator = torch.Generator().manual_seed(sum(shape))
    torch.manual_seed(sum(shape))
    conv = torch.nn.Conv2d(c, k, 3, padding=1, bias=bias).to(torch.bfloat16)
    x = torch.randn(n, c, h, w, generator=generator).to(torch.bfloat16)
    reference = F.conv2d(x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double(),
                         padding=1)
    out = winograd.WinogradConv2d(conv)(x)
    assert out.dtype == torch.bfloat16 and out.shape == reference.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    direct = F.conv2d(x, conv.weight, conv.bias, padding=1)
    error, direct_error = _relative_error(out, reference), _relative_error(direct, reference)
    assert error <= 1e-2 and error <= 6 * direct_error, (error, direct_error)
    # a wrong tap or tile offset would be far off: the maximum stays at rounding level too
    assert (out.double() - reference).abs().max() <= 0.05 * reference.abs().max()


def test_winograd_conv_takes_channels_last_and_rejects_other_dtypes():
    from comfyui_lowlight.pipelines.scuf.winograd import WinogradConv2d

    conv = torch.nn.Conv2d(6, 5, 3, padding=1).to(torch.bfloat16)
    x = torch.randn(1, 6, 9, 8).to(torch.bfloat16)
    layer = WinogradConv2d(conv)
    torch.testing.assert_close(layer(x.contiguous(memory_format=torch.channels_last)), layer(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="bfloat16"):
        layer(x.float())
    with pytest.raises(ValueError, match="3x3 stride-1"):
        WinogradConv2d(torch.nn.Conv2d(6, 5, 3, stride=2, padding=1))


def test_only_wide_bfloat16_cpu_convs_are_swapped():
    from comfyui_lowlight.pipelines.scuf.winograd import MIN_CHANNELS, WinogradConv2d, use_winograd

    wide, narrow = MIN_CHANNELS, MIN_CHANNELS // 2
    model = torch.nn.Sequential(
        torch.nn.Conv2d(wide, wide, 3, padding=1),  # swapped
        torch.nn.Conv2d(wide, narrow, 3, padding=1),  # too narrow
        torch.nn.Conv2d(wide, wide, 3, stride=2, padding=1),  # strided
        torch.nn.Conv2d(wide, wide, 1),  # 1x1
        torch.nn.Sequential(torch.nn.Conv2d(wide, 2 * wide, 3, padding=1)),  # nested: swapped
    )
    assert use_winograd(model.float()) == 0  # float32 stays oneDNN's
    assert use_winograd(model.to(torch.bfloat16)) == 2
    assert isinstance(model[0], WinogradConv2d) and isinstance(model[4][0], WinogradConv2d)
    assert [type(m) for m in model[1:4]] == [torch.nn.Conv2d] * 3


def test_bfloat16_pipeline_with_every_3x3_conv_winograd_meets_the_precision_goal(scuf, monkeypatch):
    """The strictest case: every stride-1 3x3 conv of the tiny model's VAE copy through Winograd (on the full-size
    model only the wide ones are), against float32 through the PEFT VAE: the goals of
    tests/test_scuf_inference_vae.py::test_bfloat16_copy_stays_within_the_precision_goal."""
    from comfyui_lowlight.pipelines.scuf import winograd

    image = scuf.image("img232x120")
    reference = scuf.pipeline()
    reference._vae_for = lambda device: reference.vae
    expected = reference(image, output_type="np").images
    peft = scuf.pipeline(dtype=torch.bfloat16)
    peft._vae_for = lambda device: peft.vae
    peft_error = np.abs(peft(image, output_type="np").images - expected).mean()

    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)
    pipe = scuf.pipeline(dtype=torch.bfloat16)
    fast = pipe(image, output_type="np").images
    swapped = [m for m in pipe._cpu_vae[1].modules() if isinstance(m, winograd.WinogradConv2d)]
    assert len(swapped) >= 20  # every ResNet conv of encoder and decoder, mid blocks, conv_in/out where 3x3
    fast_error = np.abs(fast - expected).mean()
    print(f"bfloat16 mean error: every 3x3 conv Winograd {fast_error:.5f}, PEFT VAE {peft_error:.5f}")
    assert fast_error <= 2e-2
    assert fast_error <= 1.5 * peft_error + 1e-3, (fast_error, peft_error)


def test_winograd_copy_follows_weight_changes(scuf, monkeypatch):
    """The transformed kernels are made when the copy is built: an in-place SCUF weight change rebuilds them, giving
    what a pipeline loaded with the changed weights gives."""
    from comfyui_lowlight.pipelines.scuf import winograd

    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)
    image = scuf.image("img64x64")

    def change(pipe):
        with torch.no_grad():
            pipe.vae.decoder.up_blocks[0].resnets[0].conv1.lora_B["vae_skip"].weight.add_(0.5)

    pipe = scuf.pipeline("official", dtype=torch.bfloat16)
    first = pipe(image, output_type="np").images
    change(pipe)
    changed = pipe(image, output_type="np").images
    fresh = scuf.pipeline("official", dtype=torch.bfloat16)
    change(fresh)
    assert np.abs(changed - first).max() > 1e-2
    np.testing.assert_allclose(changed, fresh(image, output_type="np").images, rtol=0, atol=1e-6)
