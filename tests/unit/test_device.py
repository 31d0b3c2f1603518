import logging

import pytest

from common.device import CPU, GIB, Device, check_tier, classify
from common.errors import HardwareMismatch
from common.tiers import load_tiers

TIERS = load_tiers()


@pytest.mark.parametrize(
    ("name", "memory_gib", "expected"),
    [
        ("Tesla T4", 16, "t4"),
        ("NVIDIA L4", 24, "l4"),
        ("NVIDIA A10G", 24, "a10g"),
        ("NVIDIA L40S", 48, "l40s"),
        ("NVIDIA A100-SXM4-80GB", 80, "a100"),
        ("NVIDIA H100 80GB HBM3", 80, "h100"),
        ("NVIDIA H200", 141, "h200"),
        ("NVIDIA RTX 6000 Ada Generation", 48, "l40s"),  # unknown: placed by memory
        ("NVIDIA GeForce GTX 1050", 4, "cpu"),  # too small to serve any tier
    ],
)
def test_classify(name: str, memory_gib: int, expected: str) -> None:
    assert classify(Device(name=name, memory_bytes=memory_gib * GIB, count=1)) == expected


def test_cpu_is_cpu() -> None:
    assert CPU.hardware_class == "cpu"


def test_premium_refuses_a_t4_and_says_why() -> None:
    t4 = Device(name="Tesla T4", memory_bytes=16 * GIB, compute_capability=(7, 5), count=1)
    with pytest.raises(HardwareMismatch) as info:
        check_tier(t4, TIERS.get("premium"), development=False, override=False)
    assert "tier 'premium' needs one of: a100, h100, h200" in info.value.message
    assert "Tesla T4" in info.value.message and "class t4" in info.value.message
    check_tier(t4, TIERS.get("budget"), development=False, override=False)


def test_cpu_serves_tiers_only_in_development() -> None:
    with pytest.raises(HardwareMismatch, match="this machine has cpu"):
        check_tier(CPU, TIERS.get("budget"), development=False, override=False)
    check_tier(CPU, TIERS.get("premium"), development=True, override=False)


def test_override_is_logged_loudly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        check_tier(CPU, TIERS.get("premium"), development=False, override=True)
    assert "HARDWARE OVERRIDE" in caplog.text
