"""Illumination Prompt node: the HSV value map V and its inverse 1 - V, as IMAGE and as MASK."""

from ..pipelines.media.illumination import inverted_value_channel, value_channel
from .comfy_tensors import b1hw_to_mask, bchw_to_image, image_to_bchw

CATEGORY = "image/lowlight"


class IlluminationPrompt:
    DESCRIPTION = (
        "Illumination maps of an image: V = max(R, G, B) (HSV value, bright where the scene is lit) and its "
        "inverse 1 - V (bright where the scene is dark). 1 - V is the illumination-aware image prompt SCUF "
        "consumes; both are also handy masks, e.g. to brighten only the dark regions."
    )
    CATEGORY = CATEGORY
    FUNCTION = "compute"
    RETURN_TYPES = ("IMAGE", "MASK", "IMAGE", "MASK")
    RETURN_NAMES = ("value_image", "value_mask", "inverse_image", "inverse_mask")
    OUTPUT_TOOLTIPS = (
        "V = max(R, G, B) as a gray IMAGE [B, H, W, 3].",
        "V as a MASK [B, H, W] in 0..1.",
        "1 - V as a gray IMAGE: the illumination prompt (bright = dark in the input).",
        "1 - V as a MASK [B, H, W] in 0..1.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "Image or batch of frames (RGB; an alpha channel is ignored)."}),
            }
        }

    def compute(self, image):
        rgb = image_to_bchw(image)
        value, inverse = value_channel(rgb), inverted_value_channel(rgb)  # [B, 1, H, W] each
        return (bchw_to_image(value), b1hw_to_mask(value), bchw_to_image(inverse), b1hw_to_mask(inverse))
