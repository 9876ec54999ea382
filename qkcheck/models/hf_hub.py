"""Where a Hugging Face target's files are: a local folder, the HF hub cache, or a download.

``pretrained_model_name`` (spd) / ``target.spec.model_name`` (param-decomp) is either a
local folder holding ``config.json`` or a hub name ``org/name``. A hub name is looked up in
the hub cache layout ``models--org--name/snapshots/<rev>/`` (the revision ``refs/main``
names, else the only or newest snapshot) under, in order: ``$HF_HUB_CACHE``,
``$HF_HOME/hub``, ``~/.cache/huggingface/hub``. Only when none has it and downloads are
allowed (``QKCHECK_HF_DOWNLOAD=1``, and ``HF_HUB_OFFLINE`` unset) is it fetched with
``huggingface_hub.snapshot_download`` — config and safetensors only.
"""

from __future__ import annotations

import os
from pathlib import Path

from qkcheck.errors import RunNotFoundError

#: the files a target needs from a snapshot (tokenizer files for labels)
SNAPSHOT_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*")
DOWNLOAD_ENV = "QKCHECK_HF_DOWNLOAD"


def hub_caches() -> list[Path]:
    """The hub cache folders looked in, in order (duplicates dropped)."""
    out: list[Path] = []
    if os.environ.get("HF_HUB_CACHE"):
        out.append(Path(os.environ["HF_HUB_CACHE"]).expanduser())
    if os.environ.get("HF_HOME"):
        out.append(Path(os.environ["HF_HOME"]).expanduser() / "hub")
    out.append(Path.home() / ".cache" / "huggingface" / "hub")
    return list(dict.fromkeys(out))


def downloads_allowed() -> bool:
    return os.environ.get(DOWNLOAD_ENV) == "1" and not os.environ.get("HF_HUB_OFFLINE")


def _download(name: str) -> Path:  # replaced by a fake in tests
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name, allow_patterns=list(SNAPSHOT_PATTERNS)))


def find_snapshot(name: str, *, revision: str = "main", near: Path | None = None) -> Path:
    """The folder holding ``name``'s ``config.json`` (see the module docstring).

    ``near``: a run folder; a relative local path is also tried against it. Raises
    RunNotFoundError listing every place looked and how to fix it."""
    tried: list[str] = []
    local = Path(name).expanduser()
    for candidate in [local] + (
        [near / local] if near is not None and not local.is_absolute() else []
    ):
        if (candidate / "config.json").is_file():
            return candidate
        tried.append(
            f"{candidate} ({'no config.json' if candidate.is_dir() else 'no such folder'})"
        )
    if name.count("/") <= 1 and not name.startswith((".", "/", "~")):
        folder = "models--" + name.replace("/", "--")
        for cache in hub_caches():
            repo = cache / folder
            snap = _snapshot_in(repo, revision)
            if snap is not None:
                return snap
            tried.append(
                f"{repo} ({'no snapshot with config.json' if repo.is_dir() else 'missing'})"
            )
        if downloads_allowed():
            try:
                snap = _download(name)
            except Exception as e:  # network, auth, missing repo: all end here
                raise RunNotFoundError(f"downloading HF model {name!r} failed: {e}") from e
            if (snap / "config.json").is_file():
                return snap
            tried.append(f"download into {snap} (no config.json)")
        else:
            tried.append(f"download (off: set {DOWNLOAD_ENV}=1 to allow it)")
    raise RunNotFoundError(
        f"cannot find the HF target {name!r}; looked in: {'; '.join(tried)}. Fix: point "
        "HF_HUB_CACHE at a hub cache holding it, give a local folder with config.json and "
        f"safetensors, or allow downloading with {DOWNLOAD_ENV}=1"
    )


def _snapshot_in(repo: Path, revision: str) -> Path | None:
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / revision
    if ref.is_file():
        snap = snapshots / ref.read_text().strip()
        if (snap / "config.json").is_file():
            return snap
    if (snapshots / revision / "config.json").is_file():  # a commit hash given as revision
        return snapshots / revision
    found = [p for p in snapshots.iterdir() if (p / "config.json").is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None
