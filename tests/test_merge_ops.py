"""Pure tensor functions of ilora.merge.ops against their dense definitions."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ilora.merge import ops


def spectrum_matrix(out: int, inp: int, singular_values: torch.Tensor, seed: int) -> torch.Tensor:
    """``U diag(S) Vᵀ`` with random orthonormal ``U, V`` and the given ``S``."""
    gen = torch.Generator().manual_seed(seed)
    k = len(singular_values)
    u = torch.linalg.qr(torch.randn(out, k, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(inp, k, generator=gen)).Q
    return (u * singular_values) @ v.T


@settings(max_examples=25, deadline=None)
@given(
    out=st.integers(4, 40),
    inp=st.integers(4, 40),
    r=st.integers(1, 8),
    scale=st.floats(0.1, 4.0),
    seed=st.integers(0, 2**16),
)
def test_factorized_svd_equals_dense_svd(out, inp, r, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    lora_B, lora_A = torch.randn(out, r, generator=gen), torch.randn(r, inp, generator=gen)
    dense = ops.lora_delta(lora_B, lora_A, scale)
    u, s, vh = ops.factorized_svd(lora_B, lora_A, scale)
    k = min(out, inp, r)
    assert u.shape == (out, k) and s.shape == (k,) and vh.shape == (k, inp)
    exact = torch.linalg.svdvals(dense)[:k]
    torch.testing.assert_close(s, exact, atol=1e-4 * float(exact[0]), rtol=1e-4)
    torch.testing.assert_close(ops.low_rank_product(u, s, vh), dense, atol=1e-4 * float(exact[0]), rtol=1e-4)
    torch.testing.assert_close(u.T @ u, torch.eye(k), atol=1e-4, rtol=0)
    torch.testing.assert_close(vh @ vh.T, torch.eye(k), atol=1e-4, rtol=0)
    assert bool((s[:-1] >= s[1:]).all())


def test_factorized_svd_upcasts_bf16():
    gen = torch.Generator().manual_seed(0)
    lora_B, lora_A = torch.randn(16, 4, generator=gen).bfloat16(), torch.randn(4, 12, generator=gen).bfloat16()
    u, s, vh = ops.factorized_svd(lora_B, lora_A, 2.0)
    assert s.dtype == torch.float32
    torch.testing.assert_close(ops.low_rank_product(u, s, vh), 2.0 * lora_B.float() @ lora_A.float(), atol=1e-4, rtol=1e-4)


@given(r=st.integers(1, 512), keep=st.floats(0.01, 1.0))
def test_kept_count_is_ceil_keep_r(r, keep):
    p = ops.kept_count(r, keep)
    assert 1 <= p <= r
    assert p == min(r, max(1, math.ceil(round(keep * r, 9))))


def test_kept_count_examples():
    assert [ops.kept_count(r, 0.8) for r in (1, 5, 8, 10, 128)] == [1, 4, 7, 8, 103]


@pytest.mark.parametrize("threshold_index", [3, 20, 45])
def test_truncated_svd_agrees_with_exact(threshold_index):
    s_true = torch.logspace(1, -3, 150)
    matrix = spectrum_matrix(400, 300, s_true, seed=threshold_index)
    threshold = float((s_true[threshold_index] + s_true[threshold_index + 1]) / 2)
    u, s, vh, width = ops.leading_singular_triplets(matrix, threshold, tol=1e-5, generator=torch.Generator().manual_seed(0))
    exact_u, exact_s, exact_vh = torch.linalg.svd(matrix, full_matrices=False)
    n = int((exact_s > threshold).sum())
    assert len(s) == n == threshold_index + 1
    assert width < 0.5 * 300  # it never needed the dense SVD
    torch.testing.assert_close(s, exact_s[:n], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        ops.low_rank_product(u, s, vh), ops.low_rank_product(exact_u[:, :n], exact_s[:n], exact_vh[:n]), atol=1e-4, rtol=0
    )


def test_truncated_svd_widens_past_initial_block():
    s_true = torch.linspace(10, 1, 120)
    matrix = spectrum_matrix(500, 400, s_true, seed=1)
    u, s, vh, width = ops.leading_singular_triplets(matrix, 2.0, initial=8, oversample=8)
    assert len(s) == int((s_true > 2.0).sum())
    assert width > 16  # had to widen beyond the first block
    torch.testing.assert_close(s, s_true[s_true > 2.0], rtol=1e-3, atol=1e-3)


def test_truncated_svd_count_mode_and_dense_fallback():
    matrix = spectrum_matrix(60, 50, torch.logspace(0, -2, 40), seed=2)
    exact = torch.linalg.svdvals(matrix)
    _, s, _, _ = ops.leading_singular_triplets(matrix, count=5)
    torch.testing.assert_close(s, exact[:5], rtol=1e-4, atol=1e-6)
    _, s, _, width = ops.leading_singular_triplets(matrix, 0.0)  # all 40 nonzero: dense is cheaper
    assert width == 50 and len(s) >= 40


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 5), rows=st.integers(1, 9), cols=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_max_magnitude_keeps_signs_and_is_order_free(n, rows, cols, seed):
    gen = torch.Generator().manual_seed(seed)
    candidates = [torch.randn(rows, cols, generator=gen) for _ in range(n)]
    merged = ops.max_magnitude(candidates)
    stacked = torch.stack(candidates)
    assert torch.equal(merged.abs(), stacked.abs().amax(dim=0))
    assert bool((stacked == merged).any(dim=0).all())  # each entry is one candidate's, sign included
    perm = torch.randperm(n, generator=gen).tolist()
    assert torch.equal(ops.max_magnitude([candidates[i] for i in perm]), merged)


def test_max_magnitude_ties_go_to_later_input():
    first, later = torch.tensor([[1.0, -2.0, 3.0]]), torch.tensor([[-1.0, 2.0, 0.5]])
    assert torch.equal(ops.max_magnitude([first, later]), torch.tensor([[-1.0, 2.0, 3.0]]))
    assert torch.equal(ops.max_magnitude([later, first]), torch.tensor([[1.0, -2.0, 3.0]]))


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 4), rows=st.integers(1, 40), cols=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_max_magnitude_of_factored_candidates_equals_dense(n, rows, cols, seed):
    gen = torch.Generator().manual_seed(seed)
    factors = [(torch.randn(rows, 3, generator=gen), torch.randn(3, cols, generator=gen)) for _ in range(n)]
    dense = [left @ right for left, right in factors]
    # Tiny blocks exercise the row-block loop; the products are the same matmuls row by row.
    blocked = ops.max_magnitude(factors, block_bytes=4 * cols * 3)
    torch.testing.assert_close(blocked, ops.max_magnitude(dense), atol=1e-6, rtol=1e-6)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 4), ratio=st.floats(0.05, 1.0), seed=st.integers(0, 2**16))
def test_pcb_entries_are_weighted_averages(n, ratio, seed):
    gen = torch.Generator().manual_seed(seed)
    tasks = [torch.randn(6, 7, generator=gen) for _ in range(n)]
    merged = ops.pcb_merge(tasks, ratio)
    stacked = torch.stack(tasks)
    lo = torch.minimum(stacked.amin(0), torch.zeros(()))
    hi = torch.maximum(stacked.amax(0), torch.zeros(()))
    assert merged.shape == (6, 7)
    assert bool(((merged >= lo - 1e-5) & (merged <= hi + 1e-5)).all())
    # Each task keeps only ~ratio of its entries: with one task, the rest merge to exactly 0.
    if n == 1:
        assert int((merged != 0).sum()) <= math.ceil(ratio * 42)
