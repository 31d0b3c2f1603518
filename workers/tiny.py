"""A tiny SDXL pipeline with random weights, built from configs.

No machine of ours can download SDXL's weights, so development and tests run the real
``StableDiffusionXLPipeline`` code path on this: the same architecture (two CLIP text
encoders, a text-time conditioned UNet, a KL VAE, Euler scheduler), scaled down and randomly
initialised from a fixed seed. It paints noise, deterministically for a given seed.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BUILD_SEED = 0


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's byte-level BPE alphabet (the GPT-2 table): printable bytes map to themselves,
    # the rest to code points above 255, so every byte has a visible character.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _write_tokenizer_files(directory: Path) -> tuple[Path, Path, int]:
    """A byte-level CLIP vocabulary with no merges: every character is a token."""
    alphabet = list(_bytes_to_unicode().values())
    vocab = {char: i for i, char in enumerate(alphabet)}
    vocab.update({char + "</w>": len(alphabet) + i for i, char in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n", encoding="utf-8")
    return vocab_file, merges_file, len(vocab)


# The SDXL architecture, scaled down: a text-time conditioned UNet whose cross-attention
# takes both text encoders' hidden states concatenated, and a KL VAE.
TINY_UNET: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (2, 4),
    "transformer_layers_per_block": (1, 1),
    "use_linear_projection": True,
    "cross_attention_dim": 64,  # 32 + 32: both text encoders
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,  # pooled text + 6 time ids
    "norm_num_groups": 1,
}
TINY_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (32, 64),
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "latent_channels": 4,
    "sample_size": 64,
    "norm_num_groups": 1,
}
TINY_CLIP: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "projection_dim": 32,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}


def assemble(
    unet: dict[str, Any], vae: dict[str, Any], clip: dict[str, Any], clip_2: dict[str, Any]
) -> Any:
    """An SDXL pipeline with random weights (seeded) from these component configs, with
    the byte-level tokenizer. ``bench/gpu_sdxl.py`` builds full-size SDXL with it."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    torch.manual_seed(BUILD_SEED)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file, vocab_size = _write_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77)
    special = {
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
    }

    def text_config(config: dict[str, Any]) -> Any:
        return CLIPTextConfig(**{"vocab_size": vocab_size, **config, **special})

    return StableDiffusionXLPipeline(
        vae=AutoencoderKL(**vae),
        text_encoder=CLIPTextModel(text_config(clip)),
        text_encoder_2=CLIPTextModelWithProjection(text_config(clip_2)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=UNet2DConditionModel(**unet),
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
        ),
    )


def build_tiny(out_dir: Path) -> Path:
    """Build and save the tiny pipeline under ``out_dir``; returns it."""
    from workers.pipeline import quiet_libraries

    quiet_libraries()
    pipeline = assemble(TINY_UNET, TINY_VAE, TINY_CLIP, TINY_CLIP)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(out_dir)
    log.info("built the tiny SDXL pipeline in %s", out_dir)
    return out_dir
