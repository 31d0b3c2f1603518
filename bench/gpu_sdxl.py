"""SDXL base on one CUDA GPU: seconds per image and images/s, with random weights.

Builds the full-size SDXL base architecture (UNet, both text encoders, VAE) from its
published configs with random fp16 weights -- timing does not depend on weight values, and
no weights can be downloaded here -- then runs the very pipeline sdq's workers run
(``StableDiffusionXLPipeline``) at 1024x1024, 30 steps, and prints:

* warm seconds per image (p50, p95) at batch 1 for fp16 + SDPA, + channels_last,
  + torch.compile;
* peak VRAM; process start to first image; images/s at batch 1, 2 and 4.

    python bench/gpu_sdxl.py [--steps 30] [--size 1024] [--runs 10] [--json out.json]

It refuses to run without CUDA. ``--cpu-smoke`` runs the same code on a tiny architecture
on the CPU, to check the script itself (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()

# stabilityai/stable-diffusion-xl-base-1.0: unet/config.json, vae/config.json,
# text_encoder/config.json (CLIP ViT-L/14), text_encoder_2/config.json (OpenCLIP ViT-bigG/14).
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}
SDXL_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "latent_channels": 4,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": False,
}
CLIP_L: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "vocab_size": 49408,
}
CLIP_G: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "projection_dim": 1280,
    "hidden_act": "gelu",
    "vocab_size": 49408,
}


def build(device: str, dtype: Any, tiny: bool) -> Any:
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    from workers.tiny import TINY_CLIP, TINY_UNET, TINY_VAE, assemble

    # Initialise straight in the target dtype, on the device: 2.6 B parameters in fp32
    # would take twice the memory and time for nothing.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if tiny:
                pipe = assemble(TINY_UNET, TINY_VAE, TINY_CLIP, TINY_CLIP)
            else:
                pipe = assemble(SDXL_UNET, SDXL_VAE, CLIP_L, CLIP_G)
    finally:
        torch.set_default_dtype(default_dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    return pipe


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(pipe: Any, *, batch: int, steps: int, size: int) -> float:
    import torch

    generators = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]
    sync()
    started = time.perf_counter()
    with torch.inference_mode():
        pipe(
            prompt="An astronaut riding a horse on Mars",
            num_inference_steps=steps,
            width=size,
            height=size,
            num_images_per_prompt=batch,
            generator=generators,
            guidance_scale=7.5,
        )
    sync()
    return time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(pipe: Any, args: argparse.Namespace, label: str, warmup: int) -> dict[str, Any]:
    for _ in range(warmup):
        run(pipe, batch=1, steps=args.steps, size=args.size)
    times = [run(pipe, batch=1, steps=args.steps, size=args.size) for _ in range(args.runs)]
    row = {
        "variant": label,
        "p50_s": statistics.median(times),
        "p95_s": percentile(times, 0.95),
        "runs": len(times),
    }
    print(f"{label:<28} p50 {row['p50_s']:.3f} s  p95 {row['p95_s']:.3f} s", flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--batches", default="1,2,4")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    parser.add_argument("--cpu-smoke", action="store_true", help="Check the script on the CPU.")
    args = parser.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        print(
            "bench/gpu_sdxl.py measures SDXL on a CUDA GPU, and torch sees none here "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False). "
            "Run it on a GPU host, or pass --cpu-smoke to check the script itself.",
            file=sys.stderr,
        )
        return 2
    if args.cpu_smoke:
        args.steps, args.size, args.runs = 2, 64, 2
    device = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    gpu = torch.cuda.get_device_name(0) if cuda else "cpu (smoke test)"
    print(f"device: {gpu}; torch {torch.__version__}; {args.size}x{args.size}, {args.steps} steps")

    pipe = build(device, dtype, tiny=args.cpu_smoke)
    first = run(pipe, batch=1, steps=args.steps, size=args.size)
    start_to_first = time.perf_counter() - STARTED
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rows = [measure(pipe, args, "fp16 + SDPA", warmup=1)]
    if cuda:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    rows.append(measure(pipe, args, "+ channels_last", warmup=1))
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0

    throughput = {}
    for batch in (int(b) for b in args.batches.split(",")):
        seconds = statistics.median(
            run(pipe, batch=batch, steps=args.steps, size=args.size)
            for _ in range(max(2, args.runs // 3))
        )
        throughput[batch] = batch / seconds
        print(f"batch {batch}: {throughput[batch]:.3f} images/s", flush=True)

    if not args.no_compile:
        compiled_from = time.perf_counter()
        pipe.unet = torch.compile(pipe.unet, mode="max-autotune", fullgraph=True)
        run(pipe, batch=1, steps=args.steps, size=args.size)  # compiles
        compile_s = time.perf_counter() - compiled_from
        row = measure(pipe, args, "+ torch.compile", warmup=2)
        row["compile_s"] = compile_s
        rows.append(row)

    result = {
        "gpu": gpu,
        "torch": torch.__version__,
        "size": args.size,
        "steps": args.steps,
        "variants": rows,
        "peak_vram_gib": peak,
        "first_image_s": first,
        "process_start_to_first_image_s": start_to_first,
        "images_per_s": throughput,
    }
    print()
    print(f"| {gpu} | s/image p50 | s/image p95 |")
    print("| --- | --- | --- |")
    for row in rows:
        print(f"| {row['variant']} | {row['p50_s']:.3f} | {row['p95_s']:.3f} |")
    print(f"\npeak VRAM {peak:.2f} GiB; process start to first image {start_to_first:.1f} s")
    print("images/s: " + ", ".join(f"batch {b}: {v:.3f}" for b, v in throughput.items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
