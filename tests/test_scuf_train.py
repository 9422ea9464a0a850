"""SCUF fine-tuning script on the tiny SCUF model of tests/tiny_scuf.py (CPU, random RetinexNet weights): losses,
trained/frozen parameters, checkpoints, exact resume, bad data, captions (tiny random BLIP), and a 2-process run
through ``accelerate launch``."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_lowlight.pipelines.scuf import trainer as train_scuf
from comfyui_lowlight.cli import main as lowlight
from comfyui_lowlight.pipelines.scuf.captions import (
    CaptionsError,
    load_captions,
    match_captions,
    night_to_day,
    save_captions,
)
from tiny_scuf import tiny_scuf  # noqa: F401  session fixture: the tiny SCUF model (no ../shared needed)

LOW = ["dark0.png", "sub/dark1.jpg", "dark2.webp"]
NORMAL = ["day0.png", "day1.jpg", "day2.png"]
STEPS = 10


def train_scuf_command(argv):
    """``lowlight train scuf ARGV...`` in-process."""
    return lowlight(["train", "scuf", *argv])


def _image(seed: int, size, gamma: float, gain: float) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = Image.fromarray((rng.random((5, 6, 3)) * 255).astype(np.uint8)).resize(size, Image.BICUBIC)
    array = (np.asarray(base, dtype=np.float32) / 255) ** gamma * gain
    return Image.fromarray((np.clip(array, 0, 1) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("scuf_data")
    for i, name in enumerate(LOW):
        (root / "low" / name).parent.mkdir(parents=True, exist_ok=True)
        _image(i, (48 + 8 * i, 40), 2.0, 0.3).save(root / "low" / name)
    (root / "low" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")  # skipped with a count
    (root / "normal").mkdir()
    for i, name in enumerate(NORMAL):
        _image(10 + i, (40, 56), 0.5, 1.0).save(root / "normal" / name)
    captions = root / "captions.json"
    save_captions(captions, {"low": {n: f"a dark street number {i}" for i, n in enumerate(LOW)},
                             "normal": {n: f"a bright room number {i}" for i, n in enumerate(NORMAL)}}, "hand")
    return root


@pytest.fixture(scope="module")
def scuf(tiny_scuf):  # noqa: F811
    return tiny_scuf


def _args(scuf, data, output, *extra):
    return ["--pretrained", str(scuf.base), "--image_encoder", str(scuf.clip),
            "--low", str(data / "low"), "--normal", str(data / "normal"), "--output", str(output),
            "--captions", str(data / "captions.json"),
            "--retinex_weights", str(scuf.decomnet),
            "--resolution", "32", "--resize", "40", "--max_train_steps", str(STEPS), "--checkpointing_steps", "5",
            "--validation_steps", "5", "--num_validation_images", "2", "--seed", "3", "--no_progress", *extra]


def _log(output):
    return [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(scuf, data, tmp_path_factory):
    """One 10-step run; the in-memory training model is kept for the frozen/trained checks."""
    torch.set_num_threads(1)
    captured = {}
    original = train_scuf.build_training

    def capture(*a, **k):
        captured["result"] = original(*a, **k)
        return captured["result"]

    output = tmp_path_factory.mktemp("scuf_run") / "out"
    train_scuf.build_training = capture
    try:
        assert train_scuf_command(_args(scuf, data, output)) == 0
    finally:
        train_scuf.build_training = original
    return output, captured["result"]


def _fresh_pipe(scuf, seed=None):
    pipe = scuf.pipeline(None)
    if seed is not None:
        torch.manual_seed(seed)  # the trainer's initialisation
        pipe.init_scuf_modules(init="official")
    return pipe


@pytest.fixture(scope="module")
def initial_pipe(scuf):
    """The trainer's starting point (seed 3): base weights + freshly initialised SCUF modules."""
    return _fresh_pipe(scuf, seed=3)


def test_every_loss_finite_and_present(run):
    output, _ = run
    log = _log(output)
    assert [entry["step"] for entry in log] == list(range(1, STEPS + 1))
    keys = set(log[0])
    for part in ("cycle_low_cycle", "cycle_low_caption", "cycle_low_reflectance", "cycle_normal_cycle",
                 "gan_lighten", "gan_darken", "idt_normal_identity", "idt_low_caption", "idt_low_reflectance",
                 "disc_fake_lighten", "disc_real_darken"):
        assert part in keys
    assert all(np.isfinite(v) for entry in log for v in entry.values())
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]
    assert not list(output.glob(".checkpoint-*"))  # no temporary folder left behind
    assert sorted(p.name for p in (output / "validation" / "step-10").iterdir()) == ["dark0.png", "dark2.png"]
    with Image.open(output / "validation" / "step-10" / "dark0.png") as im:
        assert im.size == (48, 40)  # shorter side --resize


def test_trained_parameters_changed_and_frozen_unchanged(run, scuf, initial_pipe):
    from comfyui_lowlight.pipelines.scuf.retinex import load_decomnet
    from comfyui_lowlight.pipelines.scuf.weights import scuf_parameters

    output, (model, gen_params, disc_params, named) = run
    init_a2b = initial_pipe.scuf_parameters()
    pipe = model.pipe
    # every trained tensor moved: lighten and darken VAE LoRA + skip convs, projector, adapters, ref decoder, discs
    for key, value in pipe.scuf_parameters().items():
        assert not torch.equal(value, init_a2b[key]), key
    b2a = scuf_parameters(model.vaes["b2a"], None, pipe.unet)
    for key, value in b2a.items():
        if key.startswith("vae."):
            assert not torch.equal(value, init_a2b[key]), key
            assert not torch.equal(value, pipe.scuf_parameters()[key]), key  # its own weights
    assert any(k.startswith("ref.") for k in named) and any(k.startswith("disc_lighten.") for k in named)
    assert all(p.requires_grad for p in gen_params + disc_params)
    # frozen: UNet, text encoder, CLIP, VAE base weights, Retinex
    base = initial_pipe  # its UNet/text/CLIP/VAE base tensors are the fixture's
    base_unet = base.unet.state_dict()
    unet_now = {k: v for k, v in pipe.unet.state_dict().items() if ".processor." not in k}
    assert unet_now.keys() == {k for k in base_unet if ".processor." not in k}
    assert all(torch.equal(v, base_unet[k]) for k, v in unet_now.items())
    for name in ("text_encoder", "image_encoder"):
        ref = getattr(base, name).state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in getattr(pipe, name).state_dict().items()), name
    base_vae = base.vae.state_dict()
    for vae in (pipe.vae, model.vaes["b2a"]):
        for key, value in vae.state_dict().items():
            if ".lora_" not in key and not key.startswith("decoder.skip_conv_"):
                assert torch.equal(value, base_vae[key]), key
    official = load_decomnet(scuf.decomnet)
    assert all(torch.equal(v, official.state_dict()[k]) for k, v in model.decomposer.state_dict().items())
    assert not any(p.requires_grad for p in list(pipe.unet.parameters()) if p not in set(gen_params))


def test_training_iteration_follows_the_paper_order(run):
    """One iteration: cycle from low, cycle from normal, GAN, identity, then the discriminator on fakes and reals."""
    from comfyui_lowlight.pipelines.scuf.training import training_iteration

    _, (model, _, _, _) = run
    updates = []

    def update(loss, which):
        assert loss.ndim == 0 and loss.requires_grad
        updates.append(which)

    low, normal = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    logs = training_iteration(model, (low, normal, ["a dark street"], ["a street"]), torch.Generator().manual_seed(0),
                              update)
    assert updates == ["generator"] * 4 + ["discriminator"] * 2
    assert {"cycle_low_cycle", "cycle_normal_cycle", "gan_lighten", "idt_normal_identity", "disc_fake_lighten",
            "disc_real_darken"} <= set(logs)


def test_checkpoint_loads_into_pipeline_and_changes_output(run, scuf, initial_pipe):
    from comfyui_lowlight.pipelines.scuf.weights import load_scuf_file

    output, _ = run
    image = np.asarray(scuf.image("img64x64"))
    before = initial_pipe(image, output_type="np").images[0]
    trained = _fresh_pipe(scuf)
    config = trained.load_scuf_weights(output / "checkpoint-10" / "scuf_weights.safetensors")
    after = trained(image, output_type="np").images[0]
    assert config.lora_rank == 4 and after.shape == (64, 64, 3)
    assert np.abs(after - before).max() > 1e-3
    # the ComfyUI adapter loader reads the same file into its cached base pipeline
    from comfyui_lowlight.nodes import scuf_nodes

    spec = scuf_nodes.SCUFBaseSpec(model="tiny", model_path=str(scuf.base),
                                   clip_path=str(scuf.clip), dtype="float32", stamp=())
    try:
        weights = scuf_nodes.read_scuf_weights(spec, "trained", output / "checkpoint-10" / "scuf_weights.safetensors")
        node_pipe = scuf_nodes.activate(scuf_nodes.SCUFModel(spec, weights))
        np.testing.assert_allclose(node_pipe(image, output_type="np").images[0], after, atol=1e-6)
    finally:
        scuf_nodes.release_base()
    # the final file is the last checkpoint's weights; the darken file is a valid b2a file for the same loaders
    final, _, _, meta = load_scuf_file(output / "scuf_weights.safetensors")
    last, _, _, _ = load_scuf_file(output / "checkpoint-10" / "scuf_weights.safetensors")
    assert meta["direction"] == "a2b" and all(torch.equal(final[k], last[k]) for k in final)
    darken, _, _, meta_b2a = load_scuf_file(output / "scuf_weights_b2a.safetensors")
    assert meta_b2a["direction"] == "b2a" and darken.keys() == final.keys()
    assert any(not torch.equal(darken[k], final[k]) for k in final if k.startswith("vae."))


def test_resume_reproduces_the_uninterrupted_run(run, scuf, data, tmp_path):
    output, _ = run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(output / "checkpoint-5", resumed / "checkpoint-5")
    # as if interrupted after step 7: the log lines after the checkpoint are dropped on resume
    (resumed / "train_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in _log(output)[:7]))
    assert train_scuf_command(_args(scuf, data, resumed, "--resume", "latest")) == 0
    full, part = _log(output), _log(resumed)
    assert [e["step"] for e in part] == list(range(1, STEPS + 1))
    for a, b in zip(full[5:], part[5:]):
        assert a.keys() == b.keys()
        losses = [k for k in a if k != "seconds"]
        np.testing.assert_allclose([b[k] for k in losses], [a[k] for k in losses], rtol=1e-5, atol=1e-6)
    from safetensors.torch import load_file

    for name in ("scuf_weights.safetensors", "scuf_weights_b2a.safetensors",
                 "checkpoint-10/model.safetensors"):
        a, b = load_file(output / name), load_file(resumed / name)
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6, name


def test_resume_refuses_a_checkpoint_of_another_configuration(run, scuf, data, tmp_path):
    output, _ = run
    other = tmp_path / "other"
    other.mkdir()
    shutil.copytree(output / "checkpoint-5", other / "checkpoint-5")
    (other / ".checkpoint-10.tmp").mkdir()  # an interrupted save: never a resume candidate
    assert train_scuf.find_checkpoint(other, "latest") == other / "checkpoint-5"
    # no reflectance decoder: the saved trained tensors do not match
    with pytest.raises(SystemExit, match="model.safetensors does not match this configuration"):
        train_scuf_command(_args(scuf, data, other, "--resume", "latest", "--no_reflectance"))


@pytest.mark.parametrize("earlier", ["checkpoint-5", "train_log.jsonl", "scuf_weights.safetensors"])
def test_refuses_an_output_folder_holding_an_earlier_run_without_resume(earlier, scuf, data, tmp_path, monkeypatch,
                                                                        capsys):
    def no_model(*a, **k):
        raise AssertionError("the refusal must come before the model is built")

    monkeypatch.setattr(train_scuf, "build_training", no_model)
    output = tmp_path / "out"
    output.mkdir()
    (output / earlier).mkdir() if earlier.startswith("checkpoint") else (output / earlier).write_text("earlier")
    assert train_scuf_command(_args(scuf, data, output)) == 2
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0 and str(output) in message and "--resume" in message and "new folder" in message
    assert sorted(p.name for p in output.iterdir()) == [earlier]  # nothing written


def test_empty_or_absent_output_folder_is_not_refused(tmp_path):
    train_scuf.refuse_earlier_run(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    train_scuf.refuse_earlier_run(tmp_path / "empty")


@pytest.mark.parametrize("case", ["missing", "empty", "unreadable", "caption_missing", "caption_extra", "caption_bad"])
def test_bad_data_fails_before_any_model_is_loaded(case, scuf, data, tmp_path, monkeypatch, capsys):
    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(train_scuf, "load_pipeline", no_model)
    args = _args(scuf, data, tmp_path / "out")
    captions = data / "captions.json"
    expected = {
        "missing": "--low: folder not found",
        "empty": "--low: no images",
        "unreadable": "none of the 1 image files could be read",
        "caption_missing": "1 low image(s) have no caption: dark2.webp",
        "caption_extra": "1 normal caption(s) name images that are not in the folder",
        "caption_bad": "not a SCUF captions file",
    }[case]
    if case in ("missing", "empty", "unreadable"):
        low = tmp_path / "low"
        if case != "missing":
            low.mkdir()
        if case == "unreadable":
            (low / "x.jpg").write_bytes(b"garbage")
        args[args.index("--low") + 1] = str(low)
    else:
        content = json.loads(captions.read_text())
        if case == "caption_missing":
            del content["low"]["dark2.webp"]
        elif case == "caption_extra":
            content["normal"]["other.png"] = "a photo"
        else:
            content = {"low": {}}
        captions = tmp_path / "captions.json"
        captions.write_text(json.dumps(content))
        args[args.index("--captions") + 1] = str(captions)
    assert train_scuf_command(args) == 2
    assert expected in capsys.readouterr().err


def test_unreadable_files_are_skipped_with_a_count(data):
    messages = []
    good = train_scuf.readable_images(train_scuf.find_images(data / "low", "low"), "low", messages.append)
    assert sorted(p.relative_to(data / "low").as_posix() for p in good) == sorted(LOW)
    assert len(messages) == 1 and "--low: skipped 1 unreadable file(s) of 4" in messages[0]
    assert "broken.png" in messages[0]


def test_caption_file_validation(tmp_path):
    path = tmp_path / "c.json"
    save_captions(path, {"low": {"a.png": "a night street"}, "normal": {}}, "hand")
    captions = load_captions(path)
    assert match_captions(captions, "low", ["a.png"]) == ["a night street"]
    with pytest.raises(CaptionsError, match="have no caption: b.png"):
        match_captions(captions, "low", ["a.png", "b.png"])
    with pytest.raises(CaptionsError, match="not found"):
        load_captions(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CaptionsError, match="not a JSON"):
        load_captions(tmp_path / "bad.json")
    assert night_to_day("A dark street at Night, nightly dimmer") == "A bright street at day, nightly dimmer"


def _tiny_blip(folder):
    """A randomly initialised BLIP captioner (~50k parameters) with a 15-word BERT vocabulary, saved to ``folder``."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "night", "street", "dark",
             "room", "cat", "the"]
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    config = BlipConfig(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16, projection_dim=16),
        text_config=dict(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, encoder_hidden_size=16, max_position_embeddings=40, bos_token_id=5,
                         pad_token_id=0, sep_token_id=3, eos_token_id=3),
        projection_dim=16,
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)


def test_caption_subcommand_with_tiny_blip(data, tmp_path, capsys):
    blip = tmp_path / "blip"
    _tiny_blip(blip)
    out = tmp_path / "captions.json"
    argv = ["caption", "--low", str(data / "low"), "--normal", str(data / "normal"), "--output", str(out),
            "--captioner", str(blip), "--max_new_tokens", "5", "--device", "cpu"]
    assert train_scuf_command(argv) == 0
    captions = load_captions(out)
    assert sorted(captions["low"]) == sorted(LOW) and sorted(captions["normal"]) == sorted(NORMAL)
    texts = list(captions["low"].values()) + list(captions["normal"].values())
    assert all(t.strip() and "[" not in t for t in texts)
    assert not any("night" in t.split() or "dark" in t.split() for t in texts)  # mapped to day words
    assert "skipped 1 unreadable file(s)" in capsys.readouterr().out
    # the trainer accepts it (matched in folder order), and the file is never overwritten silently
    assert len(match_captions(captions, "low", sorted(captions["low"]))) == 3
    with pytest.raises(SystemExit, match="exists"):
        train_scuf_command(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_cpu_run_through_accelerate(scuf, data, tmp_path):
    output = tmp_path / "ddp"
    args = _args(scuf, data, output)
    args[args.index("--max_train_steps") + 1] = "2"
    args[args.index("--checkpointing_steps") + 1] = "2"
    args[args.index("--validation_steps") + 1] = "0"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # `accelerate launch --cpu` starts one process unless under mpirun; --multi_gpu starts N processes
    # (torchrun) and the trainer's --cpu makes them one gloo group.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "comfyui_lowlight", "train", "scuf", *args, "--cpu"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    assert [e["step"] for e in _log(output)] == [1, 2]
    assert (output / "scuf_weights.safetensors").is_file()
    # accelerate's checkpoint folder: one RNG state per process
    assert sorted(p.name for p in (output / "checkpoint-2").glob("random_states_*.pkl")) == ["random_states_0.pkl",
                                                                                            "random_states_1.pkl"]


def test_plain_unet_twin_shares_weights_and_runs_without_the_adapter(scuf):
    from diffusers import UNet2DConditionModel

    from comfyui_lowlight.pipelines.scuf.modules import add_cycle_attn_processors
    from comfyui_lowlight.pipelines.scuf.training import plain_unet_twin

    path = scuf.base / "unet"
    plain = UNet2DConditionModel.from_pretrained(path).eval()
    unet = UNet2DConditionModel.from_pretrained(path).eval()
    torch.manual_seed(0)
    add_cycle_attn_processors(unet)
    twin = plain_unet_twin(unet)
    own = dict(unet.named_parameters())
    assert all(p.data_ptr() == own[n].data_ptr() for n, p in twin.named_parameters())  # no copy
    assert not any(p.requires_grad for p in twin.parameters())
    latents, text = torch.randn(1, 4, 4, 4), torch.randn(1, 77, 32)
    t = torch.tensor([999])
    with torch.no_grad():
        expected = plain(latents, t, encoder_hidden_states=text).sample
        assert torch.allclose(twin(latents, t, encoder_hidden_states=text).sample, expected, atol=1e-6)


def test_loss_helpers():
    from comfyui_lowlight.pipelines.scuf.training import (
        clip_levels,
        cosine_consistency_loss,
        gan_discriminator_loss,
        gan_generator_loss,
        ssim,
    )

    torch.manual_seed(0)
    x = torch.rand(2, 3, 20, 24)
    assert torch.isclose(ssim(x, x), torch.tensor(1.0), atol=1e-5)
    assert ssim(x, torch.rand(2, 3, 20, 24)) < 0.2
    assert ssim(x[..., :5, :7], x[..., :5, :7]).isfinite()  # window shrinks for tiny images
    z = torch.randn(1, 4, 3, 3)
    assert torch.isclose(cosine_consistency_loss(z, 2 * z), torch.tensor(0.0), atol=1e-6)
    assert torch.isclose(cosine_consistency_loss(z, -z), torch.tensor(2.0), atol=1e-6)
    logits = torch.tensor([[10.0, 10.0, 10.0]])
    assert gan_generator_loss(logits) < 1e-3 and gan_discriminator_loss(logits, real=False) > 29
    assert clip_levels(12, 3) == [4, 8, 12] and clip_levels(2, 3) == [1, 2]
