"""SCUF speed and memory on a full-size SD-Turbo architecture with random weights (nothing is downloaded).

UNet, VAE and text encoder are built from the configs shipped in ``pipelines/scuf/configs/sd-turbo`` (865 M + 84 M +
340 M parameters), the image encoder is a random CLIP ViT-B/32 vision tower (transformers config), the SCUF
modules get their official initialisation. The tokenizer is the fixture's tiny BPE (its ids are valid for the
full vocabulary; tokenisation cost is negligible). Random weights compute exactly as many FLOPs as trained ones.

Each (precision, size) runs in a fresh subprocess: build the model, one warm-up call, then ``--repeats`` timed
calls of ``pipe(image, output_type="np")`` (median seconds per image). Peak memory = the kernel's RSS high-water
mark (``VmHWM``) of that process, reset after loading (``/proc/self/clear_refs``), so it is the resident peak
during inference including the weights. ``--breakdown`` also times the stages separately (as the pipeline runs them:
on the CPU with the VAE's inference copy, ``pipelines/scuf/inference_vae.py``, see docs/scuf_speed.md; ``--compare``
adds each stage as it ran before those CPU changes, from the same process). Wall seconds and process CPU seconds (all threads) are
printed: on a shared machine the CPU time varies less.

    nice -n 0 python benchmarks/bench_scuf.py [--sizes 256 512 1024] [--precisions float32 bfloat16]
        [--repeats 2] [--threads 2] [--skip 1024:float32] [--breakdown [--compare]] [--tile-size 512]
        [--channels-last]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def build_full_size_pipeline(precision: str, seed: int = 0, channels_last: bool = False):
    """A random-weight SCUFPipeline with the real SD-Turbo / CLIP ViT-B/32 shapes, in ``precision``."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig, \
        CLIPVisionModelWithProjection

    from comfyui_lowlight.pipelines.scuf.pipeline import SCUFPipeline, shipped_config_dir

    config_dir = Path(shipped_config_dir())
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=32,
        image_size=224, projection_dim=512, hidden_act="quick_gelu",
    ))
    scheduler = EulerDiscreteScheduler.from_config(EulerDiscreteScheduler.load_config(config_dir / "scheduler"))
    tokenizer = CLIPTokenizer.from_pretrained(SHARED / "reference" / "scuf" / "base" / "tokenizer")
    pipe = SCUFPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                        image_encoder=image_encoder.eval())
    pipe.init_scuf_modules()
    pipe.set_progress_bar_config(disable=True)
    if precision != "float32":
        pipe.to(getattr(torch, precision))
    if channels_last:
        # oneDNN's convolutions are faster on NHWC; activations follow the weights' layout
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    return pipe


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _breakdown(pipe, image, compare: bool = False) -> dict[str, float]:
    """Seconds per stage for one image (wall, and process CPU time as "<stage> cpu"), calling the pipeline's pieces
    in its order as it runs them on this device (on the CPU: cached text embedding, the VAE's inference copy,
    cycle attention on distinct query rows). ``compare``: each stage runs again right after, the way it ran
    before those CPU changes (text encoded again, the PEFT-wrapped VAE as loaded, every query row), in the same
    process (rows "<stage> (before)"), and the VAE stages also with the inference copy's convs all oneDNN's
    (rows "<stage> (no Winograd)", pipelines/scuf/winograd.py)."""
    import torch

    from comfyui_lowlight.pipelines.media.illumination import inverted_value_channel
    from comfyui_lowlight.pipelines.scuf import modules
    from comfyui_lowlight.pipelines.scuf.pipeline import DEFAULT_PROMPT

    times = {}

    def timed(name, fn):
        start, cpu = time.perf_counter(), time.process_time()
        result = fn()
        times[name] = time.perf_counter() - start
        times[name + " cpu"] = time.process_time() - cpu
        return result

    def every_query_row(idx):
        return idx, None

    x = (image[None] * 2 - 1).contiguous(memory_format=torch.channels_last)
    illumination = inverted_value_channel(image[None])
    now = {"text": lambda: pipe._text_embedding(DEFAULT_PROMPT, "cpu"), "vae": pipe._vae_for(x.device),
           "rows": modules.distinct_query_rows}
    before = {"text": lambda: pipe.encode_prompt(DEFAULT_PROMPT, "cpu"), "vae": pipe.vae, "rows": every_query_row}
    runs = {"": now}
    if compare:
        from comfyui_lowlight.pipelines.scuf.inference_vae import inference_vae
        from comfyui_lowlight.pipelines.scuf.winograd import WinogradConv2d

        if any(isinstance(m, WinogradConv2d) for m in now["vae"].modules()):
            # the inference copy with oneDNN's convs everywhere (VAE stages only)
            runs[" (no Winograd)"] = now | {"vae": inference_vae(pipe.vae, winograd=False), "vae only": True}
        runs[" (before)"] = before
    vae_dtype = pipe.vae.dtype
    context = torch.zeros(1, 81, pipe.unet.config.cross_attention_dim, dtype=pipe.unet.dtype)
    with torch.no_grad():
        for suffix, run in runs.items():
            if not run.get("vae only"):
                timed("prompts" + suffix, lambda: (run["text"](), pipe.encode_image_prompt(illumination)))
        for suffix, run in runs.items():
            posterior, skips = timed("vae encoder" + suffix, lambda: modules.encode_with_skips(run["vae"], x.to(vae_dtype)))
        latents = posterior.mean * pipe.vae.config.scaling_factor
        for suffix, run in runs.items():
            if run.get("vae only"):
                continue
            modules.distinct_query_rows = run["rows"]
            try:
                timed("unet" + suffix, lambda: pipe.unet(latents.to(pipe.unet.dtype), torch.tensor([999]),
                                                         encoder_hidden_states=context))
            finally:
                modules.distinct_query_rows = now["rows"]
        for suffix, run in runs.items():
            timed("vae decoder" + suffix, lambda: modules.decode_with_skips(run["vae"], posterior.mean.to(vae_dtype), skips))
    return times


def run_one(precision: str, size: int, repeats: int, threads: int, breakdown: bool, tile_size: int | None,
            channels_last: bool, compare: bool = False) -> dict:
    """Measure one configuration in this process (called in a subprocess by :func:`main`)."""
    import torch

    torch.set_num_threads(threads)
    start = time.perf_counter()
    pipe = build_full_size_pipeline(precision, channels_last=channels_last)
    load_s = time.perf_counter() - start
    if tile_size is not None:
        pipe.enable_vae_tiling(tile_size, 64)
    generator = torch.Generator().manual_seed(size)
    image = torch.rand(3, size, size, generator=generator) * 0.3  # a dark image
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current RSS
    base_kib = _rss_kib("VmRSS")
    pipe(image, output_type="np")  # warm-up (oneDNN primitive creation)
    seconds, cpu_seconds = [], []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        out = pipe(image, output_type="np").images
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu)
    assert out.shape == (1, size, size, 3)
    result = {
        "precision": precision, "size": size, "seconds": sorted(seconds)[len(seconds) // 2], "all": seconds,
        "cpu_seconds": sorted(cpu_seconds)[len(cpu_seconds) // 2],
        "peak_mib": _rss_kib("VmHWM") / 1024, "weights_mib": base_kib / 1024, "load_s": load_s,
        "threads": threads,
    }
    if breakdown:
        result["breakdown"] = _breakdown(pipe, image, compare)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--skip", nargs="*", default=[], help="SIZE:PRECISION pairs not to run")
    parser.add_argument("--breakdown", action="store_true", help="also time prompts/encoder/UNet/decoder")
    parser.add_argument("--tile-size", type=int, default=None, help="enable tiling with this tile size (overlap 64)")
    parser.add_argument("--channels-last", action="store_true",
                        help="UNet and VAE in channels_last from the start (SCUFPipeline switches them itself on "
                             "its first CPU call, the warm-up, so timed CPU runs use channels_last either way)")
    parser.add_argument("--compare", action="store_true",
                        help="with --breakdown: also time each stage the way it ran before the CPU speed-ups (text "
                             "encoded every call, PEFT-wrapped VAE, every cycle-attention query row), in the same "
                             "process right after the current one, and the VAE stages without Winograd convs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        precision, size = args.child.split(":")
        print(json.dumps(run_one(precision, int(size), args.repeats, args.threads, args.breakdown, args.tile_size,
                                 args.channels_last, args.compare)))
        return

    load_before = _load()
    rows = []
    for size in args.sizes:
        for precision in args.precisions:
            if f"{size}:{precision}" in args.skip:
                rows.append(f"| {size}x{size} | {precision} | not run | | | |")
                continue
            command = [sys.executable, __file__, "--child", f"{precision}:{size}", "--repeats", str(args.repeats),
                       "--threads", str(args.threads)] + (["--breakdown"] if args.breakdown else []) \
                + (["--tile-size", str(args.tile_size)] if args.tile_size else []) \
                + (["--channels-last"] if args.channels_last else []) \
                + (["--compare"] if args.compare else [])
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                rows.append(f"| {size}x{size} | {precision} | failed: {done.stderr.strip().splitlines()[-1]} | | | |")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            stage_times = r.get("breakdown", {})
            stages = ", ".join(f"{k} {v:.1f} (cpu {stage_times[k + ' cpu']:.1f})" for k, v in stage_times.items()
                               if not k.endswith(" cpu"))
            rows.append(f"| {size}x{size} | {precision} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['peak_mib']:.0f} | "
                        f"{r['weights_mib']:.0f} |" + (f" {stages} |" if stages else ""))
            print(rows[-1], f"(all runs: {', '.join(f'{s:.1f}' for s in r['all'])})", file=sys.stderr, flush=True)
    header = "| size | precision | s / image (median) | process CPU s | peak RSS MiB | RSS after load MiB |"
    if args.breakdown:
        header += " stages s (wall, process CPU time) |"
    print(f"\nSCUF, full-size SD-Turbo + CLIP ViT-B/32 (random weights), torch {_torch_version()}, "
          f"{args.threads} threads, repeats {args.repeats}, tiling {args.tile_size or 'off'}, "
          f"channels_last {args.channels_last}; load average (1/5/15 min) at the start: {load_before}\n")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    print("\n".join(rows))
    print(f"\nload average at the end: {_load()}")


def _torch_version() -> str:
    import torch

    return torch.__version__


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


if __name__ == "__main__":
    main()
