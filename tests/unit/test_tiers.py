from pathlib import Path

import pytest

from common.errors import InvalidRequest
from common.models import load_models
from common.tiers import TierConfigError, Tiers, load_tiers


def test_builtin_tiers_mirror_hotpot() -> None:
    tiers = load_tiers()
    assert tiers.names == ["budget", "normal", "premium", "art"]
    assert [t.queue for t in tiers] == ["sdq.budget", "sdq.normal", "sdq.premium", "sdq.art"]
    assert [t.price for t in tiers] == [1, 2, 4, 3]
    assert tiers.get("normal").models == ["sdxl", "sd15", "sd21"]
    assert tiers.get("premium").models == tiers.get("art").models == ["sdxl"]
    assert tiers.get("normal").queue_for("sd15") == "sdq.normal.sd15"
    assert tiers.get("normal").lane("sdxl") == "normal"
    tiers.check_models(load_models())
    assert tiers.get("premium").hardware == ["a100", "h100", "h200"]
    assert "t4" in tiers.get("budget").hardware and "t4" not in tiers.get("normal").hardware


def test_operators_replace_the_file(tmp_path: Path) -> None:
    path = tmp_path / "tiers.toml"
    path.write_text(
        '[tiers.fast]\nqueue = "q.fast"\nhardware = ["h100"]\n'
        "default_steps = 4\nmax_steps = 8\nmax_side = 1024\nprice = 3\n"
    )
    tiers = load_tiers(path)
    assert tiers.names == ["fast"]
    assert tiers.get("fast").cost(2) == 6


def test_a_default_above_the_limit_is_refused() -> None:
    with pytest.raises(TierConfigError, match="default_steps exceeds max_steps"):
        Tiers.from_toml(
            '[tiers.x]\nqueue = "q"\nhardware = ["cpu"]\n'
            "default_steps = 9\nmax_steps = 8\nmax_side = 512\nprice = 1\n"
        )


def test_unknown_tier_lists_the_known_ones() -> None:
    with pytest.raises(InvalidRequest, match="unknown tier 'ultra'; choose one of: budget, normal"):
        load_tiers().get("ultra")
