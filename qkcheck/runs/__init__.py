"""Loading SPD runs: references → files (resolve), configs, checkpoints, the Run object."""

from qkcheck.runs.resolve import DEMO_ROOT, WandbRef, parse_wandb_ref
from qkcheck.runs.run import Run, RunFiles, load_run

__all__ = ["DEMO_ROOT", "Run", "RunFiles", "WandbRef", "load_run", "parse_wandb_ref"]
