"""The SGZ Enhance Video node (V3, ComfyUI's VIDEO in and out).

Unit tests of the node class with the stand-in ``comfy_api`` and the stub ``comfy`` / ``folder_paths`` modules of
tests/comfy_stubs.py (progress, interrupt, temp folder) on clips made by tests/media.py: they run on a plain clone.
Then the same class on ComfyUI's own ``comfy_api`` (the host's source, for the real VIDEO classes: trimmed,
in-memory and generated videos, and ComfyUI reading the result). The last test runs the shipped template's API
twin in the real ComfyUI 0.33 server (tests/comfy_host.py) on the bundled sample clip.
"""

from __future__ import annotations

import io
import json
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from comfy_host import REPO_ROOT, ensure_host, history_error
from comfy_stubs import StubProgressBar, install_comfy_stubs, node_outputs
from comfyui_lowlight.nodes import sgz_video
from comfyui_lowlight.nodes.example_inputs import EXAMPLE_INPUTS
from media import dark_clip_frames, decoded_pts_and_frames, write_video

TEMPLATE_API = REPO_ROOT / "example_workflows" / "api" / "04_sgz_video.json"
SHIPPED_CHOICE = "lora_weights/sgz_lowlight.safetensors"
# What the real comfy_api brings along (and the node modules built on it), swapped in and out by `real_comfy`.
HOST_MODULES = ("comfy", "comfy_api", "comfy_execution", "folder_paths", "comfyui_version", "node_helpers", "server",
                "app", "utils", "protocol", "latent_preview")


@pytest.fixture
def comfy(monkeypatch, tmp_path):
    """Stub ``comfy.*`` and ``folder_paths`` with a temp folder ``tmp_path/temp`` (created by the node)."""
    stubs = install_comfy_stubs(monkeypatch, tmp_path / "models", folders=("sgz",))
    stubs.temp_dir = tmp_path / "temp"
    stubs.folder_paths.get_temp_directory = lambda: str(stubs.temp_dir)
    return stubs


def run_node(node_class, video, **options):
    """``execute`` with the template's settings; returns the output VIDEO."""
    settings = dict(weights=SHIPPED_CHOICE, recurrences=8, downscale=12, strength=1.0, temporal_smoothing=0.8)
    settings.update(options)
    (result,) = node_outputs(node_class.execute(video=video, **settings))
    return result


def output_path(result) -> Path:
    return Path(result.get_stream_source())


def stream_facts(path: Path) -> dict:
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        audio = container.streams.audio[0] if container.streams.audio else None
        facts = {
            "frames": sum(1 for _ in container.decode(video=0)),
            "rate": video.average_rate,
            "size": (video.codec_context.width, video.codec_context.height),
            "audio_codec": audio.codec_context.name if audio else None,
        }
        container.seek(0)
        facts["audio_seconds"] = sum(
            packet.duration * packet.time_base for packet in container.demux(audio) if packet.duration
        ) if audio else 0
    return facts


@pytest.fixture(scope="module")
def night_clip(tmp_path_factory) -> Path:
    """12 dark 64x48 frames at 24 fps, variable frame rate (irregular timestamps), with an AAC track."""
    path = tmp_path_factory.mktemp("clips") / "night.mp4"
    gains = [1.0, 1.3, 0.8, 1.2, 1.0, 0.9, 1.1, 1.0, 1.3, 0.8, 1.0, 1.0]  # flicker for the deflicker to steady
    return write_video(path, dark_clip_frames(12, 48, 64, gains), irregular_timestamps=True, with_audio=True)


@pytest.fixture(scope="module")
def steady_clip(tmp_path_factory) -> Path:
    """12 dark 64x48 frames at a constant 24 fps, with an AAC track."""
    path = tmp_path_factory.mktemp("clips") / "steady.mp4"
    return write_video(path, dark_clip_frames(12, 48, 64, seed=3), with_audio=True)


def file_video(path: Path):
    return sgz_video.InputImpl.VideoFromFile(str(path))


# --------------------------------------------------------------------------- stand-in comfy_api (plain clone)


def test_inputs_come_from_the_sgz_table_with_deflicker_on_for_video():
    from comfyui_lowlight.pipelines.sgz.options import SGZ_OPTIONS, VIDEO_TEMPORAL_SMOOTHING

    schema = sgz_video.SGZEnhanceVideo.define_schema()
    assert schema.node_id == "LowLightSGZEnhanceVideo" and schema.category == "image/lowlight"
    sections = sgz_video.SGZEnhanceVideo.INPUT_TYPES()
    required = {**sections["required"], **sections["optional"]}  # the table's options are optional widgets
    assert list(required) == ["video", "weights", *SGZ_OPTIONS]  # widget order = the table's (saved workflows)
    assert required["video"][0] == "VIDEO" and [out.get_io_type() for out in schema.outputs] == ["VIDEO"]
    assert required["weights"][1]["options"][0] == SHIPPED_CHOICE
    for name, option in SGZ_OPTIONS.items():
        spec = required[name][1]
        assert (spec["min"], spec["max"], spec["step"], spec["tooltip"]) == (option.min, option.max, option.step,
                                                                              option.help)
        assert spec["default"] == (VIDEO_TEMPORAL_SMOOTHING if name == "temporal_smoothing" else option.default)
    assert VIDEO_TEMPORAL_SMOOTHING > 0  # deflicker on by default for video
    assert all(spec[1]["tooltip"] for spec in required.values()) and schema.outputs[0].tooltip


def test_node_is_registered_with_the_pack():
    from comfyui_lowlight.nodes import node_classes

    assert sgz_video.SGZEnhanceVideo in node_classes()


def test_enhances_every_frame_keeping_timestamps_rate_and_audio(comfy, night_clip):
    from comfyui_lowlight.pipelines.sgz.pipeline import SGZPipeline

    result = run_node(sgz_video.SGZEnhanceVideo, file_video(night_clip))
    path = output_path(result)
    assert path.parent == comfy.temp_dir and path.suffix == ".mp4"
    assert sorted(p.name for p in comfy.temp_dir.iterdir()) == [path.name]  # no scratch or partial file

    source, enhanced = decoded_pts_and_frames(night_clip), decoded_pts_and_frames(path)
    assert [pts for pts, _ in enhanced] == [pts for pts, _ in source]  # every frame, its own (VFR) timestamp
    before, after = stream_facts(night_clip), stream_facts(path)
    assert after["size"] == before["size"]
    # Same timestamps; the container's average rate of a VFR clip also counts the last frame's duration.
    assert abs(after["rate"] / before["rate"] - 1) < 0.01
    assert after["audio_codec"] == before["audio_codec"] == "aac"
    assert abs(after["audio_seconds"] - before["audio_seconds"]) < Fraction(1, 20)

    # What SGZPipeline gives for the decoded frames in order with one video state (H.264 re-encoding apart).
    pipe = SGZPipeline.from_pretrained(REPO_ROOT / SHIPPED_CHOICE)
    state = pipe.new_video_state()
    expected = [pipe(frame[None], temporal_smoothing=0.8, video_state=state)[0] for _, frame in source]
    for (_, got), want, (_, original) in zip(enhanced, expected, source):
        assert got.mean() > original.mean() + 20
        assert abs(got.mean() - want.mean()) < 2.0  # the deflickered brightness of this very frame
        assert np.abs(got.astype(float) - want).mean() < 5.0

    (bar,) = StubProgressBar.instances
    assert bar.total == bar.current == len(source)  # one step per frame
    assert comfy.calls["interrupt_checks"] == len(source)  # Cancel is looked at before every frame


def test_deflicker_steadies_the_output_brightness(comfy, night_clip):
    def brightness_jumps(result):
        means = np.array([frame.mean() for _, frame in decoded_pts_and_frames(output_path(result))])
        return np.abs(np.diff(means)).mean()

    steady = run_node(sgz_video.SGZEnhanceVideo, file_video(night_clip))
    independent = run_node(sgz_video.SGZEnhanceVideo, file_video(night_clip), temporal_smoothing=0.0)
    assert brightness_jumps(steady) < 0.7 * brightness_jumps(independent)


def test_cancel_stops_and_leaves_no_file(comfy, night_clip):
    comfy.calls["interrupt_after"] = 5
    with pytest.raises(RuntimeError, match="interrupted"):
        run_node(sgz_video.SGZEnhanceVideo, file_video(night_clip))
    assert StubProgressBar.instances[0].current == 5
    assert list(comfy.temp_dir.iterdir()) == []  # neither the partial output nor anything else
    comfy.calls["interrupt_after"] = None
    assert stream_facts(output_path(run_node(sgz_video.SGZEnhanceVideo, file_video(night_clip))))["frames"] == 12


def test_streams_one_frame_at_a_time(comfy, night_clip, monkeypatch):
    """Frames go through the pipeline one by one in order while the file is decoded in chunks: memory is a few
    frames whatever the length (the VIDEO's all-frames-in-memory view, get_components, does not exist here)."""
    from comfyui_lowlight.pipelines.media.video_io import VideoReader
    from comfyui_lowlight.pipelines.sgz.pipeline import SGZPipeline

    batch_sizes, chunk_sizes = [], []
    original_call, original_chunks = SGZPipeline.__call__, VideoReader.chunks
    monkeypatch.setattr(SGZPipeline, "__call__",
                        lambda self, images, **kw: batch_sizes.append(len(images)) or original_call(self, images, **kw))

    def chunks(self, *args, **kwargs):
        for chunk in original_chunks(self, *args, **kwargs):
            chunk_sizes.append(len(chunk.frames))
            yield chunk

    monkeypatch.setattr(VideoReader, "chunks", chunks)
    run_node(sgz_video.SGZEnhanceVideo, file_video(night_clip))
    assert batch_sizes == [1] * 12
    assert chunk_sizes == [sgz_video.CHUNK_FRAMES, 12 - sgz_video.CHUNK_FRAMES]


def test_display_rotation_is_kept(comfy, tmp_path):
    clip = write_video(tmp_path / "portrait.mp4", dark_clip_frames(4, 32, 48), rotation=90)
    result = run_node(sgz_video.SGZEnhanceVideo, file_video(clip))
    with av.open(str(clip)) as before, av.open(str(output_path(result))) as after:
        rotations = [next(container.decode(video=0)).rotation for container in (before, after)]
    assert rotations[0] != 0 and rotations[1] == rotations[0]


def test_missing_weights_name_the_file_and_folders(comfy, night_clip):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        run_node(sgz_video.SGZEnhanceVideo, file_video(night_clip), weights="nope.safetensors")
    assert not comfy.temp_dir.exists() or list(comfy.temp_dir.iterdir()) == []


# ------------------------------------------------------------------------------- ComfyUI's own comfy_api


@pytest.fixture(scope="module")
def real_comfy():
    """ComfyUI's ``comfy_api.latest`` (imported from the host's source) with the pack's node modules built on it,
    in place of the stand-in; everything is put back afterwards."""
    host = ensure_host()

    def swapped(name):
        return name.split(".")[0] in HOST_MODULES or name.startswith("comfyui_lowlight.nodes")

    import comfyui_lowlight

    saved = {name: module for name, module in sys.modules.items() if swapped(name)}
    saved_nodes_attribute = getattr(comfyui_lowlight, "nodes", None)
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(host.comfy_dir))
    try:
        from comfy_api.latest import InputImpl

        from comfyui_lowlight.nodes import sgz_video as real_module

        yield type("RealComfy", (), {"InputImpl": InputImpl, "node": real_module.SGZEnhanceVideo})
    finally:
        sys.path.remove(str(host.comfy_dir))
        for name in [name for name in sys.modules if swapped(name)]:
            del sys.modules[name]
        sys.modules.update(saved)
        if saved_nodes_attribute is not None:
            comfyui_lowlight.nodes = saved_nodes_attribute


def test_comfyui_reads_the_result_as_a_video_with_frames_rate_and_audio(real_comfy, comfy, steady_clip):
    source = real_comfy.InputImpl.VideoFromFile(str(steady_clip))
    result = run_node(real_comfy.node, source)
    assert isinstance(result, real_comfy.InputImpl.VideoFromFile)
    before, after = source.get_components(), result.get_components()
    assert after.images.shape == before.images.shape == (12, 48, 64, 3)
    assert after.frame_rate == before.frame_rate == 24
    assert after.audio is not None and after.audio["sample_rate"] == before.audio["sample_rate"]
    assert abs(after.audio["waveform"].shape[-1] - before.audio["waveform"].shape[-1]) < 0.05 * 44100
    assert after.images.mean() > before.images.mean() + 0.08


@pytest.mark.parametrize("kind", ["in memory", "trimmed", "from images"])
def test_other_video_sources_give_what_comfyui_sees_in_them(real_comfy, comfy, steady_clip, kind):
    """A VIDEO held in memory (BytesIO), trimmed by Video Slice, or made by Create Video: the node enhances
    exactly the frames and audio ComfyUI's own reader finds in it, and its scratch copy is removed."""
    impl = real_comfy.InputImpl
    if kind == "in memory":
        video = impl.VideoFromFile(io.BytesIO(steady_clip.read_bytes()))
    elif kind == "trimmed":
        video = impl.VideoFromFile(str(steady_clip)).as_trimmed(start_time=0.1, duration=0.25, strict_duration=False)
    else:
        video = impl.VideoFromComponents(impl.VideoFromFile(str(steady_clip)).get_components())
    expected = video.get_components()
    result = run_node(real_comfy.node, video)
    got = result.get_components()
    assert got.images.shape == expected.images.shape
    assert 0 < got.images.shape[0] <= 12
    # (A trimmed VIDEO is first written by ComfyUI's own save_to, whose short file averages to ~24.4 fps.)
    assert abs(got.frame_rate / expected.frame_rate - 1) < 0.03
    assert (got.audio is None) == (expected.audio is None) and got.audio is not None
    assert got.images.mean() > expected.images.mean() + 0.08
    assert [p.name for p in comfy.temp_dir.iterdir()] == [output_path(result).name]


# ---------------------------------------------------------------------------------------- real ComfyUI 0.33


def test_template_api_twin_runs_in_comfyui_and_keeps_frames_rate_and_audio(comfy_server):
    """Load Video (the bundled night clip the pack copied into input/) -> SGZ Enhance Video -> Save Video, as
    shipped, in the real server."""
    graph = json.loads(TEMPLATE_API.read_text())
    (load,) = [node for node in graph.values() if node["class_type"] == "LoadVideo"]
    sample = EXAMPLE_INPUTS[load["inputs"]["file"]]
    assert (comfy_server.input_dir / load["inputs"]["file"]).read_bytes() == sample.read_bytes()

    entry = comfy_server.run(graph)
    assert entry["status"]["status_str"] == "success", history_error(entry)
    (saved,) = [path for paths in comfy_server.output_files(entry).values() for path in paths]
    before, after = stream_facts(sample), stream_facts(saved)
    assert after["frames"] == before["frames"] == 48
    assert after["rate"] == before["rate"] == 24
    assert after["size"] == before["size"]
    assert after["audio_codec"] == "aac" and abs(after["audio_seconds"] - before["audio_seconds"]) < Fraction(1, 20)
    source_mean = np.mean([frame.mean() for _, frame in decoded_pts_and_frames(sample)])
    output_mean = np.mean([frame.mean() for _, frame in decoded_pts_and_frames(saved)])
    assert output_mean > source_mean + 30, (output_mean, source_mean)
