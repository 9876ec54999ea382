"""Read arrays of an orbax checkpoint item with tensorstore alone (no jax, no orbax).

An item directory (``ckpts/<step>/decomposition/``, or ``ckpts/<step>/default/`` in older
runs) holds ``_METADATA`` — JSON whose ``tree_metadata`` maps each leaf's tree path to its
``value_metadata.write_shape``, and whose ``use_zarr3`` says how arrays are encoded — and an
OCDBT key-value store (``manifest.ocdbt``, ``ocdbt.process_*/``) in which each array is a
zarr (v2, or v3 when ``use_zarr3``) array keyed by its tree path joined with dots, e.g.
``components.stacks.q_proj.0``. A checkpoint is complete once ``commit_success.txt`` is
written (per step and per item).

Reading is lazy: :meth:`CheckpointItem.read` opens one array and reads only the requested
index along its first axis (tensorstore fetches the chunks that slice touches).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from qkcheck.errors import CheckpointError

METADATA = "_METADATA"
COMMIT_SUCCESS = "commit_success.txt"
#: item names, newest layout first
ITEM_NAMES = ("decomposition", "default")


def _tensorstore():
    try:
        import tensorstore as ts  # optional extra: pip install 'qkcheck[param-decomp]'
    except ImportError:
        raise CheckpointError(
            "reading param-decomp checkpoints needs tensorstore: "
            "pip install 'qkcheck[param-decomp]'"
        ) from None
    return ts


def find_item(step_dir: Path) -> Path:
    """The decomposition item of a checkpoint step directory, checked for completeness."""
    if not (step_dir / COMMIT_SUCCESS).is_file():
        raise CheckpointError(
            f"{step_dir}: no {COMMIT_SUCCESS}: the checkpoint was not completely written "
            "(interrupted save?); pick another step with @STEP"
        )
    for name in ITEM_NAMES:
        item = step_dir / name
        if item.is_dir():
            return item
    present = sorted(p.name for p in step_dir.iterdir())
    raise CheckpointError(
        f"{step_dir}: no checkpoint item {' or '.join(ITEM_NAMES)}/; the directory holds {present}"
    )


@dataclass(frozen=True)
class CheckpointItem:
    """One orbax item directory; arrays keyed by dotted tree path."""

    dir: Path

    @cached_property
    def metadata(self) -> dict[str, Any]:
        path = self.dir / METADATA
        if not path.is_file():
            raise CheckpointError(
                f"{path}: missing: the checkpoint item has no {METADATA} (partial or corrupt "
                "checkpoint)"
            )
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not readable JSON: {e}") from e
        if not isinstance(data, dict) or not isinstance(data.get("tree_metadata"), dict):
            raise CheckpointError(f"{path}: no 'tree_metadata' mapping (not an orbax {METADATA})")
        return data

    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Dotted array key -> shape as ``_METADATA`` records it."""
        out = {}
        for entry in self.metadata["tree_metadata"].values():
            try:
                key = ".".join(str(k["key"]) for k in entry["key_metadata"])
                shape = tuple(int(d) for d in entry["value_metadata"]["write_shape"])
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(
                    f"{self.dir / METADATA}: malformed tree_metadata entry {entry!r}"
                ) from e
            out[key] = shape
        return out

    @property
    def zarr_driver(self) -> str:
        return "zarr3" if self.metadata.get("use_zarr3") else "zarr"

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self.shapes:
            raise CheckpointError(
                f"{self.dir / METADATA}: no array {key!r} in the checkpoint; arrays: "
                f"{', '.join(sorted(self.shapes))}"
            )
        return self.shapes[key]

    def _open(self, key: str):
        ts = _tensorstore()
        if not (self.dir / "manifest.ocdbt").is_file():
            raise CheckpointError(
                f"{self.dir / 'manifest.ocdbt'}: missing: the item's array store is gone "
                f"(cannot read array {key!r})"
            )
        spec = {
            "driver": self.zarr_driver,
            "kvstore": {"driver": "ocdbt", "base": f"file://{self.dir.resolve()}/"},
            "path": key,
            "open": True,
        }
        try:
            return ts.open(spec, read=True).result()
        except Exception as e:  # tensorstore raises ValueError/RuntimeError with status text
            raise CheckpointError(
                f"{self.dir}: array {key!r} is listed in {METADATA} but cannot be opened: "
                f"{_first_line(e)}"
            ) from e

    def read(self, key: str, index: int | None = None) -> np.ndarray:
        """Array ``key`` (or only its slice ``[index]`` along the first axis), as numpy."""
        expected = self.shape(key)
        store = self._open(key)
        if tuple(store.shape) != expected:
            raise CheckpointError(
                f"{self.dir}: array {key!r} has shape {tuple(store.shape)} in the store but "
                f"{expected} in {METADATA}"
            )
        view = store if index is None else store[index]
        try:
            return np.asarray(view.read().result())
        except Exception as e:
            raise CheckpointError(
                f"{self.dir}: array {key!r}: cannot read its data (truncated or corrupt chunk): "
                f"{_first_line(e)}"
            ) from e


def _first_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]
