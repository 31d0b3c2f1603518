"""Tiny pipelines with random weights, one per model family, built from configs.

No machine of ours can download the real weights, so development and tests run the real
diffusers code paths on these: each family's architecture, scaled down and randomly
initialised from a fixed seed. SDXL: two CLIP text encoders, a text-time conditioned UNet, a
KL VAE, Euler. SD 1.5: one CLIP text encoder (quick-GELU), a UNet with convolutional
attention projections, PNDM (epsilon). SD 2.1: an OpenCLIP-like text encoder (GELU), linear
projections, DDIM with v-prediction, as the real models ship them. They paint noise,
deterministically for a given seed.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from common.models import Family

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


# SD 1.5, scaled down: cross-attention on one text encoder's hidden states, convolutional
# attention projections, a head count where `attention_head_dim` says (diffusers' legacy
# name), and a quick-GELU CLIP ViT-L-like text encoder.
TINY_SD15_UNET: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "attention_head_dim": 4,
    "cross_attention_dim": 32,
    "norm_num_groups": 1,
}
TINY_SD15_CLIP: dict[str, Any] = {**TINY_CLIP, "hidden_act": "quick_gelu"}
# SD 2.1 (768-v), scaled down: linear projections, per-block head sizes, upcast attention
# and an OpenCLIP ViT-H-like (GELU) text encoder; trained for v-prediction.
TINY_SD21_UNET: dict[str, Any] = {
    **TINY_SD15_UNET,
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "upcast_attention": True,
}
TINY_SD21_CLIP: dict[str, Any] = {**TINY_CLIP, "hidden_act": "gelu"}

# The schedulers the real models ship (their scheduler_config.json), which a tier's
# scheduler is made from: prediction_type above all.
_SD_BETAS: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
}
SD15_SCHEDULER: tuple[str, dict[str, Any]] = (
    "PNDMScheduler",
    {**_SD_BETAS, "skip_prk_steps": True, "set_alpha_to_one": False},
)
SD21_SCHEDULER: tuple[str, dict[str, Any]] = (
    "DDIMScheduler",
    {
        **_SD_BETAS,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "prediction_type": "v_prediction",
    },
)


def _tokenizer(pad_token: str | None = None) -> tuple[Any, int]:
    """The byte-level tokenizer and its vocabulary size."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file, vocab_size = _write_tokenizer_files(Path(tmp))
        options = {} if pad_token is None else {"pad_token": pad_token}
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77, **options)
    return tokenizer, vocab_size


def _text_config(config: dict[str, Any], vocab_size: int) -> Any:
    """A CLIP text config over the byte-level vocabulary, its last two ids the specials."""
    from transformers import CLIPTextConfig

    special = {
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
    }
    return CLIPTextConfig(**{"vocab_size": vocab_size, **config, **special})


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
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(BUILD_SEED)
    tokenizer, vocab_size = _tokenizer()
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL(**vae),
        text_encoder=CLIPTextModel(_text_config(clip, vocab_size)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(clip_2, vocab_size)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=UNet2DConditionModel(**unet),
        scheduler=EulerDiscreteScheduler(**_SD_BETAS, timestep_spacing="leading"),
    )


def assemble_sd(
    unet: dict[str, Any],
    vae: dict[str, Any],
    clip: dict[str, Any],
    scheduler: tuple[str, dict[str, Any]],
    pad_token: str | None = None,
) -> Any:
    """A Stable Diffusion 1.x/2.x pipeline with random weights (seeded) from these configs,
    without a safety checker."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(BUILD_SEED)
    tokenizer, vocab_size = _tokenizer(pad_token)
    scheduler_class, scheduler_config = scheduler
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**vae),
        text_encoder=CLIPTextModel(_text_config(clip, vocab_size)),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**unet),
        scheduler=getattr(diffusers, scheduler_class)(**scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_pipeline(family: Family = "sdxl") -> Any:
    """The tiny pipeline of ``family``, in memory."""
    if family == "sdxl":
        return assemble(TINY_UNET, TINY_VAE, TINY_CLIP, TINY_CLIP)
    if family == "sd15":
        return assemble_sd(TINY_SD15_UNET, TINY_VAE, TINY_SD15_CLIP, SD15_SCHEDULER)
    # OpenCLIP's tokenizer pads with "!", as SD 2.x's does.
    return assemble_sd(TINY_SD21_UNET, TINY_VAE, TINY_SD21_CLIP, SD21_SCHEDULER, pad_token="!")


def build_tiny(out_dir: Path, family: Family = "sdxl") -> Path:
    """Build and save the tiny pipeline of ``family`` under ``out_dir``; returns it."""
    from workers.pipeline import quiet_libraries

    quiet_libraries()
    pipeline = tiny_pipeline(family)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(out_dir)
    log.info("built the tiny %s pipeline in %s", family, out_dir)
    return out_dir
