"""A run directory reached through a symlink resolves like the real one."""

from __future__ import annotations

import os

from qkcheck.runs import load_run
from qkcheck.runs.resolve import DEMO_ROOT


def test_a_symlinked_run_directory_resolves(tmp_path):
    (real,) = (DEMO_ROOT / "spd").iterdir()
    link = tmp_path / "link"
    os.symlink(real, link)
    run = load_run(link)
    assert run.name == real.name
    assert run.files.pretrain_dir.resolve().parent == (DEMO_ROOT / "pretrain_cache").resolve()
    (checkpoint,) = link.glob("model_*.pth")
    assert load_run(checkpoint).name == real.name


def test_a_symlinked_output_root_keeps_the_run_inside_it(tmp_path):
    root = tmp_path / "root"
    os.symlink(DEMO_ROOT, root)
    (real,) = (DEMO_ROOT / "spd").iterdir()
    run = load_run(root / "spd" / real.name)
    assert run.files.pretrain_dir.parent == root / "pretrain_cache"
