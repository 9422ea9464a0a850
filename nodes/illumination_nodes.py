"""Illumination Prompt node: the HSV value map V and its inverse 1 - V, as IMAGE and as MASK."""

from comfy_api.latest import io

from ..pipelines.media.illumination import inverted_value_channel, value_channel
from .comfy_tensors import b1hw_to_mask, bchw_to_image, image_to_bchw

CATEGORY = "image/lowlight"


class IlluminationPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LowLightIlluminationPrompt",
            display_name="Illumination Prompt",
            category=CATEGORY,
            description=(
                "Illumination maps of an image: V = max(R, G, B) (HSV value, bright where the scene is lit) and its "
                "inverse 1 - V (bright where the scene is dark). 1 - V is the illumination-aware image prompt SCUF "
                "consumes; both are also handy masks, e.g. to brighten only the dark regions."
            ),
            inputs=[
                io.Image.Input("image", tooltip="Image or batch of frames (RGB; an alpha channel is ignored)."),
            ],
            outputs=[
                io.Image.Output("value_image", display_name="value_image",
                                tooltip="V = max(R, G, B) as a gray IMAGE [B, H, W, 3]."),
                io.Mask.Output("value_mask", display_name="value_mask", tooltip="V as a MASK [B, H, W] in 0..1."),
                io.Image.Output("inverse_image", display_name="inverse_image",
                                tooltip="1 - V as a gray IMAGE: the illumination prompt (bright = dark in the input)."),
                io.Mask.Output("inverse_mask", display_name="inverse_mask",
                               tooltip="1 - V as a MASK [B, H, W] in 0..1."),
            ],
        )

    @classmethod
    def execute(cls, image) -> io.NodeOutput:
        rgb = image_to_bchw(image)
        value, inverse = value_channel(rgb), inverted_value_channel(rgb)  # [B, 1, H, W] each
        return io.NodeOutput(bchw_to_image(value), b1hw_to_mask(value), bchw_to_image(inverse), b1hw_to_mask(inverse))
