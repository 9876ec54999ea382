"""Ground-truth accuracy and closure on tiny HF targets (Llama llama3/GQA/biases, Qwen3
QK-norm, GPT-2 fused c_attn), float32 and bf16 target weights.

    .venv/bin/python bench/hf_accuracy.py

Per class: max |captured attention pattern − transformers' eager attentions| and max
|our forward's logits − transformers'| on 2 × 20 random tokens; then, per run, the worst
closure error and worst |r|/B over 3 samples × 2 layers × 40 query positions.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from qkcheck.models.hf import HFTarget
from qkcheck.runs import load_run
from qkcheck.settings import Settings
from qkcheck.validate import Validator
from tests.hf_runs import CLASSES, KINDS, tiny_hf_model, write_run, write_snapshot


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="qk-hf-"))
    os.environ["HF_HUB_CACHE"] = str(root / "hub")
    print(f"{'class':<26} {'max|Δpattern|':>14} {'max|Δlogits|':>13}")
    for kind in KINDS:
        _, snapshot = write_snapshot(kind, root / "hub")
        ours = HFTarget.build(CLASSES[kind], snapshot)
        theirs = tiny_hf_model(kind)
        tokens = torch.randint(1, 96, (2, 20), generator=torch.Generator().manual_seed(3))
        cap = ours.capture(tokens)
        with torch.no_grad():
            out = theirs(input_ids=tokens, output_attentions=True, use_cache=False)
        causal = torch.ones(20, 20, dtype=torch.bool).tril()
        d_pattern = max(
            float((cap.logits[i].masked_fill(~causal, float("-inf")).softmax(-1) - a).abs().max())
            for i, a in enumerate(out.attentions)
        )
        with torch.no_grad():
            d_logits = float((ours(tokens) - out.logits).abs().max())
        print(f"{CLASSES[kind]:<26} {d_pattern:>14.2e} {d_logits:>13.2e}")
    print(
        f"\n{'run':<14} {'items':>6} {'max closure err':>16} {'tolerance':>10} {'worst |r|/B':>12}"
    )
    for kind in KINDS:
        for dtype in (torch.float32, torch.bfloat16):
            tag = "bf16" if dtype == torch.bfloat16 else "f32"
            run_dir = write_run(
                kind, root / "out", root / "hub", run_id=f"s-{kind}{tag}", weights_dtype=dtype
            )
            run = load_run(run_dir)
            tokens = run.samples[:3]
            v = Validator(run, tokens, list(range(len(tokens))), Settings(run_id="x"))
            res = [v.item(*it) for it in v.items()]
            print(
                f"{kind + '-' + tag:<14} {len(res):>6} {max(r.closure_error for r in res):>16.2e} "
                f"{res[0].closure_tol:>10.1e} {max(r.ratio for r in res):>12.3f}"
            )


if __name__ == "__main__":
    main()
