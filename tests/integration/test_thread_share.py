"""CPU workers side by side get their share of the cores, not one torch thread per core each
(two busy workers with a thread per core ran each image about 8x slower here, see
docs/benchmarks.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.settings import Settings
from producer import stack
from producer.stack import thread_env, thread_share
from workers.pipeline import SdxlRunner


def settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("cores", "workers", "share"), [(16, 6, 2), (16, 4, 4), (2, 6, 1), (2, 1, 2)]
)
def test_each_cpu_worker_gets_its_share_of_the_cores(
    monkeypatch: pytest.MonkeyPatch, cores: int, workers: int, share: int
) -> None:
    monkeypatch.setattr(stack, "cores", lambda: cores)
    assert thread_share(settings(), workers, cpu=True) == share


def test_no_share_where_the_operator_set_one_or_the_workers_have_a_gpu() -> None:
    assert thread_share(settings(torch_threads=3), 6, cpu=True) is None
    assert thread_share(settings(), 6, cpu=False) is None
    assert thread_env(None) == {}


def test_the_share_is_passed_on_and_an_operators_omp_setting_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert thread_env(2) == {"SDQ_TORCH_THREADS": "2", "MKL_NUM_THREADS": "2"}


def test_the_worker_runs_torch_on_its_share(tiny_model: Path) -> None:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # whatever this process was started with (make test: one)
    try:
        runner = SdxlRunner(str(tiny_model), threads=1)
        runner.load()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
