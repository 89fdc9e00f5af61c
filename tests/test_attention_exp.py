"""The fused attention softmax's exp (emulator_attention.cc exp_nonpositive and its AVX-512 FMA form in
emulator_attention_avx512.h: 2^n times a degree-3 polynomial of 2^f) against float64: its relative error over the
whole range it serves, [-87, 0], within numerics.ATTENTION_EXP_ERR (the contract's allowance); 0 below -87; and the
attention on adversarial score ranges (weights underflowing to 0, rows of equal scores, ties at the max) within
numerics.attention_bound on every kernel set this CPU runs."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from cpu_isa import check_with_isa
from numerics import ATTENTION_EXP_ERR, assert_within, attention_bound, attention_exact

from onnxruntime_ep_xdna import _native

LOG2E = np.float32(1.4426950408889634)


def reduced_range_floats() -> np.ndarray:
    """Every 61st float of [-87, 0] (18M of its 1.1G), -0, the floats around -87, and around each point where the
    reduction's n = rint(x log2 e) changes (f = +-1/2, where the polynomial's error peaks): 64 floats either side."""
    strided = np.arange(0x80000000, 0xC2AE0000 + 1, 61, dtype=np.uint64).astype(np.uint32).view(np.float32)
    ties = (-(np.arange(0, 126) + 0.5) / np.float64(LOG2E)).astype(np.float32)
    ties = ties[ties >= -87]
    around = np.concatenate([ties, [np.float32(-87)]])
    offsets = np.arange(-64, 65, dtype=np.int64)
    near = (around.view(np.uint32).astype(np.int64)[:, None] + offsets[None, :]).astype(np.uint32).view(np.float32)
    x = np.concatenate([strided, near.ravel(), np.float32([-0.0, 0.0])])
    return x[(x >= -87) & (x <= 0)]


@pytest.mark.parametrize("fma_form", [False, True], ids=["scalar", "avx512-fma"])
def test_exp_relative_error_over_its_range(fma_form):
    x = reduced_range_floats()
    y = _native.emulator_attention_exp(x, fma_form)
    if y is None:
        pytest.skip("no AVX512-BF16 on this CPU: the FMA form never runs here")
    err = np.abs(y.astype(np.float64) / np.exp(x.astype(np.float64)) - 1)
    worst = int(np.argmax(err))
    assert err[worst] <= ATTENTION_EXP_ERR, f"exp({x[worst]!r}): relative error 2^{np.log2(err[worst]):.2f}"
    assert err[worst] > ATTENTION_EXP_ERR / 4  # the allowance is the degree-3 polynomial's, not a loose one
    # exp(0) rounds to the weight 1 exactly (bf16 keeps 8 bits), so a row's largest weight is 1.
    assert np.all(np.abs(y[x == 0] - 1) < 2.0**-9)


@pytest.mark.parametrize("fma_form", [False, True], ids=["scalar", "avx512-fma"])
def test_exp_below_minus_87_is_zero(fma_form):
    x = np.float32([np.nextafter(np.float32(-87), np.float32(-np.inf)), -88, -103.3, -1e30, -np.inf])
    y = _native.emulator_attention_exp(x, fma_form)
    if y is None:
        pytest.skip("no AVX512-BF16 on this CPU: the FMA form never runs here")
    np.testing.assert_array_equal(y, 0)


def adversarial_heads(M, T, seed):
    """One head whose additive mask sets each row's score range: row m spans [-r_m, 0] with r_m from 0 (every score
    equal) through the exp's whole range to 300 (most weights underflow to 0); every fourth row has two keys tied at
    the max. Q K^T adds small scores on top."""
    r = np.random.default_rng(seed)
    q = (r.standard_normal((1, M, 64)) * 0.25).astype(np.float32)
    k = r.standard_normal((1, T, 64)).astype(np.float32)
    v = r.standard_normal((1, T, 64)).astype(np.float32)
    spans = np.concatenate([[0.0], np.geomspace(0.01, 300, M - 1)])
    mask = np.empty((1, M, T), np.float32)
    for m in range(M):
        mask[0, m] = -spans[m] * r.random(T)
        if m % 4 == 1:
            top = r.choice(T, 2, replace=False)
            mask[0, m, top] = 0
    q[0, 0] = 0  # row 0: no mask spread and no scores: every weight 1 / T
    return q, k, v, mask


def check_adversarial_ranges():
    for M, T in ((5, 97), (100, 300)):  # the few-row and the many-row kernels
        q, k, v, mask = adversarial_heads(M, T, seed=M)
        for scale in (0.125, 1.0):
            o = _native.emulator_attention(q, k, v, scale, threads=2, mask=mask)
            kt = k.transpose(0, 2, 1)
            assert_within(o, attention_exact(q, kt, v, scale, mask), attention_bound(q, kt, v, scale, mask),
                          f"M={M} T={T} scale={scale}")


def test_adversarial_score_ranges():
    check_adversarial_ranges()


_ISA_CHECK = textwrap.dedent("""
    import test_attention_exp as t
    t.check_adversarial_ranges()
    print("ok")
""")


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512", "avx512bf16", "amx"])
def test_adversarial_score_ranges_each_kernel_set(isa):
    check_with_isa(isa, _ISA_CHECK, timeout=600)
