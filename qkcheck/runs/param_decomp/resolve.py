"""param-decomp run references → a run directory and a checkpoint step directory.

A param-decomp run is named by its id ``p-xxxxxxxx`` (8 hex digits), a W&B reference
(``wandb:goodfire/param-decomp/runs/p-…``, ``goodfire/<project>/runs/p-…``,
``https://wandb.ai/goodfire/<project>/runs/p-…``) or its directory (one holding
``launch_config.yaml`` and ``ckpts/``), optionally followed by ``@STEP``.

Ids are looked up in output roots laid out like param-decomp's ``PARAM_DECOMP_OUT_DIR``::

    <root>/runs/<run_id>/{launch_config.yaml, ckpts/<step>/}
    <root>/pretrain_cache/<project>-<run_id>/   the target's pretrain run (LlamaSimpleMLP)

The roots, in order: ``$PARAM_DECOMP_OUT_DIR``, then qkcheck's cache (``$QKCHECK_CACHE``,
default ``~/.cache/qkcheck``). Runs are never downloaded.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from qkcheck.errors import CheckpointError, RunNotFoundError
from qkcheck.runs.resolve import qkcheck_cache_dir, split_step

LAUNCH_CONFIG = "launch_config.yaml"
CKPTS = "ckpts"
ENV_OUT_DIR = "PARAM_DECOMP_OUT_DIR"

_ID = r"p-[0-9a-f]{8}"
_BARE_RE = re.compile(rf"^{_ID}$")
_PATH_RE = re.compile(rf"^(?:wandb:)?([^/\s:]+)/([^/\s]+)/(?:runs/)?({_ID})$")
_URL_RE = re.compile(rf"^https?://(?:www\.)?wandb\.ai/([^/]+)/([^/]+)/runs/({_ID})(?:[/?#].*)?$")

REFERENCE_FORMS = (
    '"p-xxxxxxxx", "wandb:goodfire/param-decomp/runs/p-xxxxxxxx", '
    '"goodfire/param-decomp/runs/p-xxxxxxxx", "https://wandb.ai/goodfire/param-decomp/runs/'
    'p-xxxxxxxx", or a run directory holding launch_config.yaml, optionally followed by "@STEP"'
)


@dataclass(frozen=True)
class ParamDecompFiles:
    """Where a param-decomp run was found, and the chosen checkpoint step."""

    run_id: str
    run_dir: Path
    launch_config: Path
    step: int
    step_dir: Path
    steps: tuple[int, ...]  # every step present
    root: Path | None  # the output root the run sits in (<root>/runs/<id>), if any


def run_id_of(text: str) -> str | None:
    """The ``p-…`` id of a reference in any id/W&B form, else None."""
    if _BARE_RE.match(text):
        return text
    for pattern in (_PATH_RE, _URL_RE):
        if m := pattern.match(text):
            return m.group(3)
    return None


def is_param_decomp(source: str | os.PathLike[str]) -> bool:
    """True when ``source`` names a param-decomp run (a ``p-`` id form, or a directory
    holding ``launch_config.yaml``), with or without ``@STEP``."""
    text, _ = split_step(os.fspath(source), None)
    if run_id_of(text) is not None:
        return True
    path = Path(text).expanduser()
    return path.is_dir() and (path / LAUNCH_CONFIG).is_file()


def output_roots() -> list[Path]:
    roots = []
    if env := os.environ.get(ENV_OUT_DIR):
        roots.append(Path(env).expanduser())
    roots.append(qkcheck_cache_dir())
    return roots


def resolve_param_decomp(
    source: str | os.PathLike[str], step: int | None = None
) -> ParamDecompFiles:
    """Find a param-decomp run and its checkpoint step (the latest unless ``step``)."""
    text, step = split_step(os.fspath(source), step)
    path = Path(text).expanduser()
    if path.is_dir() and (path / LAUNCH_CONFIG).is_file():
        return _from_dir(path, step, run_id_of(path.name) or path.name)
    run_id = run_id_of(text)
    if run_id is None:
        raise RunNotFoundError(
            f"run reference {text!r} is not a param-decomp run; give one of: {REFERENCE_FORMS}"
        )
    tried = []
    for root in output_roots():
        run_dir = root / "runs" / run_id
        if (run_dir / LAUNCH_CONFIG).is_file():
            return _from_dir(run_dir, step, run_id)
        why = "no such directory" if not run_dir.is_dir() else f"no {LAUNCH_CONFIG}"
        tried.append(f"{run_dir} ({why})")
    env = "" if os.environ.get(ENV_OUT_DIR) else f"; ${ENV_OUT_DIR} is not set"
    raise RunNotFoundError(
        f"cannot find param-decomp run {run_id}: tried {'; '.join(tried)}{env}. Fix: set "
        f"{ENV_OUT_DIR} to the folder whose runs/ holds it, or pass the run directory"
    )


def _from_dir(run_dir: Path, step: int | None, run_id: str) -> ParamDecompFiles:
    ckpts = run_dir / CKPTS
    steps = (
        sorted(int(p.name) for p in ckpts.iterdir() if p.is_dir() and p.name.isdigit())
        if ckpts.is_dir()
        else []
    )
    if not steps:
        raise CheckpointError(f"{ckpts}: no checkpoint step directories (ckpts/<step>/)")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(
            f"{ckpts}: no checkpoint for step {step}; steps present: {', '.join(map(str, steps))}"
        )
    root = run_dir.parent.parent if run_dir.parent.name == "runs" else None
    return ParamDecompFiles(
        run_id=run_id,
        run_dir=run_dir,
        launch_config=run_dir / LAUNCH_CONFIG,
        step=step,
        step_dir=ckpts / str(step),
        steps=tuple(steps),
        root=root,
    )
