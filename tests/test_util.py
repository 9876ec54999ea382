"""Shared helpers: atomic writes leave a whole file or the old one, never a partial or a
stray temporary; ids and names have one format."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from qkcheck.util import atomic_path, item_id, safe_name, write_atomic


@pytest.mark.parametrize("data", ["‖Δ‖ text\n", b"\x00\x01bytes"])
def test_write_atomic_writes_text_or_bytes_world_readable(tmp_path: Path, data) -> None:
    path = tmp_path / "new" / "folder" / "file.json"
    assert write_atomic(path, data) == path
    assert (
        path.read_text(encoding="utf-8") if isinstance(data, str) else path.read_bytes()
    ) == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["file.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_path(path) as tmp:
        tmp.write_text("half")
        assert tmp.parent == path.parent and tmp.suffix == ".json" and tmp != path
        raise RuntimeError("disk on fire")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_item_ids_and_safe_names() -> None:
    assert item_id(1, 3, 17) == "L1-S3-Q17"
    assert safe_name("wandb:goodfire/spd/s-1 a.b_c") == "wandb-goodfire-spd-s-1-a.b_c"
