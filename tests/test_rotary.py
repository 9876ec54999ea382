"""Rotary tables and rotation, against the formulas written out plainly."""

from __future__ import annotations

import math

import pytest
import torch

from qkcheck.rotary import RotaryConfig, rotary_tables, rotate
from tests.reference import rotation_matrices


def test_tables_follow_the_target_models_formula_in_float32():
    cfg = RotaryConfig(rotary_dim=8, base=10000)
    cos, sin = rotary_tables(cfg, torch.arange(5))
    assert cos.dtype == torch.float32 and cos.shape == (5, 4)
    for t in range(5):
        for i in range(4):
            angle = torch.tensor(t, dtype=torch.float32) / (
                torch.tensor(10000.0) ** (torch.tensor(i, dtype=torch.float32) / 4)
            )
            assert cos[t, i] == torch.cos(angle) and sin[t, i] == torch.sin(angle)


@pytest.mark.parametrize("adjacent", [False, True], ids=["halves", "adjacent-pairs"])
@pytest.mark.parametrize("rotary_dim", [2, 4, 6])
def test_rotation_equals_explicit_rotation_matrices_and_passes_the_rest_through(
    adjacent, rotary_dim
):
    x = torch.randn(3, 7, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pos = torch.arange(7) * 3
    got = rotate(x, pos, RotaryConfig(rotary_dim, 100.0, adjacent))
    R = rotation_matrices(pos, 6, rotary_dim, 100.0, adjacent)
    want = torch.einsum("tde,bte->btd", R, x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got[..., rotary_dim:], x[..., rotary_dim:])
    torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1))


def test_positions_beyond_the_context_are_clamped_like_the_model_does():
    cfg = RotaryConfig(4, n_ctx=8)
    cos, _ = rotary_tables(cfg, torch.tensor([7, 8, 100]))
    assert torch.equal(cos[1], cos[0]) and torch.equal(cos[2], cos[0])


def test_an_odd_rotary_dim_is_refused():
    with pytest.raises(ValueError, match="rotary_dim must be a positive even number, got 5"):
        RotaryConfig(5)


def test_only_relative_position_matters():
    cfg = RotaryConfig(8, 10000.0)
    a, b = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)

    def dot(i, j):
        ra = rotate(a[None], torch.tensor([i]), cfg)[0]
        rb = rotate(b[None], torch.tensor([j]), cfg)[0]
        return float(ra @ rb)

    assert math.isclose(dot(5, 2), dot(105, 102), rel_tol=1e-9, abs_tol=1e-12)
