"""Device detection and tier pinning.

The Celery parent process must never initialise CUDA (CUDA does not survive fork), so the
device is read through NVML, which does not touch the CUDA runtime.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from common.errors import HardwareMismatch
from common.tiers import Tier

log = logging.getLogger(__name__)

GIB = 1024**3

# Name fragments of known cards, most specific first.
_KNOWN: list[tuple[str, str]] = [
    ("H200", "h200"),
    ("H100", "h100"),
    ("A100", "a100"),
    ("L40S", "l40s"),
    ("A10G", "a10g"),
    ("A10", "a10g"),
    ("L4", "l4"),
    ("T4", "t4"),
]


@dataclass(frozen=True)
class Device:
    """What a worker runs on: one GPU (the first visible one) or the CPU."""

    name: str
    memory_bytes: int = 0
    compute_capability: tuple[int, int] | None = None
    count: int = 0

    @property
    def hardware_class(self) -> str:
        return classify(self)

    def describe(self) -> str:
        if self.count == 0:
            return "cpu (no NVIDIA GPU visible)"
        cc = ".".join(map(str, self.compute_capability or ()))
        return (
            f"{self.count} x {self.name}, {self.memory_bytes / GIB:.0f} GiB, "
            f"compute capability {cc or '?'} (class {self.hardware_class})"
        )


CPU = Device(name="cpu")


def classify(device: Device) -> str:
    """Map a device to a hardware class; unknown cards are placed by their memory."""
    if device.count == 0:
        return "cpu"
    upper = device.name.upper()
    for fragment, hardware_class in _KNOWN:
        if fragment in upper:
            return hardware_class
    gib = device.memory_bytes / GIB
    if gib >= 120:
        return "h200"
    if gib >= 70:
        return "a100"
    if gib >= 40:
        return "l40s"
    if gib >= 22:
        return "a10g"
    if gib >= 15:
        return "t4"
    return "cpu"


def _visible() -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` as a list, or None when it is not set."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip() and part.strip() != "-1"]


def detect() -> Device:
    """The first visible NVIDIA GPU through NVML, or the CPU when there is none.

    NVML ignores ``CUDA_VISIBLE_DEVICES``, so the first device it names (an index or a
    UUID) is looked up explicitly.
    """
    visible = _visible()
    if visible == []:
        return CPU
    try:
        import pynvml
    except ImportError:
        return CPU
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return CPU
    try:
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            return CPU
        if visible is None:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        elif visible[0].isdigit():
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(visible[0]))
            count = len(visible)
        else:
            handle = pynvml.nvmlDeviceGetHandleByUUID(visible[0])
            count = len(visible)
        name = pynvml.nvmlDeviceGetName(handle)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total
        capability = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        return Device(
            name=name.decode() if isinstance(name, bytes) else name,
            memory_bytes=int(memory),
            compute_capability=(int(capability[0]), int(capability[1])),
            count=int(count),
        )
    finally:
        pynvml.nvmlShutdown()


def check_tier(device: Device, tier: Tier, *, development: bool, override: bool) -> None:
    """Refuse to serve ``tier`` on ``device`` unless the tier lists its class."""
    hardware_class = device.hardware_class
    if tier.accepts(hardware_class, development=development):
        if hardware_class == "cpu" and "cpu" not in tier.hardware:
            log.warning("development mode: serving tier %s on the cpu", tier.name)
        return
    message = (
        f"tier {tier.name!r} needs one of: {', '.join(tier.hardware)}; "
        f"this machine has {device.describe()}"
    )
    if override:
        log.warning("HARDWARE OVERRIDE: %s. Serving it anyway (SDQ_HARDWARE_OVERRIDE).", message)
        return
    raise HardwareMismatch(
        f"{message}. Run it on a machine with one of those, serve another tier, or set "
        "SDQ_HARDWARE_OVERRIDE=true to serve it here anyway"
        + ("" if development else " (SDQ_ENV=development also allows the cpu)")
    )
