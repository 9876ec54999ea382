"""Run references → files on disk.

An SPD run is named by ``"demo"``, a run directory, a checkpoint file, or a W&B reference
(``wandb:entity/project/runs/id``, ``entity/project/runs/id``, ``entity/project/id``,
``https://wandb.ai/entity/project/runs/id…`` or a bare id such as ``s-55ea3f9b``, meaning
``goodfire/spd``). A trailing ``@STEP`` on any of them picks a checkpoint step.

W&B references are looked up offline first, in "output roots" laid out like spd's
``SPD_OUT_DIR``::

    <root>/runs/<project>-<run_id>/            spd's cache of downloaded SPD runs
    <root>/spd/<run_id>/                       spd's local run outputs
    <root>/pretrain_cache/<project>-<run_id>/  spd's cache of pretrain (target model) runs

The roots, in order: the root the run itself sits in (so a run keeps finding its pretrain
run beside it — this is how the demo run works), ``$SPD_OUT_DIR`` (default ``~/spd_out``),
and qkcheck's own cache ``$QKCHECK_CACHE`` (default ``~/.cache/qkcheck``), laid out the same
way. An SPD run is also looked for where spd's own ``fetch_wandb_run_dir`` downloads it,
``<spd repo>/wandb/<run_id>/files/`` (or the one ``<spd repo>/wandb/*<run_id>/files/`` that a
local W&B run leaves), with ``<spd repo>`` being ``$SPD_REPO_ROOT`` when set and the current
directory. Only then, when the optional ``wandb`` package is installed, a run is downloaded
into qkcheck's cache. Every failure lists every place tried.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from qkcheck.errors import CheckpointError, ConfigError, RunNotFoundError

#: The embedded demo run: a folder laid out like ``SPD_OUT_DIR`` holding exactly one run
#: under ``spd/<run_id>/`` and its target model under ``pretrain_cache/<project>-<run_id>/``.
DEMO_ROOT = Path(__file__).resolve().parent.parent / "demo" / "run"

DEFAULT_ENTITY = "goodfire"
DEFAULT_PROJECT = "spd"
SPD_CONFIG_NAME = "final_config.yaml"
MODEL_CONFIG_NAME = "model_config.yaml"
TOKENIZER_NAME = "tokenizer.json"
SAMPLES_NAMES = ("samples.pt", "samples.npy")
CLUSTER_OUT_DIR = Path(
    "/mnt/polished-lake/artifacts/mechanisms/spd"
)  # spd's default on its cluster

# spd's run id: 8 characters, optionally with a one-character type prefix ("s-", "t-").
_RUN_ID = r"(?:[a-z0-9]-)?[a-z0-9]{8}"
_BARE_ID_RE = re.compile(rf"^{_RUN_ID}$")
_PATH_RE = re.compile(rf"^([^/\s]+)/([^/\s]+)/(?:runs/)?({_RUN_ID})$")
_URL_RE = re.compile(rf"^https://wandb\.ai/([^/]+)/([^/]+)/runs/({_RUN_ID})(?:/[^?]*)?(?:\?.*)?$")
_STEP_SUFFIX_RE = re.compile(r"^(.+)@(\d+)$")
SPD_CHECKPOINT_RE = re.compile(r"^model(?:_(\d+))?\.pth$")
PRETRAIN_CHECKPOINT_RE = re.compile(r"^model_step_(\d+)\.pt$")

_REFERENCE_FORMS = (
    '"demo", a run directory, a model_<step>.pth file, "wandb:entity/project/runs/ID", '
    '"entity/project/runs/ID", "https://wandb.ai/entity/project/runs/ID" or a bare run id '
    'such as "s-55ea3f9b" (goodfire/spd), optionally followed by "@STEP"'
)


@dataclass(frozen=True)
class WandbRef:
    """A W&B run: ``entity/project/run_id``."""

    entity: str
    project: str
    run_id: str

    def __str__(self) -> str:
        return f"{self.entity}/{self.project}/runs/{self.run_id}"

    @property
    def cache_name(self) -> str:
        """The folder name spd's caches use: ``<project>-<run_id>``."""
        return f"{self.project}-{self.run_id}"


def parse_wandb_ref(reference: str) -> WandbRef | None:
    """Parse every W&B run reference form spd accepts, plus a bare id; None if not one."""
    s = reference.strip().removeprefix("wandb:")
    if _BARE_ID_RE.match(s):
        return WandbRef(DEFAULT_ENTITY, DEFAULT_PROJECT, s)
    if m := _PATH_RE.match(s) or _URL_RE.match(s):
        return WandbRef(m.group(1), m.group(2), m.group(3))
    return None


@dataclass(frozen=True)
class SPDRunFiles:
    """The files of one SPD run, at one checkpoint step."""

    run_dir: Path
    config: Path
    checkpoint: Path
    step: int | None  # None: an unnumbered ``model.pth``
    name: str  # the run id when known, else the directory name
    root: Path | None  # the SPD_OUT_DIR-like folder the run sits in, if any

    @property
    def samples(self) -> Path | None:
        """A samples file shipped in the run directory (the demo run has one)."""
        return next((p for n in SAMPLES_NAMES if (p := self.run_dir / n).is_file()), None)


@dataclass(frozen=True)
class PretrainFiles:
    """The files of the pretrain run that produced the target model."""

    dir: Path
    model_config: Path | None  # None: the architecture is nested in ``config`` under "model"
    config: Path | None
    checkpoint: Path | None
    tokenizer: Path | None


# --- where to look ---------------------------------------------------------------------------


def spd_out_dirs() -> list[Path]:
    """spd's output folders: ``$SPD_OUT_DIR`` if set, else ``~/spd_out`` and spd's cluster path."""
    if env := os.environ.get("SPD_OUT_DIR"):
        return [Path(env).expanduser()]
    dirs = [Path.home() / "spd_out"]
    if CLUSTER_OUT_DIR.exists():
        dirs.insert(0, CLUSTER_OUT_DIR)
    return dirs


def qkcheck_cache_dir() -> Path:
    """qkcheck's cache, laid out like SPD_OUT_DIR: ``$QKCHECK_CACHE`` or ``~/.cache/qkcheck``."""
    if env := os.environ.get("QKCHECK_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "qkcheck"


def wandb_download_dirs() -> list[Path]:
    """spd's W&B download folders ``<spd repo>/wandb``: ``$SPD_REPO_ROOT/wandb`` when set, then
    ``./wandb`` (spd's repo root is where its scripts run)."""
    bases = [Path(env).expanduser() for env in [os.environ.get("SPD_REPO_ROOT")] if env]
    bases.append(Path.cwd())
    unique: list[Path] = []
    for base in bases:
        if (folder := base / "wandb") not in unique:
            unique.append(folder)
    return unique


def _wandb_run_dirs(base: Path, run_id: str) -> list[Path]:
    """Where spd's ``fetch_wandb_run_dir`` keeps ``run_id``'s files under ``base``:
    ``<id>/files``, or ``<name ending in id>/files`` when exactly one such folder exists."""
    dirs = [base / run_id / "files"]
    if base.is_dir():
        ending = [d for d in base.iterdir() if d.is_dir() and d.name.endswith(run_id)]
        if len(ending) == 1 and ending[0].name != run_id:
            dirs.append(ending[0] / "files")
    return dirs


def _search_roots(near: Path | None = None) -> list[Path]:
    roots = ([near] if near is not None else []) + spd_out_dirs() + [qkcheck_cache_dir()]
    unique: list[Path] = []
    for root in roots:
        if root not in unique:
            unique.append(root)
    return unique


def _root_of(run_dir: Path) -> Path | None:
    """The SPD_OUT_DIR-like root of ``<root>/spd/<id>`` or ``<root>/runs/<project>-<id>``."""
    return run_dir.parent.parent if run_dir.parent.name in ("spd", "runs") else None


class _Tried:
    """Every place a lookup tried, with why each failed, for one RunNotFoundError."""

    def __init__(self) -> None:
        self.places: list[str] = []

    def add(self, place: object, why: str) -> None:
        self.places.append(f"  - {place} ({why})")

    def error(self, what: str, fix: str) -> RunNotFoundError:
        tried = "\n".join(self.places) or "  (nothing)"
        return RunNotFoundError(f"cannot find {what}. Tried:\n{tried}\nFix: {fix}")


# --- SPD runs --------------------------------------------------------------------------------


def split_step(source: str, step: int | None) -> tuple[str, int | None]:
    """Split ``"REF@400"`` into ``("REF", 400)``; an explicit ``step`` must agree with it."""
    m = _STEP_SUFFIX_RE.match(source)
    if m is None or Path(source).exists():
        return source, step
    suffix_step = int(m.group(2))
    if step is not None and step != suffix_step:
        raise RunNotFoundError(
            f"run reference {source!r} asks for step {suffix_step} but step={step} was passed; "
            "give the step once"
        )
    return m.group(1), suffix_step


def resolve_run(source: str | os.PathLike[str], step: int | None = None) -> SPDRunFiles:
    """Find an SPD run's config and checkpoint (the latest step unless ``step`` is given)."""
    text, step = split_step(os.fspath(source), step)
    if text == "demo":
        return _resolve_demo(step)
    path = Path(text).expanduser()
    if path.is_dir():
        return run_files_from_dir(path, step)
    if path.is_file():
        return _run_files_from_checkpoint(path, step)
    ref = parse_wandb_ref(text)
    if ref is None:
        raise RunNotFoundError(
            f"run reference {text!r} is neither an existing file or directory "
            f"(looked for {path.resolve()}) nor a W&B reference. Give one of: {_REFERENCE_FORMS}"
        )
    return _resolve_wandb_run(ref, step)


def _resolve_demo(step: int | None) -> SPDRunFiles:
    runs = sorted(p for p in (DEMO_ROOT / "spd").glob("*") if p.is_dir())
    if len(runs) != 1:
        found = f"found {[p.name for p in runs]}" if runs else "found none"
        raise RunNotFoundError(
            f"the demo run is not built: expected one run directory under {DEMO_ROOT / 'spd'} "
            f"({found}). Fix: build it with the script in qkcheck/demo/, or reinstall qkcheck"
        )
    return run_files_from_dir(runs[0], step)


def run_files_from_dir(
    run_dir: Path, step: int | None = None, name: str | None = None
) -> SPDRunFiles:
    """The config and checkpoint in one run directory (latest step unless ``step``)."""
    config = run_dir / SPD_CONFIG_NAME
    if not config.is_file():
        present = sorted(p.name for p in run_dir.iterdir())
        raise ConfigError(
            f"{run_dir}: no {SPD_CONFIG_NAME} (spd writes it beside model_<step>.pth); "
            f"the directory holds {present}"
        )
    checkpoint, found_step = _pick_checkpoint(run_dir, SPD_CHECKPOINT_RE, step, "model_<step>.pth")
    located = _located(run_dir)
    return SPDRunFiles(
        run_dir=run_dir,
        config=config,
        checkpoint=checkpoint,
        step=found_step,
        name=name or _run_name(located),
        root=_root_of(located),
    )


def _located(run_dir: Path) -> Path:
    """Where a run directory sits, for its root and name: as given when that is inside an
    output root, else where a symlink (to it or to a folder above it) really points."""
    return run_dir if _root_of(run_dir) is not None else run_dir.resolve()


def _run_name(run_dir: Path) -> str:
    # spd's cache folders are "<project>-<run_id>"; every other run folder is named as it is.
    m = re.match(rf"^.+-({_RUN_ID})$", run_dir.name)
    return m.group(1) if m and run_dir.parent.name == "runs" else run_dir.name


def _run_files_from_checkpoint(path: Path, step: int | None) -> SPDRunFiles:
    m = SPD_CHECKPOINT_RE.match(path.name)
    file_step = int(m.group(1)) if m and m.group(1) else None
    if step is not None and step != file_step:
        raise RunNotFoundError(
            f"{path} is the checkpoint of step {file_step}, but step {step} was asked for; "
            "pass the run directory to pick a step"
        )
    config = path.parent / SPD_CONFIG_NAME
    if not config.is_file():
        raise ConfigError(f"{path}: no {SPD_CONFIG_NAME} beside the checkpoint")
    run_dir = path.parent
    located = _located(run_dir)
    return SPDRunFiles(run_dir, config, path, file_step, _run_name(located), _root_of(located))


def _pick_checkpoint(
    folder: Path, pattern: re.Pattern[str], step: int | None, what: str
) -> tuple[Path, int | None]:
    """The checkpoint of ``step`` in ``folder``, or the one with the largest step."""
    found: dict[int | None, Path] = {}
    for p in folder.iterdir():
        if p.is_file() and (m := pattern.match(p.name)):
            found[int(m.group(1)) if m.group(1) else None] = p
    if not found:
        present = sorted(p.name for p in folder.iterdir())
        raise CheckpointError(f"{folder}: no checkpoint {what}; the directory holds {present}")
    steps = sorted(s for s in found if s is not None)
    if step is not None:
        if step not in found:
            raise CheckpointError(
                f"{folder}: no checkpoint for step {step}; steps present: {steps}"
            )
        return found[step], step
    latest = steps[-1] if steps else None
    return found[latest], latest


def _resolve_wandb_run(ref: WandbRef, step: int | None) -> SPDRunFiles:
    tried = _Tried()
    for root in _search_roots():
        for run_dir in (root / "runs" / ref.cache_name, root / "spd" / ref.run_id):
            if _has(run_dir, SPD_CONFIG_NAME, tried):
                return run_files_from_dir(run_dir, step, name=ref.run_id)
    for base in wandb_download_dirs():
        for run_dir in _wandb_run_dirs(base, ref.run_id):
            if _has(run_dir, SPD_CONFIG_NAME, tried):
                return run_files_from_dir(run_dir, step, name=ref.run_id)
    dest = qkcheck_cache_dir() / "runs" / ref.cache_name
    run_dir = _try_download(tried, dest, lambda tmp: _download_spd_run(ref, tmp, step))
    if run_dir is not None:
        return run_files_from_dir(run_dir, step, name=ref.run_id)
    raise tried.error(
        f"SPD run {ref}",
        "set SPD_OUT_DIR to the spd output folder that holds the run (or SPD_REPO_ROOT to "
        "the spd checkout whose wandb/ holds it), pass the run directory or its "
        "model_<step>.pth instead, or `pip install 'qkcheck[wandb]'` and `wandb login` "
        "to download it",
    )


def _has(folder: Path, file_name: str, tried: _Tried) -> bool:
    if not folder.is_dir():
        tried.add(folder, "no such directory")
        return False
    if not (folder / file_name).is_file():
        tried.add(folder, f"no {file_name}")
        return False
    return True


# --- pretrain (target model) runs ------------------------------------------------------------


def resolve_pretrain(reference: str | os.PathLike[str], near: Path | None = None) -> PretrainFiles:
    """Find the pretrain run that gives the target architecture (and weights, tokenizer).

    ``reference`` is a W&B reference, a pretrain output directory, or a checkpoint file
    (spd's local layout keeps the configs two levels up: ``<out>/checkpoints/model_step_N.pt``).
    ``near``: the output root of the SPD run, searched first.
    """
    text = os.fspath(reference)
    tried = _Tried()
    path = Path(text).expanduser()
    if path.is_file():
        for folder in (path.parent, path.parent.parent):
            if _pretrain_config_in(folder):
                return _pretrain_files(folder, checkpoint=path)
            tried.add(folder, f"no {MODEL_CONFIG_NAME} or {SPD_CONFIG_NAME}")
    elif path.is_dir():
        if _pretrain_config_in(path):
            return _pretrain_files(path)
        tried.add(path, f"no {MODEL_CONFIG_NAME} or {SPD_CONFIG_NAME}")
    ref = parse_wandb_ref(text)
    if not path.exists() and ref is None:
        tried.add(path.resolve(), "no such file or directory")
    if ref is not None:
        for root in _search_roots(near):
            folder = root / "pretrain_cache" / ref.cache_name
            if _has(folder, MODEL_CONFIG_NAME, tried):
                return _pretrain_files(folder)
        dest = qkcheck_cache_dir() / "pretrain_cache" / ref.cache_name
        folder = _try_download(tried, dest, lambda tmp: _download_pretrain_run(ref, tmp))
        if folder is not None:
            return _pretrain_files(folder)
    raise tried.error(
        f"the target model's pretrain run {text!r}",
        "set SPD_OUT_DIR to the spd output folder whose pretrain_cache/ holds it, or pass "
        "load_run(..., pretrain=PATH) with its directory (model_config.yaml) or checkpoint",
    )


def _pretrain_config_in(folder: Path) -> bool:
    return (folder / MODEL_CONFIG_NAME).is_file() or (folder / SPD_CONFIG_NAME).is_file()


def _pretrain_files(folder: Path, checkpoint: Path | None = None) -> PretrainFiles:
    if checkpoint is None:
        for place in (folder, folder / "checkpoints"):
            if place.is_dir() and any(
                PRETRAIN_CHECKPOINT_RE.match(p.name) for p in place.iterdir()
            ):
                checkpoint, _ = _pick_checkpoint(place, PRETRAIN_CHECKPOINT_RE, None, "")
                break

    def optional(name: str) -> Path | None:
        return p if (p := folder / name).is_file() else None

    return PretrainFiles(
        dir=folder,
        model_config=optional(MODEL_CONFIG_NAME),
        config=optional(SPD_CONFIG_NAME),
        checkpoint=checkpoint,
        tokenizer=optional(TOKENIZER_NAME),
    )


# --- W&B downloads (optional; never exercised by the tests) ----------------------------------


class _DownloadUnavailable(Exception):
    """Why a download was not possible; becomes one line of a RunNotFoundError."""


def _try_download(tried: _Tried, dest: Path, download: Callable[[Path], None]) -> Path | None:
    """Download into a temporary folder beside ``dest``, then move it into place."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        tried.add("W&B download", f"skipped: WANDB_MODE={os.environ['WANDB_MODE']}")
        return None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".partial-") as tmp:
            download(Path(tmp))
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(tmp, dest)
    except _DownloadUnavailable as e:
        tried.add("W&B download", str(e))
        return None
    except OSError as e:
        tried.add(f"W&B download into {dest}", f"{type(e).__name__}: {e}")
        return None
    return dest


def _wandb_files(ref: WandbRef) -> list[object]:
    try:
        import wandb  # optional extra: pip install 'qkcheck[wandb]'
    except ImportError:
        raise _DownloadUnavailable("wandb is not installed: pip install 'qkcheck[wandb]'") from None
    try:
        run = wandb.Api(timeout=60).run(f"{ref.entity}/{ref.project}/{ref.run_id}")
        return list(run.files())
    except Exception as e:  # the W&B client raises many types: auth, network, not found
        raise _DownloadUnavailable(f"W&B lookup of {ref} failed: {type(e).__name__}: {e}") from e


def _download(files: Sequence[object], names: Sequence[str], dest: Path) -> None:
    by_name = {f.name: f for f in files}  # type: ignore[attr-defined]
    for name in names:
        try:
            by_name[name].download(root=str(dest), replace=True)  # type: ignore[attr-defined]
        except Exception as e:
            raise _DownloadUnavailable(f"W&B download of {name} failed: {e}") from e


def _latest(names: Sequence[str], pattern: re.Pattern[str], step: int | None) -> str | None:
    numbered = {int(m.group(1)): n for n in names if (m := pattern.match(n)) and m.group(1)}
    if step is not None:
        return numbered.get(step)
    if numbered:
        return numbered[max(numbered)]
    return next((n for n in names if pattern.match(n)), None)


def _download_spd_run(ref: WandbRef, dest: Path, step: int | None) -> None:
    files = _wandb_files(ref)
    names = [f.name for f in files]  # type: ignore[attr-defined]
    checkpoint = _latest(names, SPD_CHECKPOINT_RE, step)
    if SPD_CONFIG_NAME not in names or checkpoint is None:
        raise _DownloadUnavailable(
            f"W&B run {ref} has no {SPD_CONFIG_NAME} and model_<step>.pth"
            + (f" for step {step}" if step is not None else "")
            + f" (files: {sorted(names)})"
        )
    _download(files, [SPD_CONFIG_NAME, checkpoint], dest)


def _download_pretrain_run(ref: WandbRef, dest: Path) -> None:
    files = _wandb_files(ref)
    names = [f.name for f in files]  # type: ignore[attr-defined]
    checkpoint = _latest(names, PRETRAIN_CHECKPOINT_RE, None)
    if MODEL_CONFIG_NAME not in names:
        raise _DownloadUnavailable(f"W&B run {ref} has no {MODEL_CONFIG_NAME} (files: {names})")
    wanted = [MODEL_CONFIG_NAME, checkpoint, SPD_CONFIG_NAME, TOKENIZER_NAME]
    _download(files, [n for n in wanted if n in names], dest)
