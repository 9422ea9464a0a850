"""SCUFPipeline: one-step SD-Turbo low-light enhancement with SCUF's illumination-aware image prompt (ICCV 2025).

Computes what the official GEFU ``src/inference.py`` computes (direction a2b), step by step as described in the
conformance fixture ``../shared/reference/scuf/README.md`` section 8:

1. resize to a multiple of 8 (PIL LANCZOS, like the official code); network input ``x = 2 * img - 1``;
2. illumination prompt ``1 - V`` (V = max(R, G, B)) -> CLIP image embedding (no resize/mean-std/positional
   embedding, L2-normalised) -> projector -> 4 tokens appended to the text embedding of the prompt;
3. VAE encoder (with LoRA) keeping the skip activations; latent = posterior mean (default) or a sample, x 0.18215;
4. one UNet step at timestep 999 with the cycle-attention adapter; x0 = (z - sqrt(1 - a) eps) / sqrt(a)
   (steps 3-5: :func:`~.scuf_modules.scuf_one_step`, which training uses too);
5. VAE decoder with the skip convs, clamp to -1..1, ``out * 0.5 + 0.5``, resized back to the input size.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.loaders import FromSingleFileMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from .clip_encoder import clip_image_embedding, load_clip_image_encoder
from ..media.illumination import inverted_value_channel
from ..media.image_convert import OUTPUT_TYPES, postprocess_image, prepare_illumination, prepare_image, split_images
from .modules import (
    ImagePromptProjector,
    SCUFConfig,
    add_cycle_attn_processors,
    add_scuf_vae_modules,
    cycle_attn_processors,
    has_scuf_vae_modules,
    run_offload_hook,
    scuf_config_from_modules,
    scuf_one_step,
    set_adapter_scale,
)
from .weights import (
    SCUFWeightsError,
    SCUFWeightsFile,
    check_compatible,
    copy_into,
    read_scuf_weights,
    save_scuf_file,
    scuf_parameters,
    shipped_config_dir,
)

from .options import ADAPTER_SCALE, SAMPLE_LATENT, TILE_OVERLAP, TILE_SIZE, check_tiling_options
from .prompts import DEFAULT_PROMPT

SCUF_WEIGHTS_NAME = "scuf_weights.safetensors"
#: A base model path with one of these endings is a single-file checkpoint (anything else: a folder or hub id).
CHECKPOINT_EXTENSIONS = (".safetensors", ".ckpt")
BASE_MODEL_ID = "stabilityai/sd-turbo"
CLIP_MODEL_ID = "openai/clip-vit-base-patch32"
BASE_MODEL_HELP = (
    f"Download the SD-Turbo base model: `huggingface-cli download {BASE_MODEL_ID}` (diffusers folder, use "
    f"SCUFPipeline.from_pretrained('{BASE_MODEL_ID}' or that folder)), or the single file sd_turbo.safetensors "
    "from the same repository into ComfyUI's models/checkpoints/ folder and use SCUFPipeline.from_single_file(path)."
)
#: SCUF's VAE and UNet need sides that are multiples of 8: images are resized up to them and back (LANCZOS).
RESIZE_MULTIPLE = 8
#: Text embeddings kept between calls (distinct prompts; [1, 77, 1024] each).
TEXT_CACHE_SIZE = 16


# ---------------------------------------------------------------------------------------------- pipeline


class SCUFPipeline(DiffusionPipeline, FromSingleFileMixin):
    r"""SCUF low-light enhancement: SD-Turbo in one step, lightened by the illumination-aware image prompt.

    Components: ``vae`` (``AutoencoderKL``; SCUF skip convs + LoRA are added to it when weights are loaded),
    ``text_encoder``/``tokenizer`` (CLIP text), ``unet`` (``UNet2DConditionModel``; cross-attention layers get
    :class:`~.scuf_modules.CycleAttnProcessor`), ``scheduler`` (SD-Turbo's; only its ``alphas_cumprod`` and
    ``num_train_timesteps`` are used), ``image_encoder`` (CLIP ViT-B/32 ``CLIPVisionModelWithProjection``) and
    ``image_proj`` (:class:`~.scuf_modules.ImagePromptProjector`, created when weights are loaded).

    Load: ``SCUFPipeline.from_path(base, dtype=..., image_encoder=..., scuf_weights=...)`` for a diffusers folder,
    hub id or single-file checkpoint (it applies the precision rules), or :meth:`from_pretrained` /
    :meth:`from_single_file` directly; attach SCUF weights with :meth:`load_scuf_weights` (at load or later).
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->image_proj->unet->vae"
    _optional_components = ["image_proj"]

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, image_encoder, image_proj=None):
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            image_encoder=image_encoder, image_proj=image_proj,
        )
        # set when SCUF modules are attached (also when built from the components of a SCUF pipeline)
        self.scuf_config: SCUFConfig | None = scuf_config_from_modules(vae, unet, image_proj)
        self._tiling: dict[str, int] | None = None  # set by enable_vae_tiling()
        self._cpu_vae: tuple | None = None  # (fingerprint of self.vae, its inference copy) for CPU runs
        self._text_cache: dict = {}  # prompt -> text embedding, see _text_embedding

    # ---------------------------------------------------------------------------------- loading

    @staticmethod
    def _resolve_image_encoder(kwargs: dict, required: bool) -> None:
        source = kwargs.get("image_encoder")
        if source is None:
            if required:
                raise ValueError(
                    "image_encoder is required: pass a transformers CLIPVisionModelWithProjection, a hub id/folder "
                    f"('{CLIP_MODEL_ID}') or an OpenAI CLIP ViT-B/32 state-dict file"
                )
            return
        kwargs["image_encoder"] = load_clip_image_encoder(source, local_files_only=kwargs.get("local_files_only"))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, scuf_weights=None, **kwargs):
        """Load SD-Turbo (hub id or diffusers folder) + CLIP image encoder (+ SCUF weights).

        Args:
            pretrained_model_name_or_path: ``"stabilityai/sd-turbo"``, a local copy, or a folder written by
                :meth:`save_pretrained` (its ``scuf_weights.safetensors`` is loaded automatically).
            scuf_weights: optional path (ours or the official checkpoint), see :meth:`load_scuf_weights`.
            image_encoder: model, hub id/folder or OpenAI-format file (required unless the folder has one).
            **kwargs: forwarded to ``DiffusionPipeline.from_pretrained`` (``torch_dtype``, ``local_files_only``...).
        """
        path = os.fspath(pretrained_model_name_or_path)
        looks_local = os.path.isabs(path) or path.startswith(".") or path.count("/") != 1 or os.path.exists(path)
        if looks_local and not os.path.isdir(path):
            raise FileNotFoundError(f"SD-Turbo base model folder not found: {path}. {BASE_MODEL_HELP}")
        has_encoder = os.path.isfile(os.path.join(path, "image_encoder", "config.json"))
        cls._resolve_image_encoder(kwargs, required=not has_encoder)
        try:
            pipe = super().from_pretrained(path, **kwargs)
        except (OSError, EnvironmentError) as exc:
            raise OSError(f"could not load the SD-Turbo base model from {path!r}: {exc}\n{BASE_MODEL_HELP}") from exc
        saved = os.path.join(path, SCUF_WEIGHTS_NAME)
        if scuf_weights is None and os.path.isfile(saved):
            scuf_weights = saved
        if scuf_weights is not None:
            pipe.load_scuf_weights(scuf_weights)
        return pipe

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path, scuf_weights=None, **kwargs):
        """Load the single-file SD-Turbo checkpoint ComfyUI users have (``models/checkpoints/sd_turbo.safetensors``).

        Works offline: the diffusers configs ship in ``pipelines/scuf/configs/sd-turbo`` (``config=`` overrides). The
        CLIP BPE vocabulary is not shipped: pass ``tokenizer=``, or it is taken from ComfyUI's bundled CLIP
        tokenizer or the local Hugging Face cache of ``stabilityai/sd-turbo`` / ``openai/clip-vit-base-patch32``.
        """
        path = os.fspath(pretrained_model_link_or_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"SD-Turbo checkpoint not found: {path}. {BASE_MODEL_HELP}")
        kwargs.setdefault("config", shipped_config_dir())
        cls._resolve_image_encoder(kwargs, required=True)
        if "tokenizer" not in kwargs:
            kwargs["tokenizer"] = find_clip_tokenizer(kwargs["config"])
        pipe = super().from_single_file(path, **kwargs)
        if scuf_weights is not None:
            pipe.load_scuf_weights(scuf_weights)
        return pipe

    @classmethod
    def from_path(cls, base, dtype: torch.dtype | None = None, image_encoder=None, scuf_weights=None,
                  local_files_only: bool | None = None, **kwargs) -> "SCUFPipeline":
        """Load SD-Turbo from wherever it is, in ``dtype``, with the precision rules applied once.

        Args:
            base: a single-file checkpoint (an existing file, or a path ending in ``.safetensors``/``.ckpt``:
                :meth:`from_single_file`), else a diffusers folder, a folder written by :meth:`save_pretrained` or a
                hub id (:meth:`from_pretrained`).
            dtype: weight precision (default float32). The CLIP image encoder follows it; under float16 the VAE
                stays float32 when its config asks for it (``force_upcast``: the SD 2.x VAE overflows in float16).
            image_encoder: model, hub id/folder or OpenAI-format file (not needed for a folder with one).
            scuf_weights: optional SCUF weights to attach (:meth:`load_scuf_weights`).
            local_files_only: for a folder or hub id: never reach the network.
            **kwargs: forwarded to the loader (``tokenizer=``, ``config=``, ...).
        """
        path = os.fspath(base)
        if dtype is not None:
            kwargs["dtype"] = dtype
        if image_encoder is not None:
            kwargs["image_encoder"] = image_encoder
        if os.path.isfile(path) or path.lower().endswith(CHECKPOINT_EXTENSIONS):
            pipe = cls.from_single_file(path, scuf_weights=scuf_weights, **kwargs)
        else:
            if local_files_only is not None:
                kwargs["local_files_only"] = local_files_only
            pipe = cls.from_pretrained(path, scuf_weights=scuf_weights, **kwargs)
        pipe.apply_precision(dtype or torch.float32)
        return pipe

    def apply_precision(self, dtype: torch.dtype) -> None:
        """The precision rules: the CLIP image encoder (built from its own file in float32) goes to ``dtype``; under
        float16 a ``force_upcast`` VAE stays float32 (SCUFPipeline runs the VAE in its own dtype)."""
        self.image_encoder.to(dtype)
        if dtype == torch.float16 and self.vae.config.get("force_upcast", False):
            self.vae.to(torch.float32)

    # ------------------------------------------------------------------------------ SCUF modules

    def init_scuf_modules(self, config: SCUFConfig | None = None, init: str = "official") -> SCUFConfig:
        """Attach fresh SCUF modules (skip convs + VAE LoRA, projector, cycle-attention processors).

        For training from scratch (``init="official"`` = the official initialisation) or before loading weights
        (``init="none"``). Trainable parameters: :meth:`scuf_trainable_parameters`.
        """
        config = config or SCUFConfig()
        if self.scuf_config is not None or has_scuf_vae_modules(self.vae) or cycle_attn_processors(self.unet):
            raise ValueError(
                "SCUF modules are already attached; load a fresh base model to change their configuration"
            )
        add_scuf_vae_modules(self.vae, config.lora_rank, config.lora_alpha, config.lora_target_modules)
        add_cycle_attn_processors(self.unet, config.num_image_tokens, init=init)
        ref = next(self.unet.parameters())
        projector = ImagePromptProjector(
            self.unet.config.cross_attention_dim, config.clip_embedding_dim, config.num_image_tokens
        ).to(ref.device)
        if ref.dtype != projector.dtype:
            projector.to(ref.dtype)
        self.register_modules(image_proj=projector)
        self.scuf_config = config
        return config

    def scuf_parameters(self) -> dict[str, torch.Tensor]:
        """``{key in our weights format: live parameter}`` of every SCUF tensor."""
        return scuf_parameters(self.vae, self.image_proj, self.unet)

    def read_scuf_weights(self, path, direction: str = "a2b") -> SCUFWeightsFile:
        """Read SCUF weights for this base model without attaching them (official adapter layers, stored by
        position, are named after this UNet's attention layers). Attach with :meth:`load_scuf_weights`."""
        layer_names = [name[: -len(".processor")] for name in self.unet.attn_processors]
        return read_scuf_weights(path, direction, layer_names)

    def load_scuf_weights(self, weights, direction: str = "a2b") -> SCUFConfig:
        """Attach SCUF weights: our ``.safetensors``, the official GEFU checkpoint (read with weights_only), or a
        :class:`~.scuf_weights.SCUFWeightsFile` from :meth:`read_scuf_weights`.

        The SCUF modules are created on first use; later calls copy into them (same configuration only).

        Args:
            weights: weights file or :class:`~.scuf_weights.SCUFWeightsFile`.
            direction: for official checkpoints, which VAE to use: ``"a2b"`` (lighten, default) or ``"b2a"``.
        Raises:
            SCUFWeightsError: unsafe/malformed file, or weights for another base model (lists keys and shapes).
        """
        if not isinstance(weights, SCUFWeightsFile):
            weights = self.read_scuf_weights(weights, direction)
        path, tensors, config, base_shapes = weights.path, weights.tensors, weights.config, weights.base_shapes
        if self.scuf_config is None:
            # check on a meta-device shadow first, so that a bad file leaves this pipeline untouched
            expected, vae_state = self._meta_expected(config)
            check_compatible(path, expected, tensors, base_shapes, vae_state)
            self.init_scuf_modules(config, init="none")
        elif self.scuf_config != config:
            raise SCUFWeightsError(
                f"{path}: SCUF configuration {config.to_json()} differs from the attached modules "
                f"{self.scuf_config.to_json()}; load a fresh base model first"
            )
        expected = self.scuf_parameters()
        check_compatible(path, expected, tensors, base_shapes, self.vae.state_dict())
        copy_into(expected, tensors)
        self._cpu_vae = None  # the CPU inference copy holds the previous weights merged
        return config

    def _meta_expected(self, config: SCUFConfig) -> tuple[dict, dict]:
        """SCUF parameters and VAE state of a weightless (meta-device) copy with modules for ``config``."""
        with torch.device("meta"):
            vae = type(self.vae).from_config(self.vae.config)
            unet = type(self.unet).from_config(self.unet.config)
            image_proj = ImagePromptProjector(
                unet.config.cross_attention_dim, config.clip_embedding_dim, config.num_image_tokens
            )
        add_scuf_vae_modules(vae, config.lora_rank, config.lora_alpha, config.lora_target_modules, skip_init=None)
        add_cycle_attn_processors(unet, config.num_image_tokens, init="none")
        return scuf_parameters(vae, image_proj, unet), vae.state_dict()

    def save_scuf_weights(self, path, direction: str = "a2b") -> None:
        """Write the SCUF tensors in our safetensors format (atomic)."""
        if self.scuf_config is None:
            raise ValueError("no SCUF modules attached: load or initialise SCUF weights first")
        save_scuf_file(path, self.scuf_parameters(), self.scuf_config, direction)

    def save_pretrained(self, save_directory, **kwargs):
        """Save the plain base components (diffusers layout) and ``scuf_weights.safetensors`` beside them."""
        from diffusers import AutoencoderKL
        from diffusers.models.attention_processor import AttnProcessor2_0

        if self.scuf_config is None:
            return super().save_pretrained(save_directory, **kwargs)
        vae, image_proj, processors = self.vae, self.image_proj, self.unet.attn_processors
        clean = {}
        for key, value in vae.state_dict().items():
            if ".lora_" in key or key.startswith("decoder.skip_conv_"):
                continue
            clean[key.replace(".base_layer.", ".")] = value
        with torch.device("meta"):
            plain_vae = AutoencoderKL.from_config(vae.config)
        plain_vae.load_state_dict(clean, assign=True, strict=True)
        try:
            self.unet.set_attn_processor(AttnProcessor2_0())
            self.register_modules(vae=plain_vae, image_proj=None)
            super().save_pretrained(save_directory, **kwargs)
        finally:
            self.unet.set_attn_processor(processors)
            self.register_modules(vae=vae, image_proj=image_proj)
        self.save_scuf_weights(os.path.join(save_directory, SCUF_WEIGHTS_NAME))

    # ----------------------------------------------------------------------------------- compute

    def encode_prompt(self, prompt: str, device) -> torch.Tensor:
        """``[1, 77, D]`` CLIP text embedding (last hidden state), official tokenisation (pad to 77)."""
        ids = self.tokenizer(
            prompt, max_length=self.tokenizer.model_max_length, padding="max_length", truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        return self.text_encoder(ids)[0]

    def encode_image_prompt(self, illumination: torch.Tensor) -> torch.Tensor:
        """``[B, 1, H, W]`` illumination prompt (0..1) -> ``[B, num_tokens, D]`` image-prompt tokens."""
        emb = clip_image_embedding(self.image_encoder, illumination.repeat(1, 3, 1, 1))
        proj_dtype = next(self.image_proj.parameters()).dtype
        return self.image_proj(emb.to(proj_dtype))

    def enable_vae_tiling(self, tile_size: int = TILE_SIZE.default, tile_overlap: int = TILE_OVERLAP.default) -> None:
        """Process images larger than ``tile_size`` in overlapping tiles (bounded memory, feathered seams).

        The whole encoder -> UNet -> decoder pass is tiled (the VAE skips and the UNet attention need it, see
        :mod:`.scuf_tiling`); the prompt conditioning is computed once for the whole image. ``tile_size`` and
        ``tile_overlap`` are pixels, multiples of 8, in the bounds of :mod:`.options` (overlap < tile_size / 2).
        """
        check_tiling_options(tile_size, tile_overlap)
        self._tiling = {"tile_size": tile_size, "tile_overlap": tile_overlap}

    def disable_vae_tiling(self) -> None:
        """Process every image in one pass again (the default)."""
        self._tiling = None

    def _conditioning(self, illum, prompts, device) -> torch.Tensor:
        """``[B, T + num_tokens, D]`` UNet context: text embedding of each prompt, then the image-prompt tokens."""
        unet_dtype = self.unet.dtype
        tokens = self.encode_image_prompt(illum.to(device))
        text = torch.cat([self._text_embedding(p, device) for p in prompts])
        return torch.cat([text.to(unet_dtype), tokens.to(unet_dtype)], dim=1)

    def _text_embedding(self, prompt: str, device) -> torch.Tensor:
        """:meth:`encode_prompt`, kept for the next calls (the same prompt is encoded on every run otherwise: 0.1-0.2 s
        of a 512 px CPU run) while the text encoder's tensors and the tokenizer stay the same. Not kept under model
        offload, whose text-encoder hook has to fire."""
        if getattr(self.text_encoder, "_hf_hook", None) is not None:
            return self.encode_prompt(prompt, device)
        from .inference_vae import tensor_state

        version = (id(self.tokenizer), str(device), tuple(tensor_state(p) for p in self.text_encoder.parameters()))
        if self._text_cache.get("version") != version:
            self._text_cache = {"version": version}
        if prompt not in self._text_cache:
            if len(self._text_cache) > TEXT_CACHE_SIZE:
                del self._text_cache[next(p for p in self._text_cache if p != "version")]
            self._text_cache[prompt] = self.encode_prompt(prompt, device)
        return self._text_cache[prompt]

    def _enhance(self, x, context, noise=None) -> torch.Tensor:
        """One pass (:func:`~.scuf_modules.scuf_one_step`): ``x`` ``[B, 3, H, W]`` in -1..1 -> float32 in 0..1.

        ``noise``: ``[B, C, H / 8, W / 8]`` standard normal for a sampled latent, or None for the posterior mean.
        """
        if x.device.type == "cpu" and x.shape[0] > 1:
            # one image at a time on the CPU: a batch is no faster there, needs less memory this way, and each image
            # gets exactly its single-image result (oneDNN blocks convs differently for another batch size)
            return torch.cat([
                self._enhance(x[i:i + 1], context[i:i + 1], None if noise is None else noise[i:i + 1])
                for i in range(x.shape[0])
            ])
        vae = self._vae_for(x.device)
        out = scuf_one_step(vae, self.unet, self.scheduler, x, context, self.scuf_config.skip_gamma, noise)
        return out.image.float() * 0.5 + 0.5

    def _vae_for(self, device: torch.device):
        """The VAE to run on ``device``: on the CPU its inference copy (:mod:`.inference_vae`: LoRA merged, decoder
        upsampling on the low-resolution grid; README "Speed and memory"), rebuilt whenever the VAE's tensors or
        LoRA settings change; on other devices the VAE itself."""
        from .inference_vae import UnsupportedVAE, inference_vae, vae_fingerprint

        if device.type != "cpu":
            self._cpu_vae = None
            return self.vae
        run_offload_hook(self.vae)  # model offload onto the CPU: the copy has no hook, the VAE's must still fire
        fingerprint = vae_fingerprint(self.vae)
        if self._cpu_vae is None or self._cpu_vae[0] != fingerprint:
            self._cpu_vae = None  # free the old copy before building the new one
            try:
                copy = inference_vae(self.vae)
            except UnsupportedVAE as exc:
                warnings.warn(f"SCUF: running the VAE as loaded on the CPU ({exc})", RuntimeWarning, stacklevel=3)
                copy = self.vae
            self._cpu_vae = (fingerprint, copy)
        return self._cpu_vae[1]

    def _use_channels_last(self) -> None:
        """UNet and VAE in channels_last: oneDNN's CPU convolutions skip their layout reorders (full-size SD-Turbo,
        512x512 bfloat16, 2 threads: 21.3 s -> 17.6 s, benchmarks/bench_scuf.py). Done once, on the first CPU run."""
        for module in (self.unet, self.vae):
            # a 1x1 kernel counts as contiguous in both layouts, so look at the wider ones
            kernels = [p for p in module.parameters() if p.dim() == 4 and p.shape[-1] > 1]
            if not all(k.is_contiguous(memory_format=torch.channels_last) for k in kernels):
                module.to(memory_format=torch.channels_last)

    def _run_group(self, images, illum, prompts, generator, sample_latent, device):
        x = (images.to(device) - 0.5) / 0.5
        if torch.device(device).type == "cpu":
            self._use_channels_last()
            x = x.contiguous(memory_format=torch.channels_last)
        context = self._conditioning(illum, prompts, device)
        noise = None
        if sample_latent:
            # drawn for the whole latent at once, so a tiled run samples the same noise as an untiled one
            b, _, h, w = x.shape
            shape = (b, self.vae.config.latent_channels, h // 8, w // 8)
            noise = randn_tensor(shape, generator=generator, device=device, dtype=next(self.vae.parameters()).dtype)
        if self._tiling is not None:
            from .tiling import tiled_enhance

            return tiled_enhance(self._enhance, x, context, noise, **self._tiling)
        return self._enhance(x, context, noise)

    @torch.no_grad()
    def __call__(
        self,
        image,
        prompt: str | list[str] | None = None,
        illumination=None,
        adapter_scale: float = ADAPTER_SCALE.default,
        generator: torch.Generator | list[torch.Generator] | None = None,
        sample_latent: bool = SAMPLE_LATENT,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        r"""Enhance low-light images.

        Args:
            image: PIL image, ``HxW[xC]`` numpy array (uint8 or float 0..1), ``[C, H, W]``/``[B, C, H, W]`` tensor
                (float 0..1 or uint8), or a list of these. Grayscale is repeated to RGB; alpha (RGBA/LA/P with
                transparency, ``HxWx4``, ``[4, H, W]``) is set aside, not enhanced, and returned unchanged (see
                ``output_type``); any size
                (resized to a multiple of 8 with LANCZOS and back, as the official code). Float values outside 0..1 and
                NaN/inf are rejected.
            prompt: text prompt, one per image or shared; default :data:`DEFAULT_PROMPT` (the paper's lighten prompt).
            illumination: the image prompt, one-channel 0..1 map(s) at input size; default ``1 - V`` of the input.
            adapter_scale: weight of the image-prompt (cycle-attention) branch; 1 = official, 0 = text only
                (bounds: :data:`~.options.ADAPTER_SCALE`).
            generator: for ``sample_latent=True``.
            sample_latent: sample the VAE posterior like the official code (default: its mean, deterministic).
            output_type: ``"pil"`` (uint8 = floor(255 x), official), ``"np"`` (float32 ``[B, H, W, 3]`` in 0..1,
                before quantisation) or ``"pt"`` (float32 ``[B, 3, H, W]``). Images of different sizes give lists.
                An input with alpha comes back with it: RGBA PIL, ``HxWx4`` or ``[4, H, W]`` (a batch mixing
                images with and without alpha gives a list).
        Returns:
            ``ImagePipelineOutput`` (or a tuple with the images if ``return_dict=False``).
        """
        if self.scuf_config is None or self.image_proj is None:
            raise RuntimeError("SCUF weights are not loaded: call pipe.load_scuf_weights(path) first")
        ADAPTER_SCALE.check(adapter_scale)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: expected 'pil', 'np' or 'pt', got {output_type!r}")
        items = split_images(image)
        if not items:
            raise ValueError("image: empty batch")
        n = len(items)
        prompts = [DEFAULT_PROMPT] * n if prompt is None else [prompt] * n if isinstance(prompt, str) else list(prompt)
        if len(prompts) != n:
            raise ValueError(f"prompt: got {len(prompts)} prompts for {n} images")
        illums = [None] * n if illumination is None else split_images(illumination)
        if len(illums) != n:
            raise ValueError(f"illumination: got {len(illums)} maps for {n} images")
        if isinstance(generator, list) and len(generator) != n:
            raise ValueError(f"generator: got {len(generator)} generators for {n} images")

        prepared, sizes, maps = [], [], []
        for i, item in enumerate(items):
            tensor, size = prepare_image(item, f"image[{i}]", RESIZE_MULTIPLE)
            prepared.append(tensor)
            sizes.append(size)
            if illums[i] is None:
                maps.append(inverted_value_channel(tensor[None])[0])
            else:
                maps.append(prepare_illumination(illums[i], tuple(tensor.shape[1:]), size, f"illumination[{i}]"))

        device = self._execution_device
        set_adapter_scale(self.unet, adapter_scale)
        outputs: list[torch.Tensor | None] = [None] * n
        groups: dict[tuple, list[int]] = {}
        for i, tensor in enumerate(prepared):
            groups.setdefault(tuple(tensor.shape), []).append(i)
        for indices in groups.values():
            gen = [generator[i] for i in indices] if isinstance(generator, list) else generator
            result = self._run_group(
                torch.stack([prepared[i] for i in indices]), torch.stack([maps[i] for i in indices]),
                [prompts[i] for i in indices], gen, sample_latent, device,
            )
            for j, i in enumerate(indices):
                outputs[i] = result[j].cpu()
        images = [
            _with_alpha(postprocess_image(out, size, output_type), _input_alpha(item, f"image[{i}]"), output_type)
            for i, (item, out, size) in enumerate(zip(items, outputs, sizes))
        ]
        if output_type in ("np", "pt") and len({tuple(im.shape) for im in images}) == 1:
            images = np.stack(images) if output_type == "np" else torch.stack(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


# ----------------------------------------------------------------------------------------- tokenizer


def find_clip_tokenizer(config_dir: str | None = None):
    """A CLIP tokenizer with SD-Turbo's settings (pad "!") without network access.

    Search order: ``<config_dir>/tokenizer`` if it has a vocabulary; ComfyUI's bundled ``comfy/sd1_tokenizer``;
    the local Hugging Face cache of ``stabilityai/sd-turbo`` (tokenizer subfolder) and of
    ``openai/clip-vit-base-patch32`` (same BPE vocabulary). ``pad_token`` is forced to "!" as in SD 2.x/SD-Turbo.
    """
    from transformers import CLIPTokenizer

    candidates: list[tuple[str, dict[str, Any]]] = []
    if config_dir and os.path.isfile(os.path.join(config_dir, "tokenizer", "vocab.json")):
        candidates.append((os.path.join(config_dir, "tokenizer"), {}))
    try:
        import comfy  # noqa: F401  (only present inside ComfyUI)

        folder = os.path.join(os.path.dirname(comfy.__file__), "sd1_tokenizer")
        if os.path.isfile(os.path.join(folder, "vocab.json")):
            candidates.append((folder, {}))
    except ImportError:
        pass
    candidates.append((BASE_MODEL_ID, {"subfolder": "tokenizer", "local_files_only": True}))
    candidates.append((CLIP_MODEL_ID, {"local_files_only": True}))
    errors = []
    for source, extra in candidates:
        try:
            return CLIPTokenizer.from_pretrained(source, pad_token="!", **extra)
        except (OSError, ValueError) as exc:
            errors.append(f"{source}: {str(exc).splitlines()[0]}")
    raise OSError(
        "no CLIP tokenizer vocabulary found offline (it is not shipped with this package). Pass tokenizer=..., or "
        f"download it once: `huggingface-cli download {BASE_MODEL_ID} --include 'tokenizer/*'`. Tried:\n  "
        + "\n  ".join(errors)
    )


# ------------------------------------------------------------------------------------------------- alpha


def _input_alpha(image, what: str) -> np.ndarray | None:
    """The alpha channel of one input image as float32 ``HxW`` in 0..1 (``None`` without one): SCUF enhances the
    colours only, and the transparency goes back onto the result unchanged, as SGZ does."""
    from PIL import Image

    from ..media.image_convert import _array_scale, _pil_to_array

    if isinstance(image, Image.Image):
        alpha = _pil_to_array(image)[1]
    elif isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 4:
        alpha = image[:, :, 3]
    elif isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] == 4:
        alpha = image[3].detach().to("cpu").numpy()
    else:
        return None
    if alpha is None:
        return None
    return np.clip(alpha.astype(np.float32) / np.float32(_array_scale(alpha.dtype, what)), 0.0, 1.0)


def _with_alpha(image, alpha: np.ndarray | None, output_type: str):
    """``postprocess_image``'s result with ``alpha`` attached as a fourth channel (RGBA for PIL)."""
    if alpha is None:
        return image
    if output_type == "pil":
        from PIL import Image

        rgba = image.convert("RGBA")
        rgba.putalpha(Image.fromarray(np.round(alpha * 255).astype(np.uint8)))  # exact for 8-bit alpha
        return rgba
    if output_type == "np":
        return np.concatenate([image, alpha[:, :, None]], axis=2)
    return torch.cat([image, torch.from_numpy(alpha)[None]], dim=0)
