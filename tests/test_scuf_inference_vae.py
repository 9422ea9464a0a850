"""The CPU inference copy of the SCUF VAE (pipelines/scuf/inference_vae.py): same function as the PEFT-wrapped VAE,
used by SCUFPipeline on the CPU, rebuilt when weights change. Tiny SCUF model (tests/tiny_scuf.py)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tiny_scuf import tiny_scuf  # noqa: F401  session fixture: the tiny SCUF model (no ../shared needed)


@pytest.fixture(scope="module")
def scuf(tiny_scuf):  # noqa: F811
    return tiny_scuf


def _with_peft_vae(pipe):
    """The same pipeline running its PEFT-wrapped VAE (what every device did before the inference copy)."""
    pipe._vae_for = lambda device: pipe.vae
    return pipe


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("size", [(5, 7), (8, 8), (1, 3)])
def test_subpixel_upsample_conv_is_upsample_then_conv(layout, size):
    from comfyui_lowlight.pipelines.scuf.inference_vae import SubpixelUpsampleConv

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 4, 3, 3, generator=generator, dtype=torch.float64).contiguous(memory_format=layout)
    bias = torch.randn(6, generator=generator, dtype=torch.float64)
    x = torch.randn(2, 4, *size, generator=generator, dtype=torch.float64).contiguous(memory_format=layout)
    expected = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
    out = SubpixelUpsampleConv(weight, bias)(x)
    assert out.shape == expected.shape
    assert out.is_contiguous(memory_format=layout)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_copy_computes_what_the_peft_vae_computes(scuf):
    from comfyui_lowlight.pipelines.scuf.inference_vae import (
        InferenceResnetBlock,
        SubpixelUpsampleConv,
        inference_vae,
    )
    from comfyui_lowlight.pipelines.scuf.modules import decode_with_skips, encode_with_skips

    vae = scuf.pipeline().vae
    copy = inference_vae(vae)
    names = [name for name, _ in copy.named_modules()]
    assert not any("lora_" in name or "base_layer" in name for name in names)
    ups = [up for block in copy.decoder.up_blocks for up in (block.upsamplers or [])]
    assert ups and all(isinstance(up, SubpixelUpsampleConv) for up in ups)
    assert all(isinstance(r, InferenceResnetBlock) for b in copy.decoder.up_blocks for r in b.resnets)
    assert not any(p.requires_grad for p in copy.parameters())
    x = torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        posterior, skips = encode_with_skips(vae, x)
        fast_posterior, fast_skips = encode_with_skips(copy, x)
        torch.testing.assert_close(fast_posterior.mean, posterior.mean, rtol=1e-5, atol=1e-5)
        for fast, slow in zip(fast_skips, skips):
            torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
        image = decode_with_skips(vae, posterior.mean, skips)
        torch.testing.assert_close(decode_with_skips(copy, posterior.mean, skips), image, rtol=1e-5, atol=1e-5)
    # the original keeps its LoRA (training, saving and swapping weights use it)
    assert any(".lora_A." in name for name, _ in vae.named_parameters())


def test_merged_weight_follows_lora_settings(scuf):
    from comfyui_lowlight.pipelines.scuf.inference_vae import merged_weight, vae_fingerprint

    vae = scuf.pipeline().vae
    layer = vae.decoder.conv_in
    base = layer.get_base_layer().weight
    merged = merged_weight(layer)
    expected = base + F.conv2d(layer.lora_A["vae_skip"].weight.transpose(0, 1),
                               layer.lora_B["vae_skip"].weight).transpose(0, 1) * layer.scaling["vae_skip"]
    torch.testing.assert_close(merged, expected)
    assert not torch.equal(merged, base)
    before = vae_fingerprint(vae)
    layer.scaling["vae_skip"] = 0.0
    assert vae_fingerprint(vae) != before
    torch.testing.assert_close(merged_weight(layer), base)


#: float32 rounding (merged weights, summed taps) reaches the output ~14.6x amplified by the one-step x0 formula
PIPELINE_ATOL = 5e-5


def test_pipeline_runs_the_copy_on_cpu_with_the_same_output(scuf):
    image = scuf.image("img96x80")
    fast = scuf.pipeline()
    out = fast(image, output_type="np").images
    copy = fast._cpu_vae[1]
    assert copy is not fast.vae and not hasattr(copy.decoder.conv_in, "lora_A")
    fast(image, output_type="np")
    assert fast._cpu_vae[1] is copy  # built once
    reference = _with_peft_vae(scuf.pipeline())(image, output_type="np").images
    np.testing.assert_allclose(out, reference, atol=PIPELINE_ATOL)


def test_copy_rebuilt_when_weights_change(scuf):
    """Swapping SCUF weights (the nodes copy them into the attached modules) must reach the CPU copy."""
    image = scuf.image("img64x64")
    pipe = scuf.pipeline("official")
    lighten = pipe(image, output_type="np").images
    pipe.load_scuf_weights(scuf.official, direction="b2a")
    darken = pipe(image, output_type="np").images
    assert np.abs(darken - lighten).max() > 1e-2
    reference = scuf.pipeline(None)
    reference.load_scuf_weights(scuf.official, direction="b2a")
    np.testing.assert_allclose(darken, _with_peft_vae(reference)(image, output_type="np").images, atol=PIPELINE_ATOL)
    with torch.no_grad():
        pipe.vae.decoder.conv_out.lora_B["vae_skip"].weight.add_(0.05)  # an in-place change of one tensor
    changed = pipe(image, output_type="np").images
    assert np.abs(changed - darken).max() > 1e-3
    np.testing.assert_allclose(changed, _with_peft_vae(pipe)(image, output_type="np").images, atol=PIPELINE_ATOL)


def test_bfloat16_copy_stays_within_the_precision_goal(scuf):
    """The bfloat16 CPU path (now through the copy) against float32 through the PEFT VAE: the mean goal of
    tests/test_scuf_precision.py and the same bfloat16 noise as the PEFT VAE in bfloat16."""
    image = scuf.image("img232x120")
    reference = _with_peft_vae(scuf.pipeline())(image, output_type="np").images
    fast = scuf.pipeline(dtype=torch.bfloat16)(image, output_type="np").images
    peft = _with_peft_vae(scuf.pipeline(dtype=torch.bfloat16))(image, output_type="np").images
    fast_error, peft_error = np.abs(fast - reference).mean(), np.abs(peft - reference).mean()
    assert fast_error <= 2e-2
    assert fast_error <= 1.5 * peft_error + 1e-3, (fast_error, peft_error)


def test_text_embedding_kept_between_calls_until_the_encoder_changes(scuf):
    image = scuf.image("img64x64")
    pipe = scuf.pipeline()
    calls = []
    pipe.text_encoder.register_forward_hook(lambda module, args, output: calls.append(1))
    first = pipe(image, output_type="np").images
    np.testing.assert_array_equal(pipe(image, output_type="np").images, first)
    assert len(calls) == 1
    pipe(image, prompt="another prompt", output_type="np")
    assert len(calls) == 2
    with torch.no_grad():
        next(p for n, p in pipe.text_encoder.named_parameters() if n.endswith("final_layer_norm.bias")).add_(0.5)
    changed = pipe(image, output_type="np").images
    assert len(calls) == 3 and np.abs(changed - first).max() > 1e-4


@pytest.mark.parametrize("tokens", [64, 16])
def test_cycle_attention_runs_distinct_query_rows_once_with_the_same_output(tokens, monkeypatch):
    """More UNet tokens than image-prompt rows (N > D) repeat query rows: on the CPU eqs. 2-3 run once per distinct
    row. Compared with the processor running every row (the GPU path), float64."""
    from diffusers.models.attention_processor import Attention

    from comfyui_lowlight.pipelines.scuf import modules

    torch.manual_seed(0)
    width, cross = 8, 32
    attn = Attention(width, cross_attention_dim=cross, heads=2, dim_head=4).double()
    proc = modules.CycleAttnProcessor(width, cross, num_tokens=4).double()
    torch.nn.init.normal_(proc.to_q_ca.weight)
    hidden = torch.randn(2, tokens, width, dtype=torch.float64)
    context = torch.randn(2, 7 + 4, cross, dtype=torch.float64)
    rows, repeats = modules.distinct_query_rows(modules.cycle_query_indices(cross, tokens))
    assert (repeats is not None) == (tokens > cross)
    with torch.no_grad():
        out = proc(attn, hidden, context)
        monkeypatch.setattr(modules, "distinct_query_rows", lambda idx: (idx, None))
        every_row = proc(attn, hidden, context)
    torch.testing.assert_close(out, every_row, rtol=0, atol=1e-12)


def test_copy_follows_in_place_changes_inside_inference_mode(scuf):
    """ComfyUI loads and runs models inside torch.inference_mode: its tensors have no version counter, so in-place
    copies of SCUF tensors (the nodes swap weights that way) are caught by the SCUF tensors' checksum."""
    image = scuf.image("img64x64")
    with torch.inference_mode():
        pipe = scuf.pipeline("official")
        assert next(pipe.vae.parameters()).is_inference()
        first = pipe(image, output_type="np").images
        pipe.vae.decoder.conv_out.lora_B["vae_skip"].weight.add_(0.05)
        changed = pipe(image, output_type="np").images
        peft = _with_peft_vae(pipe)(image, output_type="np").images
    assert np.abs(changed - first).max() > 1e-3
    np.testing.assert_allclose(changed, peft, atol=PIPELINE_ATOL)
