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


def test_truncated_svd_is_certified_where_values_at_the_cut_nearly_tie():
    """Eight values 1% apart straddle the threshold, deep in a decaying spectrum: the kept
    truncation is within the default tolerance (1e-5, relative Frobenius) of a float64 one
    (the former stop on residuals relative to σ₁ alone, at its default 1e-4, was further off)."""
    s_true = torch.logspace(0, -3, 400, dtype=torch.float64)
    cut, seed = 100, 0
    s_true[cut - 4 : cut + 4] = s_true[cut] * 1.01 ** -torch.arange(-4, 4, dtype=torch.float64)
    matrix = spectrum_matrix(1024, 1024, s_true.float(), seed=seed)
    threshold = float((s_true[cut] * s_true[cut + 1]).sqrt())
    u, s, vh, width = ops.leading_singular_triplets(matrix, threshold, generator=torch.Generator().manual_seed(seed))
    exact_u, exact_s, exact_vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    n = int((exact_s > threshold).sum())
    exact = ops.low_rank_product(exact_u[:, :n], exact_s[:n], exact_vh[:n])
    assert len(s) == n == cut + 1
    assert width < 1024  # certified by the randomised route, not by the dense SVD
    error = torch.linalg.matrix_norm(ops.low_rank_product(u, s, vh).double() - exact)
    assert float(error) <= 1e-5 * float(torch.linalg.matrix_norm(exact))


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


def where_fold(dense: list[torch.Tensor]) -> torch.Tensor:
    """The max-magnitude rule written plainly on dense matrices (the former implementation)."""
    merged, largest = dense[0].clone(), dense[0].abs()
    for values in dense[1:]:
        magnitude = values.abs()
        merged = torch.where(magnitude >= largest, values, merged)
        largest = torch.maximum(largest, magnitude)
    return merged


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def assert_max_magnitude_within_rounding(merged: torch.Tensor, candidates: list[ops.Candidate]) -> None:
    """Each entry is, to float32 matmul rounding, the value of a candidate of largest magnitude.

    A factored candidate's entry ``left_i · right_j`` (inner size ``k``) is computed in float32
    to within ``k·2⁻²³·Σ|left_i||right_j|`` whatever the BLAS's summation order; where two
    candidates agree in magnitude to within that, either may win.
    """
    exact, slack = [], []
    for c in candidates:
        if isinstance(c, tuple):
            left, right = c[0].double(), c[1].double()
            exact.append(left @ right)
            slack.append(left.shape[1] * 2.0**-23 * (left.abs() @ right.abs()))
        else:
            exact.append(c.double())
            slack.append(torch.zeros_like(exact[-1]))
    exact, slack = torch.stack(exact), torch.stack(slack)
    is_value = (merged.double() - exact).abs() <= slack
    may_be_largest = exact.abs() + slack >= (exact.abs() - slack).amax(dim=0)
    assert bool((is_value & may_be_largest).any(dim=0).all())


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 4),
    rows=st.integers(1, 160),
    cols=st.integers(1, 160),
    k=st.integers(1, 48),
    dense_mask=st.integers(0, 15),
    block_bytes=st.sampled_from([4, 16, 64, 400, 4096, 40_000]),
    seed=st.integers(0, 2**16),
)
def test_max_magnitude_is_deterministic_and_tiling_moves_only_rounding(n, rows, cols, k, dense_mask, block_bytes, seed):
    """Same inputs and tiling: the same bytes. Another tiling recomputes factored candidates'
    products in other shapes, which BLAS rounds differently: equal only to rounding (dense
    candidates are only selected, so with no factored one the bits do not move)."""
    gen = torch.Generator().manual_seed(seed)
    candidates = [
        torch.randn(rows, cols, generator=gen)
        if dense_mask >> i & 1
        else (torch.randn(rows, k, generator=gen), torch.randn(k, cols, generator=gen))
        for i in range(n)
    ]
    tiled = ops.max_magnitude(candidates, block_bytes=block_bytes)
    assert same_bits(ops.max_magnitude(candidates, block_bytes=block_bytes), tiled)
    whole = ops.max_magnitude(candidates, block_bytes=1 << 40)
    for merged in (tiled, whole):
        assert_max_magnitude_within_rounding(merged, candidates)
    if all(isinstance(c, torch.Tensor) for c in candidates):
        assert same_bits(tiled, whole) and same_bits(whole, where_fold(candidates))


def test_max_magnitude_signed_zero_and_infinite_ties_go_to_later_input():
    first = torch.tensor([[0.0, -0.0, float("inf"), -float("inf"), 1e-45]])
    later = torch.tensor([[-0.0, 0.0, -float("inf"), float("inf"), -1e-45]])
    for a, b in ((first, later), (later, first)):
        assert same_bits(ops.max_magnitude([a, b]), b)


def test_max_magnitude_nan_propagates():
    values = torch.tensor([[1.0, -5.0, 2.0]])
    nan = torch.tensor([[float("nan"), 0.0, 0.0]])
    for candidates in ([values, nan], [nan, values], [values, nan, values]):
        merged = ops.max_magnitude(candidates)
        assert bool(merged[0, 0].isnan()) and merged[0, 1:].tolist() == [-5.0, 2.0]


def test_max_magnitude_of_other_dtypes_is_float32():
    a = torch.randn(5, 6).bfloat16()
    b = (torch.randn(5, 2).double(), torch.randn(2, 6).double())
    merged = ops.max_magnitude([a, b])
    assert merged.dtype == torch.float32
    assert_max_magnitude_within_rounding(merged, [a.float(), b])


@pytest.mark.parametrize("layout", ["row-major", "column-major"])
def test_thin_qr_leaves_its_input_alone(layout):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(50, 6, generator=gen)
    if layout == "column-major":
        x = x.T.contiguous().T
    before = x.clone()
    q, r = ops.thin_qr(x)
    assert torch.equal(x, before) and x.stride() == before.stride()
    torch.testing.assert_close(q @ r, x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q.T @ q, torch.eye(6), atol=1e-5, rtol=0)


def test_factorized_svd_rank_above_width():
    """A LoRA rank above the module's input width: at most ``in`` singular values."""
    gen = torch.Generator().manual_seed(0)
    lora_B, lora_A = torch.randn(8, 5, generator=gen), torch.randn(5, 4, generator=gen)
    u, s, vh = ops.factorized_svd(lora_B, lora_A, 1.0)
    assert u.shape == (8, 4) and s.shape == (4,) and vh.shape == (4, 4)
    torch.testing.assert_close(ops.low_rank_product(u, s, vh), lora_B @ lora_A, atol=1e-4, rtol=1e-4)


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
