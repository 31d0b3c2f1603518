"""The dtype a pipeline runs in, and seeded noise that does not depend on it.

A tier asks for a precision (``auto``, ``bf16``, ``fp16``, ``fp32``); the device decides
what it gets: bf16 needs compute capability 8.0 (Ampere) or later, and the CPU runs fp32.
Initial latents are drawn in fp32 on the CPU, one generator per image, and only then cast
to the model's dtype: a seed paints the same image in any precision, on any device.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: What a tier may ask for; ``auto`` is bf16 where the device has it, else fp16.
Precision = Literal["auto", "bf16", "fp16", "fp32"]
#: What a pipeline runs in.
Dtype = Literal["bf16", "fp16", "fp32"]

#: bf16 tensor cores arrived with Ampere (A100, A10G, L4 and later).
BF16_CAPABILITY = (8, 0)


def resolve(precision: Precision, capability: tuple[int, int] | None) -> Dtype:
    """The dtype for ``precision`` on a device of ``capability`` (``None``: the CPU).

    The CPU always runs fp32: its half-precision kernels are slow or missing, and the tiny
    model's CPU images are the ones tests compare.
    """
    if capability is None:
        return "fp32"
    has_bf16 = capability >= BF16_CAPABILITY
    if precision == "auto":
        return "bf16" if has_bf16 else "fp16"
    if precision == "bf16" and not has_bf16:
        log.warning(
            "bf16 needs compute capability %d.%d, this GPU has %d.%d: running fp16",
            *BF16_CAPABILITY,
            *capability,
        )
        return "fp16"
    return precision


def torch_dtype(dtype: Dtype) -> torch.dtype:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]


def seeded_latents(
    seeds: Sequence[int], shape: tuple[int, int, int], dtype: torch.dtype, device: str
) -> torch.Tensor:
    """One latent per seed, of ``shape`` (channels, height, width): drawn in fp32 on the CPU
    from the seed's own generator, as diffusers' ``randn_tensor`` draws them for a list of
    CPU generators, then cast to ``dtype`` on ``device``."""
    import torch

    noise = [
        torch.randn(
            (1, *shape),
            generator=torch.Generator("cpu").manual_seed(seed),
            dtype=torch.float32,
            device="cpu",
        )
        for seed in seeds
    ]
    return torch.cat(noise).to(device=device, dtype=dtype)
