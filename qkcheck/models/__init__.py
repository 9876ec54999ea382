"""The target architectures: spd's pretrain models, each capturing attention inputs and logits."""

from qkcheck.models.base import AttentionSpec, Capture
from qkcheck.models.common import TargetModel
from qkcheck.models.gpt2_simple import GPT2Simple
from qkcheck.models.llama_simple import LlamaSimple
from qkcheck.models.llama_simple_mlp import LlamaSimpleMLP
from qkcheck.models.registry import SUPPORTED_MODELS, build_target_model, resolve_model_class

__all__ = [
    "SUPPORTED_MODELS",
    "AttentionSpec",
    "Capture",
    "GPT2Simple",
    "LlamaSimple",
    "LlamaSimpleMLP",
    "TargetModel",
    "build_target_model",
    "resolve_model_class",
]
