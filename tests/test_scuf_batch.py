"""``lowlight enhance --method scuf`` under ``accelerate launch`` with 2 CPU processes on a folder of images (the tiny SCUF model of
tests/tiny_scuf.py)."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tiny_scuf import tiny_scuf  # noqa: F401  session fixture: the tiny SCUF model (no ../shared needed)


@pytest.fixture(scope="module")
def scuf(tiny_scuf):  # noqa: F811
    return tiny_scuf


@pytest.fixture(scope="module")
def batch_run(tmp_path_factory, scuf):
    root = tmp_path_factory.mktemp("scuf_batch")
    source, output = root / "in", root / "out"
    (source / "sub").mkdir(parents=True)
    output.mkdir()
    image = scuf.image("img64x64")
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
        "-m", "comfyui_lowlight", "enhance", "--method", "scuf", "--base", str(scuf.base),
        "--image-encoder", str(scuf.clip), "--scuf-weights", str(scuf.official), str(source), "--output", str(output),
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


def test_output_matches_the_pipeline(batch_run, scuf):
    from comfyui_lowlight.pipelines.media.image_io import to_integer_pixels

    source, output, _ = batch_run
    pipe = scuf.pipeline()
    expected = to_integer_pixels(pipe(Image.open(source / "a.png"), output_type="np").images[0])
    written = np.asarray(Image.open(output / "a.png"))
    assert np.abs(written.astype(int) - expected.astype(int)).max() <= 1
