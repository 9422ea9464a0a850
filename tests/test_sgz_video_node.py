"""The SGZ Enhance Video node (V3, ComfyUI's VIDEO in and out).

Unit tests: the node class with ComfyUI's own ``comfy_api`` (the host's source, for the real VIDEO classes and
schema) and the stub ``comfy`` / ``folder_paths`` modules of tests/comfy_stubs.py (progress, interrupt, temp
folder), on clips made by tests/media.py. The last test runs the shipped template's API twin in the real
ComfyUI 0.33 server (tests/comfy_host.py) on the bundled sample clip.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from comfy_host import REPO_ROOT, ensure_host, history_error
from comfy_stubs import StubProgressBar, install_comfy_stubs
from media import dark_clip_frames, decoded_pts_and_frames, write_video

TEMPLATE = REPO_ROOT / "example_workflows" / "sgz_video_enhance.json"
TEMPLATE_API = REPO_ROOT / "example_workflows" / "api" / "sgz_video_enhance.json"
SAMPLE_CLIP = REPO_ROOT / "assets" / "night_clip.mp4"
SHIPPED_CHOICE = "lora_weights/sgz_lowlight.safetensors"
HOST_PACKAGES = ("comfy", "comfy_api", "comfy_execution", "folder_paths", "comfyui_version", "node_helpers",
                 "comfyui_lowlight.nodes.sgz_video")


@pytest.fixture(scope="module")
def v3():
    """ComfyUI's ``comfy_api.latest`` (imported from the host's source) and the node module built on it.

    Everything this imports is dropped from ``sys.modules`` afterwards, so other tests see no ComfyUI.
    """
    host = ensure_host()
    import comfyui_lowlight.nodes  # noqa: F401  (the classic mappings, imported as outside ComfyUI)

    before = set(sys.modules)
    sys.path.insert(0, str(host.comfy_dir))
    try:
        from comfy_api.latest import InputImpl, io as comfy_io

        from comfyui_lowlight.nodes import sgz_video

        yield type("V3", (), {"io": comfy_io, "InputImpl": InputImpl, "node": sgz_video.SGZEnhanceVideo,
                              "module": sgz_video})
    finally:
        sys.path.remove(str(host.comfy_dir))
        for name in set(sys.modules) - before:
            if name.split(".")[0] in HOST_PACKAGES or name in HOST_PACKAGES:
                del sys.modules[name]


@pytest.fixture
def comfy(monkeypatch, tmp_path, v3):
    """Stub ``comfy.*`` and ``folder_paths`` with a temp folder ``tmp_path/temp`` (created by the node)."""
    stubs = install_comfy_stubs(monkeypatch, tmp_path / "models", folders=("sgz",))
    stubs.temp_dir = tmp_path / "temp"
    stubs.folder_paths.get_temp_directory = lambda: str(stubs.temp_dir)
    return stubs


def run_node(v3, video, **options):
    settings = dict(weights=SHIPPED_CHOICE, recurrences=8, downscale=12, strength=1.0, temporal_smoothing=0.8)
    settings.update(options)
    output = v3.node.execute(video=video, **settings)
    (result,) = output.result
    return result


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


def test_schema_comes_from_the_sgz_table_with_the_video_smoothing_default(v3):
    from comfyui_lowlight.pipelines.sgz.options import SGZ_OPTIONS, VIDEO_TEMPORAL_SMOOTHING

    schema = v3.node.GET_SCHEMA()
    assert schema.node_id == "LowLightSGZEnhanceVideo"
    assert schema.category == "image/lowlight"
    names = [item.id for item in schema.inputs]
    assert names == ["video", "weights", *SGZ_OPTIONS]  # widget order = the table's (saved workflows)
    by_name = {item.id: item for item in schema.inputs}
    assert by_name["video"].get_io_type() == "VIDEO" and schema.outputs[0].get_io_type() == "VIDEO"
    assert by_name["weights"].options[0] == SHIPPED_CHOICE
    for name, option in SGZ_OPTIONS.items():
        widget = by_name[name]
        assert (widget.min, widget.max, widget.step, widget.tooltip) == (option.min, option.max, option.step, option.help)
        expected = VIDEO_TEMPORAL_SMOOTHING if name == "temporal_smoothing" else option.default
        assert widget.default == expected, name
    assert VIDEO_TEMPORAL_SMOOTHING > 0  # deflicker on by default for video
    assert all(item.tooltip for item in [*schema.inputs, *schema.outputs])


def test_enhances_every_frame_keeping_timestamps_rate_and_audio(v3, comfy, night_clip):
    from comfyui_lowlight.pipelines.sgz.pipeline import SGZPipeline

    result = run_node(v3, v3.InputImpl.VideoFromFile(str(night_clip)))
    assert isinstance(result, v3.InputImpl.VideoFromFile)
    output_path = Path(result.get_stream_source())
    assert output_path.parent == comfy.temp_dir and output_path.suffix == ".mp4"
    assert sorted(p.name for p in comfy.temp_dir.iterdir()) == [output_path.name]  # no scratch or partial file

    source, enhanced = decoded_pts_and_frames(night_clip), decoded_pts_and_frames(output_path)
    assert [pts for pts, _ in enhanced] == [pts for pts, _ in source]  # every frame, its own (VFR) timestamp
    before, after = stream_facts(night_clip), stream_facts(output_path)
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

    # ComfyUI itself reads the result as a VIDEO with the same frame count, rate and audio.
    components = result.get_components()
    assert components.images.shape == (len(source), 48, 64, 3)
    assert components.frame_rate == after["rate"] and components.audio is not None

    (bar,) = StubProgressBar.instances
    assert bar.total == bar.current == len(source)  # one step per frame
    assert comfy.calls["interrupt_checks"] == len(source)  # Cancel is looked at before every frame


def test_deflicker_steadies_the_output_brightness(v3, comfy, night_clip):
    def brightness_jumps(path):
        means = np.array([frame.mean() for _, frame in decoded_pts_and_frames(path)])
        return np.abs(np.diff(means)).mean()

    steady = Path(run_node(v3, v3.InputImpl.VideoFromFile(str(night_clip))).get_stream_source())
    independent = Path(run_node(v3, v3.InputImpl.VideoFromFile(str(night_clip)), temporal_smoothing=0.0)
                       .get_stream_source())
    assert brightness_jumps(steady) < 0.7 * brightness_jumps(independent)


def test_cancel_stops_and_leaves_no_file(v3, comfy, night_clip):
    comfy.calls["interrupt_after"] = 5
    with pytest.raises(RuntimeError, match="interrupted"):
        run_node(v3, v3.InputImpl.VideoFromFile(str(night_clip)))
    assert StubProgressBar.instances[0].current == 5
    assert list(comfy.temp_dir.iterdir()) == []  # neither the partial output nor anything else
    comfy.calls["interrupt_after"] = None
    assert run_node(v3, v3.InputImpl.VideoFromFile(str(night_clip))).get_frame_count() == 12


def test_never_holds_the_whole_video(v3, comfy, night_clip, monkeypatch):
    """The frames are streamed from the file: the VIDEO's all-frames-in-memory view is never asked for, and the
    pipeline sees one frame at a time."""
    video = v3.InputImpl.VideoFromFile(str(night_clip))
    monkeypatch.setattr(video, "get_components", lambda: pytest.fail("the whole video was decoded into memory"))
    from comfyui_lowlight.pipelines.sgz.pipeline import SGZPipeline

    batch_sizes = []
    original_call = SGZPipeline.__call__
    monkeypatch.setattr(SGZPipeline, "__call__",
                        lambda self, images, **kw: batch_sizes.append(len(images)) or original_call(self, images, **kw))
    assert run_node(v3, video).get_frame_count() == 12
    assert batch_sizes == [1] * 12


@pytest.mark.parametrize("kind", ["in memory", "trimmed", "from images"])
def test_other_video_sources_give_what_comfyui_sees_in_them(v3, comfy, steady_clip, kind):
    """A VIDEO held in memory (BytesIO), trimmed by Video Slice, or made by Create Video: the node enhances
    exactly the frames and audio ComfyUI's own reader finds in it, and its scratch copy is removed."""
    if kind == "in memory":
        video = v3.InputImpl.VideoFromFile(io.BytesIO(steady_clip.read_bytes()))
    elif kind == "trimmed":
        video = v3.InputImpl.VideoFromFile(str(steady_clip)).as_trimmed(start_time=0.1, duration=0.25,
                                                                         strict_duration=False)
    else:
        components = v3.InputImpl.VideoFromFile(str(steady_clip)).get_components()
        video = v3.InputImpl.VideoFromComponents(components)
    expected = video.get_components()
    result = run_node(v3, video)
    got = result.get_components()
    assert got.images.shape == expected.images.shape
    assert 0 < got.images.shape[0] <= 12
    # (A trimmed VIDEO is first written by ComfyUI's own save_to, whose short file averages to ~24.4 fps.)
    assert abs(got.frame_rate / expected.frame_rate - 1) < 0.03
    assert (got.audio is None) == (expected.audio is None) and got.audio is not None
    assert got.images.mean() > expected.images.mean() + 0.08
    assert [p.name for p in comfy.temp_dir.iterdir()] == [Path(result.get_stream_source()).name]


def test_display_rotation_is_kept(v3, comfy, tmp_path):
    clip = write_video(tmp_path / "portrait.mp4", dark_clip_frames(4, 32, 48), rotation=90)
    result = run_node(v3, v3.InputImpl.VideoFromFile(str(clip)))
    source, output = v3.InputImpl.VideoFromFile(str(clip)).get_components(), result.get_components()
    assert output.images.shape == source.images.shape == (4, 48, 32, 3)  # ComfyUI applies the rotation to both


def test_missing_weights_name_the_file_and_folders(v3, comfy, night_clip):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        run_node(v3, v3.InputImpl.VideoFromFile(str(night_clip)), weights="nope.safetensors")
    assert not comfy.temp_dir.exists() or list(comfy.temp_dir.iterdir()) == []


# ---------------------------------------------------------------------------------------- real ComfyUI 0.33


def test_template_api_twin_runs_in_comfyui_and_keeps_frames_rate_and_audio(comfy_server):
    """Load Video (the bundled night clip) -> SGZ Enhance Video -> Save Video, as shipped, in the real server."""
    graph = json.loads(TEMPLATE_API.read_text())
    (load,) = [node for node in graph.values() if node["class_type"] == "LoadVideo"]
    name = load["inputs"]["file"]
    assert name == SAMPLE_CLIP.name
    if not (comfy_server.input_dir / name).exists():  # what the pack's first start copies, if that has not run
        shutil.copyfile(SAMPLE_CLIP, comfy_server.input_dir / name)

    entry = comfy_server.run(graph)
    assert entry["status"]["status_str"] == "success", history_error(entry)
    (saved,) = [path for paths in comfy_server.output_files(entry).values() for path in paths]
    before, after = stream_facts(SAMPLE_CLIP), stream_facts(saved)
    assert after["frames"] == before["frames"] == 48
    assert after["rate"] == before["rate"] == 24
    assert after["size"] == before["size"]
    assert after["audio_codec"] == "aac" and abs(after["audio_seconds"] - before["audio_seconds"]) < Fraction(1, 20)
    source_mean = np.mean([frame.mean() for _, frame in decoded_pts_and_frames(SAMPLE_CLIP)])
    output_mean = np.mean([frame.mean() for _, frame in decoded_pts_and_frames(saved)])
    assert output_mean > source_mean + 30, (output_mean, source_mean)
