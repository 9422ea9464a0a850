"""Golden parity of SCUFPipeline with the official GEFU inference (fixture ../shared/reference/scuf, README sec. 10).

Tolerances are the fixture README's suggested acceptance for a float32 re-implementation.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from shared_material import shared_path

CASES = ["img64x64", "img96x80", "img70x50", "img232x120"]
#: Cases whose sides are multiples of 8: the final float output is compared at the input size.
FLOAT_OUTPUT_CASES = ["img64x64", "img96x80", "img232x120"]


@pytest.fixture(scope="module")
def scuf_dir() -> Path:
    """The official fixture with its golden outputs: skipped without ../shared (failed under ``CI=true``)."""
    return shared_path("reference", "scuf")


@pytest.fixture(scope="module")
def golden(scuf_dir):
    return np.load(scuf_dir / "golden.npz")


@pytest.fixture(scope="module")
def pipe(scuf_dir):
    from comfyui_lowlight.pipelines import SCUFPipeline

    pipe = SCUFPipeline.from_pretrained(
        scuf_dir / "base", image_encoder=scuf_dir / "clip_tiny.pt", scuf_weights=scuf_dir / "scuf_official_tiny.pkl"
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _input(scuf_dir, case):
    from PIL import Image

    return Image.open(scuf_dir / "inputs" / f"{case}.png")


def _max_diff(a, b) -> float:
    a = a.detach().float().cpu() if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a, np.float32))
    b = torch.as_tensor(np.asarray(b, np.float32))
    assert tuple(a.shape) == tuple(b.shape), f"shape {tuple(a.shape)} vs golden {tuple(b.shape)}"
    return (a - b).abs().max().item()


def test_prompt_tokens_and_embedding(pipe, golden):
    from comfyui_lowlight.pipelines.scuf.pipeline import DEFAULT_PROMPT

    assert str(golden["prompt"]) == DEFAULT_PROMPT
    ids = pipe.tokenizer(DEFAULT_PROMPT, max_length=77, padding="max_length", truncation=True,
                         return_tensors="pt").input_ids
    np.testing.assert_array_equal(ids.numpy(), golden["prompt_input_ids"])
    with torch.no_grad():
        assert _max_diff(pipe.encode_prompt(DEFAULT_PROMPT, "cpu"), golden["prompt_embeds"]) <= 5e-5


def test_scheduler_constant(pipe, golden):
    assert pipe.scheduler.alphas_cumprod[999].item() == pytest.approx(float(golden["alphas_cumprod_999"]), abs=0)


@pytest.mark.parametrize("case", CASES)
def test_intermediates(pipe, golden, scuf_dir, case):
    from comfyui_lowlight.pipelines.media.illumination import inverted_value_channel
    from comfyui_lowlight.pipelines.scuf.modules import decode_with_skips, encode_with_skips, x0_from_noise
    from comfyui_lowlight.pipelines.media.image_convert import prepare_image
    from comfyui_lowlight.pipelines.scuf.pipeline import DEFAULT_PROMPT, RESIZE_MULTIPLE

    image, size = prepare_image(_input(scuf_dir, case), multiple=RESIZE_MULTIPLE)
    np.testing.assert_array_equal(golden[f"{case}_input_u8"].shape[:2], size)
    resized_u8 = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(resized_u8, golden[f"{case}_resized_u8"])
    x = (image[None] - 0.5) / 0.5
    assert _max_diff(x, golden[f"{case}_x_t"]) <= 1e-7
    v_inv = inverted_value_channel(image[None])
    assert _max_diff(v_inv[:, 0], golden[f"{case}_v_inv"]) <= 1e-7

    from comfyui_lowlight.pipelines.scuf.clip_encoder import clip_image_embedding

    with torch.no_grad():
        emb = clip_image_embedding(pipe.image_encoder, v_inv.repeat(1, 3, 1, 1))
        assert _max_diff(emb, golden[f"{case}_clip_emb"]) <= 1e-6
        tokens = pipe.encode_image_prompt(v_inv)
        assert _max_diff(tokens, golden[f"{case}_ca_tokens"]) <= 5e-5

        posterior, skips = encode_with_skips(pipe.vae, x)
        latents = posterior.mean * pipe.vae.config.scaling_factor
        assert _max_diff(latents, golden[f"{case}_latent"]) <= 5e-5
        context = torch.cat([pipe.encode_prompt(DEFAULT_PROMPT, "cpu"), tokens], dim=1)
        eps = pipe.unet(latents, torch.tensor([999]), encoder_hidden_states=context).sample
        assert _max_diff(eps, golden[f"{case}_model_pred"]) <= 5e-5
        x0 = x0_from_noise(latents, eps, pipe.scheduler.alphas_cumprod, 999)
        assert _max_diff(x0, golden[f"{case}_x_out"]) <= 5e-4
        out = decode_with_skips(pipe.vae, x0 / pipe.vae.config.scaling_factor, skips).clamp(-1, 1) * 0.5 + 0.5
        assert _max_diff(out[0], golden[f"{case}_output"]) <= 1e-4


@pytest.mark.parametrize("case", FLOAT_OUTPUT_CASES)
def test_float_output(pipe, golden, scuf_dir, case):
    out = pipe(_input(scuf_dir, case), output_type="pt").images
    assert out.dtype == torch.float32
    assert _max_diff(out[0], golden[f"{case}_output"]) <= 1e-4
    np_out = pipe(_input(scuf_dir, case), output_type="np").images
    assert np_out.shape == (1,) + golden[f"{case}_input_u8"].shape and np_out.dtype == np.float32
    assert _max_diff(np_out[0].transpose(2, 0, 1), golden[f"{case}_output"]) <= 1e-4


@pytest.mark.parametrize("case", CASES)
def test_uint8_output(pipe, golden, scuf_dir, case):
    """Saved PNGs: off by at most 1 on at most 0.1 % of values (README sec. 10 uint8 rule)."""
    image = pipe(_input(scuf_dir, case)).images[0]
    ref = golden[f"{case}_output_u8"]
    assert image.size == (ref.shape[1], ref.shape[0]) and image.mode == "RGB"
    diff = np.abs(np.asarray(image).astype(np.int16) - ref.astype(np.int16))
    assert diff.max() <= 1
    assert (diff > 0).mean() <= 1e-3


@pytest.mark.parametrize("case", ["img64x64", "img96x80"])
def test_sampled_latent_seed0(pipe, golden, scuf_dir, case):
    """``sample_latent=True`` with a generator seeded 0 reproduces the official ``latent_dist.sample()`` run."""
    generator = torch.Generator().manual_seed(0)
    out = pipe(_input(scuf_dir, case), sample_latent=True, generator=generator, output_type="pt").images
    assert _max_diff(out[0], golden[f"{case}_output_sample_seed0"]) <= 1e-4


def test_cycle_query_index_rule():
    """float32 linspace truncation (README 8.7), not exact floor(i (D-1) / (N-1))."""
    from comfyui_lowlight.pipelines.scuf.modules import cycle_query_indices

    assert cycle_query_indices(32, 435)[224].item() == 15
    exact = torch.arange(435) * 31 // 434
    assert exact[224].item() == 16
    for d in (32, 1024):
        for n in list(range(1, 600)) + [807, 1200, 2047, 4096, 8192]:
            expected = torch.linspace(0, d - 1, n).long()
            assert torch.equal(cycle_query_indices(d, n), expected), (d, n)
