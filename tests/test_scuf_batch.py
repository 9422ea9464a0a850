"""scuf_batch under ``accelerate launch`` with 2 CPU processes on a folder of images (tiny fixture model)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def scuf_dir(shared_dir) -> Path:
    return shared_dir / "reference" / "scuf"


@pytest.fixture(scope="module")
def batch_run(tmp_path_factory, scuf_dir):
    root = tmp_path_factory.mktemp("scuf_batch")
    source, output = root / "in", root / "out"
    (source / "sub").mkdir(parents=True)
    output.mkdir()
    image = Image.open(scuf_dir / "inputs" / "img64x64.png").convert("RGB")
    image.save(source / "a.png")
    image.resize((40, 24)).save(source / "b.jpg", quality=95)
    image.convert("L").save(source / "sub" / "c.png")
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((64, 64)))
    rgba.save(source / "sub" / "d.png")
    (source / "broken.png").write_bytes(b"not a png")
    image.save(source / "done.png")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(output / "done.png")  # existing output: must be skipped
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        "-m", "comfyui_lowlight.scuf_batch", "--base", str(scuf_dir / "base"),
        "--image-encoder", str(scuf_dir / "clip_tiny.pt"), "--scuf-weights", str(scuf_dir / "scuf_official_tiny.pkl"),
        "--input", str(source), "--output", str(output),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    return source, output, done


def test_two_processes_share_the_folder(batch_run):
    _, _, done = batch_run
    summaries = dict(re.findall(r"\[process (\d)/2\] enhanced (\d+) of", done.stderr))
    assert set(summaries) == {"1", "2"}, done.stderr[-3000:]
    assert sum(int(n) for n in summaries.values()) == 4  # a, b, c, d; broken fails; done is skipped
    assert all(int(n) >= 1 for n in summaries.values())


def test_failure_reported_and_run_goes_on(batch_run):
    _, output, done = batch_run
    assert done.returncode != 0
    assert re.search(r"failed: .*broken\.png", done.stderr)
    assert not (output / "broken.png").exists()
    assert not [p for p in output.rglob(".*")]  # no temporary files left behind


def test_outputs_keep_size_mode_and_skip_existing(batch_run):
    _, output, _ = batch_run
    assert Image.open(output / "a.png").size == (64, 64) and Image.open(output / "a.png").mode == "RGB"
    assert Image.open(output / "b.jpg").size == (40, 24)
    assert Image.open(output / "sub" / "c.png").mode == "L"
    d = Image.open(output / "sub" / "d.png")
    assert d.mode == "RGBA" and d.size == (64, 64)
    np.testing.assert_array_equal(np.asarray(d)[:, :, 3], np.asarray(Image.linear_gradient("L").resize((64, 64))))
    assert np.asarray(Image.open(output / "done.png")).shape == (8, 8, 3)  # untouched


def test_output_matches_the_pipeline(batch_run, scuf_dir):
    from comfyui_lowlight.pipelines import SCUFPipeline
    from comfyui_lowlight.pipelines.image_io import to_integer_pixels

    source, output, _ = batch_run
    pipe = SCUFPipeline.from_pretrained(scuf_dir / "base", image_encoder=scuf_dir / "clip_tiny.pt",
                                        scuf_weights=scuf_dir / "scuf_official_tiny.pkl")
    pipe.set_progress_bar_config(disable=True)
    expected = to_integer_pixels(pipe(Image.open(source / "a.png"), output_type="np").images[0])
    written = np.asarray(Image.open(output / "a.png"))
    assert np.abs(written.astype(int) - expected.astype(int)).max() <= 1
