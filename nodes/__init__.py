"""ComfyUI node adapters. Thin: the math lives in ``pipelines``."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
