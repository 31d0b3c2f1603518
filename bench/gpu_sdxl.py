"""SDXL base on one CUDA GPU, random weights: plain diffusers against sdq's runner.

Builds the full-size SDXL base architecture (UNet, both text encoders, VAE) from its
published configs with random weights -- timing does not depend on weight values, and no
weights can be downloaded here -- and runs, at 1024x1024 and 30 steps, one block each:

* ``diffusers fp16 SDPA``: the plain ``StableDiffusionXLPipeline``, fp16, SDPA attention;
* ``sdq fp16``, ``sdq bf16``: sdq's ``DiffusersRunner`` (channels_last, seeded fp32 noise,
  bounded run-ahead progress, watermarker off);
* ``sdq bf16 compile``: the UNet compiled for the bucket of the size (default inductor mode,
  CUDA graphs), warmed first; recompiles after the warm-up are counted (must be 0);
* ``batch``: images/s of the fastest eager sdq variant at batch 1, 2, 4, 8 (that many
  one-image jobs in one call, as ``batch_images`` runs them), interleaved round by round,
  and each batch's gain over batch 1 (batching across jobs is worth turning on where it
  is >= 1.2x).

Every block reports seconds per image (p50, p95), per-stage seconds (text encoders,
denoise, VAE decode, postprocess, PNG encode), TFLOP/s against 406 TFLOP per 1024x1024,
30-step image (scaled by steps and pixels), the progress lag in steps, and peak VRAM. The
JSON file is rewritten after every block; a block that would overrun ``--budget`` seconds
(360 by default: the whole run fits 6 minutes on an H100) is skipped, and says so.

    python bench/gpu_sdxl.py [--steps 30] [--size 1024] [--runs 3] [--json out.json]

It refuses to run without CUDA. ``--cpu-smoke`` runs every variant on the tiny model on the
CPU (compile with dynamo's ``eager`` backend), to check the script itself: its figures mean
nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
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


ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Dense FLOPs of one SDXL image at 1024x1024, 30 steps, with guidance.
TFLOP_PER_IMAGE = 406.0
PROMPT = "An astronaut riding a horse on Mars"


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
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    return pipe


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Stages:
    """Seconds of each stage of the calls made within: the text encoders, the denoising
    loop, the VAE decode, the postprocessing (to PIL), and the PNG encode of the images.
    Synchronises at each stage's edges only."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.marks: dict[str, float] = {}
        self.totals: dict[str, list[float]] = {}

    def _wrap(self, owner: Any, name: str, before: str, after: str) -> Callable[[], None]:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            sync()
            self.marks[before] = time.perf_counter()
            result = original(*args, **kwargs)
            sync()
            self.marks[after] = time.perf_counter()
            return result

        setattr(owner, name, timed)
        return lambda: setattr(owner, name, original)

    def __enter__(self) -> Stages:
        self._undo = [
            self._wrap(self.pipe, "encode_prompt", "text_start", "text_end"),
            self._wrap(self.pipe.vae, "decode", "decode_start", "decode_end"),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for undo in self._undo:
            undo()

    def record(self, started: float, ended: float, images: list[Any]) -> None:
        from workers.encode import encode

        m = self.marks
        encode_from = time.perf_counter()
        for image in images:
            encode(image, "png")
        stages = {
            "text_s": m["text_end"] - m["text_start"],
            "denoise_s": m["decode_start"] - m["text_end"],
            "decode_s": m["decode_end"] - m["decode_start"],
            "postprocess_s": ended - m["decode_end"],
            "encode_png_s": time.perf_counter() - encode_from,
            "pipeline_s": ended - started,
        }
        for key, value in stages.items():
            self.totals.setdefault(key, []).append(value)

    def medians(self) -> dict[str, float]:
        return {key: statistics.median(values) for key, values in self.totals.items()}


def plain_call(pipe: Any, args: argparse.Namespace, batch: int) -> Callable[[], list[Any]]:
    import torch

    def call() -> list[Any]:
        generators = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]
        with torch.inference_mode():
            result = pipe(
                prompt=PROMPT,
                num_inference_steps=args.steps,
                width=args.size,
                height=args.size,
                num_images_per_prompt=batch,
                generator=generators,
                guidance_scale=7.5,
            )
        return list(result.images)

    return call


def runner_call(runner: Any, args: argparse.Namespace, batch: int) -> Callable[[], list[Any]]:
    """One call of sdq's runner: a job of one image at batch 1; at batch ``batch``, that
    many one-image jobs of their own prompts and seeds in one pipeline call, as a tier with
    ``batch_images`` runs waiting jobs (``workers.batching``)."""
    from workers.pipeline import Generation

    lags: list[int] = []
    generations = [
        Generation(
            prompt=f"{PROMPT}, number {index}",
            negative_prompt=None,
            guidance_scale=7.5,
            steps=args.steps,
            width=args.size,
            height=args.size,
            seeds=[index],
        )
        for index in range(batch)
    ]

    def call() -> list[Any]:
        if batch == 1:
            images = runner.generate(generations[0], on_step=lambda step, total: None)
        else:
            each = runner.generate_many(generations, [lambda step, total: None] * batch)
            images = [image for job in each for image in job]
        lags.append(runner.max_lag)
        return images

    call.lags = lags  # type: ignore[attr-defined]
    return call


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def tflop_per_image(args: argparse.Namespace) -> float:
    return TFLOP_PER_IMAGE * (args.steps / 30) * (args.size / 1024) ** 2


def timed(pipe: Any, call: Callable[[], list[Any]], stages: Stages | None) -> float:
    sync()
    started = time.perf_counter()
    images = call()
    sync()
    ended = time.perf_counter()
    if stages is not None:
        stages.record(started, ended, images)
    return ended - started


def block(
    label: str,
    pipe: Any,
    call: Callable[[], list[Any]],
    args: argparse.Namespace,
    batch: int = 1,
    warmup: int = 1,
) -> dict[str, Any]:
    import torch

    for _ in range(warmup):
        timed(pipe, call, None)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with Stages(pipe) as stages:
        times = [timed(pipe, call, stages) for _ in range(args.runs)]
    per_image = [t / batch for t in times]
    row: dict[str, Any] = {
        "variant": label,
        "batch": batch,
        "p50_s": statistics.median(per_image),
        "p95_s": percentile(per_image, 0.95),
        "runs": len(times),
        "stages_s": stages.medians(),
        "tflop_per_s": tflop_per_image(args) / statistics.median(per_image),
        "peak_vram_gib": (
            torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        ),
    }
    lags = getattr(call, "lags", None)
    if lags is not None:
        row["progress_lag_steps"] = max(lags)
    print(
        f"{label:<24} p50 {row['p50_s']:.3f} s/image  p95 {row['p95_s']:.3f}  "
        f"{row['tflop_per_s']:.1f} TFLOP/s",
        flush=True,
    )
    return row


class Budget:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - STARTED)

    def allows(self, label: str, estimate: float, result: dict[str, Any]) -> bool:
        if estimate <= self.left():
            return True
        result["skipped"].append({"block": label, "estimate_s": estimate, "left_s": self.left()})
        print(f"{label}: skipped (needs ~{estimate:.0f} s, {self.left():.0f} s left)")
        return False


def write(args: argparse.Namespace, result: dict[str, Any]) -> None:
    result["elapsed_s"] = time.perf_counter() - STARTED
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--rounds", type=int, default=2, help="Interleaved batch rounds.")
    parser.add_argument("--budget", type=float, default=360.0, help="Seconds for the run.")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--json", type=Path, help="Write the figures here, after every block.")
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
        args.steps, args.size, args.runs, args.rounds = 2, 64, 1, 1
    from torch._dynamo.utils import counters

    from workers.compiled import CompilePlan
    from workers.pipeline import DiffusersRunner, quiet_libraries

    quiet_libraries()
    device = "cuda" if cuda else "cpu"
    # The CPU has no fast fp16 kernels: the smoke runs its "fp16" blocks in fp32.
    half = torch.float16 if cuda else torch.float32
    gpu = torch.cuda.get_device_name(0) if cuda else "cpu (smoke test)"
    print(f"device: {gpu}; torch {torch.__version__}; {args.size}x{args.size}, {args.steps} steps")
    result: dict[str, Any] = {
        "gpu": gpu,
        "torch": torch.__version__,
        "size": args.size,
        "steps": args.steps,
        "tflop_per_image": tflop_per_image(args),
        "variants": [],
        "batches": {},
        "skipped": [],
    }
    budget = Budget(args.budget)

    pipe = build(device, half, tiny=args.cpu_smoke)
    first = timed(pipe, plain_call(pipe, args, 1), None)
    result["first_image_s"] = first
    result["process_start_to_first_image_s"] = time.perf_counter() - STARTED
    each = (args.runs + 1) * first  # a block's cost, from the first (cold) image
    rows: list[dict[str, Any]] = result["variants"]
    rows.append(block("diffusers fp16 SDPA", pipe, plain_call(pipe, args, 1), args))
    write(args, result)
    each = (args.runs + 1) * rows[0]["p50_s"] * 1.2

    runners: dict[str, Any] = {}
    for label, dtype, name in (("sdq fp16", half, "fp16"), ("sdq bf16", torch.bfloat16, "bf16")):
        if not budget.allows(label, each, result):
            continue
        pipe.to(dtype=dtype)
        runner = DiffusersRunner("bench", dtype=name if cuda or name == "bf16" else "fp32")
        runner.adopt(pipe)
        rows.append(block(label, pipe, runner_call(runner, args, 1), args))
        runners[label] = runner
        write(args, result)

    if not args.no_compile and budget.allows("sdq bf16 compile", each + 150.0, result):
        pipe.to(dtype=torch.bfloat16)
        compiled = DiffusersRunner(
            "bench",
            dtype="bf16",
            compile=True,
            compile_plan=CompilePlan(((args.size, args.size),), 1, "inductor" if cuda else "eager"),
        )
        graphs = int(counters["stats"]["unique_graphs"])
        compiled.adopt(pipe)  # compiles and warms the bucket
        warmed = int(counters["stats"]["unique_graphs"])
        row = block("sdq bf16 compile", pipe, runner_call(compiled, args, 1), args)
        assert compiled.compiled is not None
        row.update(
            compile_s=compiled.warmup_seconds,
            graphs_warmed=warmed - graphs,
            recompiles=int(counters["stats"]["unique_graphs"]) - warmed,
            eager_calls=compiled.compiled.eager_calls,
        )
        rows.append(row)
        write(args, result)
        # Back to the eager UNet for the batch blocks.
        pipe.unet.forward = compiled.compiled.eager

    eager = [row for row in rows if row["variant"] in runners]
    if eager:
        best = min(eager, key=lambda row: row["p50_s"])
        runner = runners[best["variant"]]
        pipe.to(dtype=torch_dtype_of(runner.dtype))
        batches = [int(b) for b in args.batches.split(",")]
        seconds: dict[int, list[float]] = {b: [] for b in batches}
        estimate = args.rounds * sum(batches) * best["p50_s"] * 0.9
        if budget.allows("batch", estimate, result):
            calls = {b: runner_call(runner, args, b) for b in batches}
            for b in batches:  # one warm call each: the allocator's first sight of it
                timed(pipe, calls[b], None)
            for _ in range(args.rounds):
                for b in batches:  # interleaved, so that drift hits every batch alike
                    seconds[b].append(timed(pipe, calls[b], None))
            base = 1 / statistics.median(seconds[batches[0]])
            result["batches"] = {
                "variant": best["variant"],
                "images_per_s": {str(b): b / statistics.median(seconds[b]) for b in batches},
                "gain_over_batch_1": {
                    str(b): b / statistics.median(seconds[b]) / base for b in batches
                },
            }
            result["batching_worth_it"] = any(
                gain >= 1.2 for gain in result["batches"]["gain_over_batch_1"].values()
            )
            for b in batches:
                gain = result["batches"]["gain_over_batch_1"][str(b)]
                ips = result["batches"]["images_per_s"][str(b)]
                print(f"batch {b}: {ips:.3f} images/s ({gain:.2f}x batch 1)", flush=True)
            write(args, result)

    print()
    print(f"| {gpu} | s/image p50 | s/image p95 | TFLOP/s | lag (steps) |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        lag = row.get("progress_lag_steps", "-")
        print(
            f"| {row['variant']} | {row['p50_s']:.3f} | {row['p95_s']:.3f} "
            f"| {row['tflop_per_s']:.1f} | {lag} |"
        )
    print(f"\nprocess start to first image {result['process_start_to_first_image_s']:.1f} s")
    write(args, result)
    print(f"total {result['elapsed_s']:.1f} s")
    return 0


def torch_dtype_of(name: str | None) -> Any:
    from workers.precision import torch_dtype

    return torch_dtype(name or "fp32")  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main())
