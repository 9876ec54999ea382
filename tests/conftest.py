"""Shared test fixtures.

The genuine spd run (``tests/data/spd-genuine-small``, see its README) is loaded once per
session. Session-scoped fixtures are **read-only**: never mutate what they return (copy
first, e.g. with the ``spd_out_copy`` fixture). Never write under ``tests/data``.

Every test runs with a hermetic environment: ``SPD_OUT_DIR`` and ``QKCHECK_CACHE`` point at
an empty temporary folder, W&B and the Hugging Face hub are offline, so nothing reads the
developer's own runs or the network.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

GENUINE = Path(__file__).parent / "data" / "spd-genuine-small"
GENUINE_OUT = GENUINE / "spd_out"
GENUINE_RUN_ID = "s-5eed0002"
GENUINE_RUN_DIR = GENUINE_OUT / "spd" / GENUINE_RUN_ID
GENUINE_PRETRAIN_DIR = GENUINE_OUT / "pretrain_cache" / "spd-t-5eed0000"


def _hermetic(mp: pytest.MonkeyPatch, empty: Path) -> None:
    mp.setenv("SPD_OUT_DIR", str(empty / "spd_out"))
    mp.setenv("QKCHECK_CACHE", str(empty / "qkcheck_cache"))
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_HOME", str(empty / "hf_home"))
    mp.delenv("HF_HUB_CACHE", raising=False)


@pytest.fixture(scope="session")
def _empty_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hermetic")


@pytest.fixture(autouse=True)
def hermetic_env(monkeypatch: pytest.MonkeyPatch, _empty_dir: Path) -> None:
    """No test sees the developer's SPD_OUT_DIR, qkcheck cache, W&B or HF hub."""
    _hermetic(monkeypatch, _empty_dir)


@pytest.fixture(scope="session")
def genuine_run(_empty_dir: Path):
    """The genuine spd run, loaded from its directory (read-only)."""
    from qkcheck.runs import load_run

    with pytest.MonkeyPatch.context() as mp:
        _hermetic(mp, _empty_dir)
        return load_run(GENUINE_RUN_DIR)


@pytest.fixture(scope="session")
def genuine_tokens() -> torch.Tensor:
    """The fixture's samples, int64 (8, 64) (read-only)."""
    return torch.load(GENUINE / "reference" / "tokens.pt", weights_only=True)


@pytest.fixture
def spd_out_copy(tmp_path: Path) -> Iterator[Path]:
    """A writable copy of the genuine fixture's ``spd_out`` folder (runs and pretrain cache)."""
    dest = tmp_path / "spd_out"
    shutil.copytree(GENUINE_OUT, dest)
    yield dest
