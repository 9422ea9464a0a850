"""SGZ Enhance Video: ComfyUI's VIDEO in, VIDEO out, streamed through SGZ with deflicker (a V3 node).

The frames never sit in memory together: the source is decoded in small chunks, each frame is enhanced in order
with one video state (temporal smoothing), and the chunk is encoded at once into a new file in ComfyUI's temp
folder, which is returned as a VIDEO. Reading and writing are :mod:`..pipelines.media.video_io`'s, as for
``lowlight enhance``: every frame keeps its timestamp (frame rate, variable frame rates too), the display rotation
is kept and the first audio track is copied as is. The file appears only when complete (temp name + rename);
Cancel or an error leaves nothing behind.

This module is V3 (``comfy_api.latest``) throughout, so it is imported from the pack's ``comfy_entrypoint``
inside ComfyUI, never when the package is imported elsewhere.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from pathlib import Path

from comfy_api.latest import InputImpl, io

from ..pipelines.sgz.options import SGZ_OPTIONS, TEMPORAL_SMOOTHING, VIDEO_TEMPORAL_SMOOTHING
from .model_folders import SGZ_FOLDER, resolve_weights
from .sgz_nodes import CATEGORY, load_cached_pipeline, option_input, sgz_weights_input, weights_fingerprint

NODE_ID = "LowLightSGZEnhanceVideo"
# Frames decoded, enhanced and encoded at a time: memory stays about this many frames whatever the video's length.
CHUNK_FRAMES = 8
OUTPUT_SUFFIX = ".mp4"  # H.264 (VideoWriter) + the source's audio as is: what Save Video's "auto" keeps


# The parameter table's options, with deflicker on by default for video.
VIDEO_OPTIONS = {**SGZ_OPTIONS, TEMPORAL_SMOOTHING.name: dataclasses.replace(TEMPORAL_SMOOTHING,
                                                                             default=VIDEO_TEMPORAL_SMOOTHING)}


def _readable_source(video, scratch_dir: Path) -> tuple[Path, Path | None]:
    """A file holding exactly the frames and audio of ``video``: ``(path, scratch file to delete afterwards or None)``.

    A VIDEO loaded from a file (Load Video) is read in place. A trimmed one (Video Slice), one held in memory or
    one made from images (Create Video) is first written by its own ``save_to`` (streamed, frame by frame for
    files) into ``scratch_dir``, so that what is enhanced is what any other node would see.
    """
    source = video.get_stream_source()
    trim = video.get_active_trim_window() if hasattr(video, "get_active_trim_window") else (0.0, 0.0)
    if isinstance(source, (str, os.PathLike)) and not any(trim):
        return Path(source), None
    scratch = scratch_dir / f".lowlight_source_{uuid.uuid4().hex[:8]}.mp4"
    try:
        video.save_to(str(scratch))
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise
    return scratch, scratch


class SGZEnhanceVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE_ID,
            display_name="SGZ Enhance Video",
            category=CATEGORY,
            description=(
                "Brightens a low-light video with SGZ, frame by frame with deflicker, streamed: any length "
                "fits in memory. Keeps the frame rate and timestamps, the rotation and the audio track. "
                "Connect Load Video before it and Save Video after it."
            ),
            inputs=[
                io.Video.Input("video", tooltip="The low-light video (from Load Video, Video Slice, ...)."),
                sgz_weights_input(),
                # Built from the parameter table, in its order (saved workflows list widget values by position).
                *(option_input(option) for option in VIDEO_OPTIONS.values()),
            ],
            outputs=[io.Video.Output("video", tooltip="The enhanced video (H.264 MP4 with the source's audio).")],
        )

    @classmethod
    def fingerprint_inputs(cls, weights, **_):
        return weights_fingerprint(SGZ_FOLDER, weights)

    @classmethod
    def execute(cls, video, weights, **options) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils
        import folder_paths
        import numpy as np

        from ..pipelines.media.video_io import VideoChunk, VideoReader, VideoWriter

        pipe = load_cached_pipeline(resolve_weights(SGZ_FOLDER, weights), comfy.model_management.get_torch_device())
        temp_dir = Path(folder_paths.get_temp_directory())
        temp_dir.mkdir(parents=True, exist_ok=True)
        source_path, scratch = _readable_source(video, temp_dir)
        try:
            with VideoReader(source_path) as reader:
                stem = "video" if scratch is not None else source_path.stem
                destination = temp_dir / f"{stem}_sgz_{uuid.uuid4().hex[:8]}{OUTPUT_SUFFIX}"
                progress = comfy.utils.ProgressBar(reader.frame_count or video.get_frame_count())
                state = pipe.new_video_state()
                with VideoWriter(destination, reader) as writer:
                    for chunk in reader.chunks(CHUNK_FRAMES):
                        enhanced = []
                        for index in range(len(chunk.frames)):
                            comfy.model_management.throw_exception_if_processing_interrupted()
                            enhanced.append(pipe(chunk.frames[index : index + 1], video_state=state, **options))
                            progress.update(1)
                        writer.write(VideoChunk(np.concatenate(enhanced), chunk.pts))
        finally:
            if scratch is not None:
                scratch.unlink(missing_ok=True)
        return io.NodeOutput(InputImpl.VideoFromFile(str(destination)))
