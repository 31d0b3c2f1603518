"""Where the local stack lives when SDQ_HOME is not set: one absolute folder, the same from
every folder of the project, so `sdq ps` and `sdq down` find a stack from anywhere in it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from common.settings import Settings, default_home
from tests.support import ROOT

SDQ = [sys.executable, "-m", "producer.cli"]


def checkout(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "pyproject.toml").write_text("[project]\nname = 'sdq'\n")
    return path


def test_the_nearest_sdq_folder_above_wins(tmp_path: Path) -> None:
    (tmp_path / "project" / ".sdq").mkdir(parents=True)
    deep = tmp_path / "project" / "a" / "b"
    deep.mkdir(parents=True)
    assert default_home(deep, checkout=None) == tmp_path / "project" / ".sdq"
    assert default_home(tmp_path / "project", checkout=None) == tmp_path / "project" / ".sdq"


def test_an_editable_checkout_keeps_its_home_at_its_root(tmp_path: Path) -> None:
    root = checkout(tmp_path / "sdq")
    (tmp_path / ".sdq").mkdir()  # one further up is not this checkout's
    (root / "producer" / "cli").mkdir(parents=True)
    assert default_home(root / "producer" / "cli", checkout=root) == root / ".sdq"
    # Outside it, where no .sdq is near, the checkout's own.
    elsewhere = tmp_path / "elsewhere" / "x"
    elsewhere.mkdir(parents=True)
    (tmp_path / ".sdq").rmdir()
    assert default_home(elsewhere, checkout=root) == root / ".sdq"


def test_an_installed_package_uses_the_working_folder(tmp_path: Path) -> None:
    site = tmp_path / "site-packages"  # no pyproject.toml: not a checkout
    site.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    assert default_home(work, checkout=site) == work / ".sdq"


def test_an_explicit_home_wins_and_is_made_absolute(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, home=Path("relative/home"))  # type: ignore[call-arg]
    assert settings.home == Path.cwd() / "relative" / "home"
    assert Settings(_env_file=None).home.is_absolute()  # type: ignore[call-arg]


def test_the_cli_resolves_the_same_home_from_any_folder(tmp_path: Path) -> None:
    """Run as `sdq` does, with no SDQ_HOME: from a subfolder of a project holding .sdq, its
    .sdq; from a folder with none near, this editable checkout's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDQ_")}
    (tmp_path / "project" / ".sdq").mkdir(parents=True)
    deep = tmp_path / "project" / "src" / "pkg"
    deep.mkdir(parents=True)

    def home(cwd: Path) -> str:
        done = subprocess.run(
            [*SDQ, "ps", "--json"], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        found: str = json.loads(done.stdout)["home"]
        return found

    assert home(deep) == str(tmp_path / "project" / ".sdq")
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    assert home(lonely) == str(ROOT / ".sdq")
