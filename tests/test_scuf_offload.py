"""``enable_model_cpu_offload`` on SCUFPipeline, exercised on the CPU (the tiny SCUF model of
tests/tiny_scuf.py).

Without a GPU the offload target is the CPU itself (``device="cpu"``), so weights do not actually move and memory is
not saved; what is tested is that diffusers' hook chain (``model_cpu_offload_seq``) is installed on every model, that
every hook fires during a call (the SCUF encode/decode and CLIP paths bypass ``forward`` and call the hooks
themselves), that the execution device is resolved from the hooks, and that results are unchanged, also when tiled.
"""

import numpy as np

from tiny_scuf import tiny_scuf  # noqa: F401  session fixture: the tiny SCUF model (no ../shared needed)

MODELS = ["text_encoder", "image_encoder", "image_proj", "unet", "vae"]


def test_offload_sequence_names_every_model():
    from comfyui_lowlight.pipelines.scuf.pipeline import SCUFPipeline

    assert SCUFPipeline.model_cpu_offload_seq.split("->") == MODELS


def test_model_cpu_offload_hooks_fire_and_results_match(tiny_scuf):  # noqa: F811
    pipe = tiny_scuf.pipeline()
    image = tiny_scuf.image("img96x80")
    expected = pipe(image, output_type="np").images

    pipe.enable_model_cpu_offload(device="cpu")
    calls = {name: 0 for name in MODELS}
    for name in MODELS:
        hook = getattr(pipe, name)._hf_hook
        original = hook.pre_forward

        def counting(module, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(module, *args, **kwargs)

        hook.pre_forward = counting
    assert pipe._execution_device.type == "cpu"
    out = pipe(image, output_type="np").images
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)  # same math; kernels may differ in the last bits
    assert all(calls[name] >= 1 for name in MODELS), calls

    # tiled: the hooks fire per tile, the blend still equals the untiled result for a single-tile image
    pipe.enable_vae_tiling(128, 32)
    np.testing.assert_allclose(pipe(image, output_type="np").images, expected, rtol=0, atol=1e-5)
    pipe.remove_all_hooks()
