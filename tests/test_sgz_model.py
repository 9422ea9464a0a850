"""SGZ model: parity with the official code, weights IO, fused vs reference recurrence, any size."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from comfyui_lowlight.pipelines.sgz_model import (
    EnhancementFactorEstimator,
    apply_recurrence,
    apply_recurrence_reference,
    enhance,
    estimate_factor,
    estimate_factor_lowres,
    init_weights_for_training,
    load_sgz_weights,
    lowres_size,
    save_sgz_weights,
    upsample_factor,
)

CASES = ["lol111_s12", "lol1_s12", "lol111_s1", "lol1_s1"]


@pytest.fixture(scope="module")
def official(shared_dir):
    return load_sgz_weights(shared_dir / "reference" / "sgz" / "Epoch99.pth")


@pytest.fixture(scope="module")
def golden(shared_dir):
    return dict(np.load(shared_dir / "reference" / "sgz" / "golden_official.npz"))


def _nchw(hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(hwc)).permute(2, 0, 1)[None].contiguous()


def _case_input(golden, case):
    return _nchw(golden[f"{case}_input_u8"]).float() / 255.0


def test_architecture_matches_official_checkpoint(official):
    assert sum(p.numel() for p in official.parameters()) == 10561
    keys = set(EnhancementFactorEstimator().state_dict())
    assert keys == {f"e_conv{i}.{part}.{kind}" for i in range(1, 8) for part in ("depth_conv", "point_conv")
                    for kind in ("weight", "bias")}


@pytest.mark.parametrize("case", CASES)
def test_parity_with_official_golden(official, golden, case):
    downscale = int(case.split("_s")[1])
    image = _case_input(golden, case)
    with torch.no_grad():
        factor = estimate_factor(official, image, downscale)
        fused = apply_recurrence(image, factor)
        reference = apply_recurrence_reference(image, factor)
        one_pass = enhance(image, estimate_factor_lowres(official, image, downscale))
    expected_factor = _nchw(golden[f"{case}_factor"])
    expected = _nchw(golden[f"{case}_output"])
    assert factor.shape == expected_factor.shape
    assert (factor - expected_factor).abs().max() < 1e-4
    for output in (fused, reference, one_pass):
        assert output.shape == expected.shape
        assert (output - expected).abs().max() < 1e-4


def test_uint8_input_and_output_of_fused_pass(official, golden):
    u8 = _nchw(golden["lol1_s12_input_u8"])
    channels_last = u8.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        factor = estimate_factor_lowres(official, channels_last)
        as_float = enhance(channels_last, factor, out_dtype=torch.float32)
        as_u8 = enhance(channels_last, factor, out_dtype=torch.uint8)
    expected = _nchw(golden["lol1_s12_output"])
    assert (as_float - expected).abs().max() < 1e-4
    assert as_u8.dtype == torch.uint8 and as_u8.is_contiguous(memory_format=torch.channels_last)
    assert (as_u8.float() - (expected.clamp(0, 1) * 255).round()).abs().max() <= 1


def test_safetensors_round_trip(official, golden, tmp_path):
    path = save_sgz_weights(official, tmp_path / "sgz.safetensors", metadata={"steps": "7"})
    loaded = load_sgz_weights(path)
    image = _case_input(golden, "lol111_s12")[..., :120, :144]
    with torch.no_grad():
        assert torch.equal(estimate_factor(official, image), estimate_factor(loaded, image))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        assert handle.metadata() == {"steps": "7", "padding_mode": "zeros"}
    assert not [p for p in tmp_path.iterdir() if p.name != "sgz.safetensors"]  # no temp file left behind


@pytest.mark.parametrize("size", [(1, 1), (1, 7), (5, 3), (13, 29), (37, 61), (12, 24), (25, 12)])
@pytest.mark.parametrize("downscale", [1, 4, 12])
def test_any_size_keeps_size_and_fused_equals_reference(size, downscale):
    torch.manual_seed(0)
    model = EnhancementFactorEstimator()
    init_weights_for_training(model)
    image = torch.rand(2, 3, *size)
    with torch.no_grad():
        small = estimate_factor_lowres(model, image, downscale)
        factor = estimate_factor(model, image, downscale)
        fused = enhance(image, small)
        reference = apply_recurrence_reference(image, factor)
    assert small.shape[-2:] == lowres_size(*size, downscale)
    assert factor.shape == fused.shape == image.shape
    assert (fused - reference).abs().max() < 1e-5


def test_downscale_matches_official_rule_when_divisible():
    torch.manual_seed(0)
    image = torch.rand(1, 3, 48, 72)
    model = EnhancementFactorEstimator()
    with torch.no_grad():
        official_small = model(F.interpolate(image, scale_factor=1 / 12, mode="bilinear"))
        official_full = torch.nn.UpsamplingBilinear2d(scale_factor=12)(official_small)
        assert (estimate_factor_lowres(model, image, 12) - official_small).abs().max() < 1e-6
        assert (estimate_factor(model, image, 12) - official_full).abs().max() < 1e-6


def test_fused_matches_reference_on_large_random_factor_and_layouts():
    torch.manual_seed(1)
    image = torch.rand(3, 3, 67, 301)
    small = torch.rand(3, 3, 6, 25) * 2 - 1
    reference = apply_recurrence_reference(image, upsample_factor(small, image.shape[-2:]))
    for layout in (torch.contiguous_format, torch.channels_last):
        fused = enhance(image.contiguous(memory_format=layout), small)
        assert (fused - reference).abs().max() < 1e-5
    full = upsample_factor(small, image.shape[-2:])
    assert (apply_recurrence(image, full) - reference).abs().max() < 1e-5
    assert torch.equal(enhance(image, small, recurrences=0), image)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_keeps_low_precision_dtype(dtype):
    torch.manual_seed(2)
    image = torch.rand(1, 3, 20, 30)
    small = torch.rand(1, 3, 2, 3) * 2 - 1
    out = enhance(image.to(dtype), small)
    reference = apply_recurrence_reference(image.to(dtype).float(), upsample_factor(small, (20, 30)))
    assert out.dtype == dtype
    assert (out.float() - reference).abs().max() < 1e-2


def test_apply_recurrence_is_differentiable():
    torch.manual_seed(3)
    model = EnhancementFactorEstimator()
    init_weights_for_training(model)
    image = torch.rand(2, 3, 24, 24)
    out = apply_recurrence(image, estimate_factor(model, image, 4))
    out.mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_init_weights_for_training_is_seeded_and_scaled():
    a, b = EnhancementFactorEstimator(), EnhancementFactorEstimator()
    init_weights_for_training(a, torch.Generator().manual_seed(5))
    init_weights_for_training(b, torch.Generator().manual_seed(5))
    assert torch.equal(a.e_conv3.point_conv.weight, b.e_conv3.point_conv.weight)
    assert abs(a.e_conv3.point_conv.weight.std().item() - 0.02) < 0.004


def test_padding_mode_round_trip_and_official_is_zeros(official, tmp_path):
    assert official.padding_mode == "zeros"
    model = EnhancementFactorEstimator(padding_mode="replicate")
    init_weights_for_training(model, torch.Generator().manual_seed(1))
    loaded = load_sgz_weights(save_sgz_weights(model, tmp_path / "rep.safetensors"))
    assert loaded.padding_mode == "replicate"
    assert loaded.e_conv4.depth_conv.padding_mode == "replicate"
    image = torch.rand(1, 3, 30, 41, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model.eval()(image), loaded(image))


def test_replicate_padding_has_no_border_band(official):
    """On a flat grey image the replicate-padded EFE predicts the same factor everywhere; zero padding does not."""
    replicate = EnhancementFactorEstimator(padding_mode="replicate")
    replicate.load_state_dict(official.state_dict())
    flat = torch.full((1, 3, 40, 60), 0.2)
    with torch.no_grad():
        spread_replicate = replicate.eval()(flat).amax((2, 3)) - replicate(flat).amin((2, 3))
        spread_zeros = official(flat).amax((2, 3)) - official(flat).amin((2, 3))
    assert spread_replicate.max() < 1e-6
    assert spread_zeros.max() > 1e-2


def test_unknown_padding_mode_names_file(official, tmp_path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in official.state_dict().items()}, str(tmp_path / "pad.safetensors"),
              metadata={"padding_mode": "circular"})
    with pytest.raises(ValueError, match=r"pad\.safetensors.*padding_mode='circular'.*zeros.*replicate"):
        load_sgz_weights(tmp_path / "pad.safetensors")
    with pytest.raises(ValueError, match="padding_mode"):
        EnhancementFactorEstimator(padding_mode="reflect")


def test_missing_weights_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_sgz_weights(tmp_path / "nope.pth")


def test_wrong_keys_and_shapes_name_file_and_expectation(tmp_path):
    state = EnhancementFactorEstimator().state_dict()
    state.pop("e_conv7.point_conv.bias")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "keys.pth")
    with pytest.raises(ValueError, match=r"keys\.pth.*missing keys.*e_conv7\.point_conv\.bias.*extra\.weight"):
        load_sgz_weights(tmp_path / "keys.pth")

    state = EnhancementFactorEstimator().state_dict()
    state["e_conv2.depth_conv.weight"] = torch.zeros(32, 1, 5, 5)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "shapes.safetensors"))
    with pytest.raises(ValueError, match=r"shapes\.safetensors.*e_conv2\.depth_conv\.weight \(32, 1, 5, 5\) "
                                         r"\(expected \(32, 1, 3, 3\)\).*Expected exactly: e_conv1"):
        load_sgz_weights(tmp_path / "shapes.safetensors")


def test_corrupt_file_names_path(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_sgz_weights(tmp_path / "bad.safetensors")


def test_invalid_arguments():
    model = EnhancementFactorEstimator()
    with pytest.raises(ValueError, match="downscale"):
        estimate_factor_lowres(model, torch.rand(1, 3, 8, 8), 0.5)
    with pytest.raises(ValueError, match="recurrences"):
        apply_recurrence(torch.rand(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), -1)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        enhance(torch.rand(3, 8, 8), torch.zeros(1, 3, 1, 1))


def test_fused_pass_with_two_threads_inside_inference_mode():
    torch.manual_seed(4)
    image = torch.rand(2, 3, 300, 400)  # 3 tiles per image, a short last one; each op split over 2 threads
    small = torch.rand(2, 3, 6, 33) * 2 - 1
    reference = apply_recurrence_reference(image, upsample_factor(small, image.shape[-2:]))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            out = enhance(image, small)
            as_u8 = enhance((image * 255).round().to(torch.uint8), small, out_dtype=torch.uint8)
    finally:
        torch.set_num_threads(threads)
    assert (out - reference).abs().max() < 1e-5
    assert as_u8.dtype == torch.uint8 and as_u8.shape == image.shape


def test_uint8_identity_with_zero_recurrences():
    image = torch.randint(0, 256, (1, 3, 9, 11), dtype=torch.uint8)
    assert torch.equal(enhance(image, torch.zeros(1, 3, 1, 1), recurrences=0, out_dtype=torch.uint8), image)
