"""param-decomp runs (spd's JAX successor): orbax checkpoints read with tensorstore alone.

Modules: :mod:`.resolve` (references → run directory and step), :mod:`.launch_config`
(``launch_config.yaml``), :mod:`.orbax` (checkpoint items), :mod:`.sites` (stack slices →
modules), :mod:`.target` (the target model), :mod:`.samples` (the run's parquet data set),
:mod:`.run` (the Run adapter).
"""

from qkcheck.runs.param_decomp.resolve import is_param_decomp
from qkcheck.runs.param_decomp.run import ParamDecompRun, load_param_decomp_run

__all__ = ["ParamDecompRun", "is_param_decomp", "load_param_decomp_run"]
