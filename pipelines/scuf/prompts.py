"""SCUF's fixed text prompts: a light module so ComfyUI can list node defaults without importing diffusers."""

#: The paper's / official README lighten prompt (``data/unpaired_data/fixed_prompt_b.txt``).
DEFAULT_PROMPT = (
    "natural light, bright lighting, soft illumination, high light, evenly lit, clear visibility, daylight, "
    "bright atmosphere, well-lit photo."
)
#: The darken prompt (``fixed_prompt_a.txt``), for training scripts.
DARKEN_PROMPT = (
    "low light, dim lighting, low illumination, underexposed, ambient shadows, subdued light, silhouetted, "
    "dark atmosphere photo."
)
