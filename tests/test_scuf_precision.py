"""SCUFPipeline in reduced precision on the tiny SCUF model (tests/tiny_scuf.py): bfloat16 vs float32.

The one-step x0 formula divides by sqrt(alphas_cumprod[999]) ~ 0.068, so rounding errors of the latent and of the
UNet's noise prediction reach the output ~14.6x amplified; on random weights that makes the bfloat16 *maximum* error
0.1-0.23 while the *mean* error stays around 0.8-1.5e-2 (measured on the tiny model; the official fixture of
../shared/reference/scuf gives 0.06-0.21 and 0.5-1.2e-2, the values in the README, "SCUF: speed, memory and
precision"). The issue's goal ("bfloat16 output within 2e-2 of float32") is asserted on the mean absolute error per
image; the maximum is bounded loosely.
"""

import numpy as np
import pytest
import torch

from tiny_scuf import tiny_scuf  # noqa: F401  session fixture: the tiny SCUF model (no ../shared needed)

CASES = ["img64x64", "img96x80", "img70x50", "img232x120"]
MEAN_TOLERANCE = 2e-2
MAX_TOLERANCE = 0.3


@pytest.fixture(scope="module")
def scuf(tiny_scuf):  # noqa: F811
    return tiny_scuf


def _load(scuf, **kwargs):
    return scuf.pipeline(**kwargs)


@pytest.fixture(scope="module")
def float32_outputs(scuf):
    pipe = _load(scuf)
    return {case: pipe(scuf.image(case), output_type="np").images for case in CASES}


@pytest.fixture(scope="module")
def bf16_pipe(scuf):
    return _load(scuf, dtype=torch.bfloat16)


def _module_dtypes(pipe) -> set:
    return {next(pipe.unet.parameters()).dtype, next(pipe.vae.parameters()).dtype,
            next(pipe.image_proj.parameters()).dtype, next(pipe.text_encoder.parameters()).dtype}


@pytest.mark.parametrize("case", CASES)
def test_bfloat16_close_to_float32(bf16_pipe, float32_outputs, scuf, case):
    assert _module_dtypes(bf16_pipe) == {torch.bfloat16}
    # SCUF modules loaded after the cast must follow the base model's dtype
    assert {p.dtype for p in bf16_pipe.scuf_parameters().values()} == {torch.bfloat16}
    out = bf16_pipe(scuf.image(case), output_type="np").images
    ref = float32_outputs[case]
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert 0.0 <= out.min() and out.max() <= 1.0
    error = np.abs(out - ref)
    assert error.mean() <= MEAN_TOLERANCE, f"{case}: mean |bf16 - fp32| = {error.mean():.4f}"
    assert error.max() <= MAX_TOLERANCE, f"{case}: max |bf16 - fp32| = {error.max():.4f}"


def test_bfloat16_tensor_output_is_float32(bf16_pipe, scuf):
    image = scuf.image("img64x64")
    out = bf16_pipe(image, output_type="pt").images
    assert out.dtype == torch.float32 and out.shape == (1, 3, 64, 64)
    pil = bf16_pipe(image).images[0]
    assert pil.mode == "RGB" and pil.size == (64, 64)


def test_float16_with_float32_vae(scuf, float32_outputs):
    """The GPU recipe for float16: the SD 2.x VAE overflows in float16 (``force_upcast``), so it stays float32."""
    pipe = _load(scuf, dtype=torch.float16)
    pipe.vae.to(torch.float32)
    assert pipe.vae.config.force_upcast
    assert next(pipe.unet.parameters()).dtype == torch.float16
    out = pipe(scuf.image("img96x80"), output_type="np").images
    error = np.abs(out - float32_outputs["img96x80"])
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert error.mean() <= MEAN_TOLERANCE and error.max() <= MAX_TOLERANCE


def test_from_path_applies_the_precision_rules(scuf):
    """``SCUFPipeline.from_path``: CLIP follows the dtype, the ``force_upcast`` VAE stays float32 under float16 only."""
    from comfyui_lowlight.pipelines import SCUFPipeline

    half = SCUFPipeline.from_path(scuf.base, dtype=torch.float16, image_encoder=scuf.clip, scuf_weights=scuf.official)
    assert next(half.unet.parameters()).dtype == torch.float16
    assert {p.dtype for p in half.image_encoder.parameters()} == {torch.float16}
    assert {p.dtype for p in half.vae.parameters()} == {torch.float32}  # LoRA and skip convs included
    assert half.scuf_config is not None
    bf16 = SCUFPipeline.from_path(scuf.base, dtype=torch.bfloat16, image_encoder=scuf.clip)
    assert {p.dtype for p in bf16.vae.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bf16.image_encoder.parameters()} == {torch.bfloat16}
    assert bf16.scuf_config is None
