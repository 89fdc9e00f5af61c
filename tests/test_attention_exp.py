"""The fused attention softmax's exp (emulator_attention.cc exp_nonpositive and its AVX-512 FMA form in
emulator_attention_avx512.h: 2^n times a degree-3 polynomial of 2^f; and 2^t itself, which the AVX-512 softmax takes
of its base-2 exponent in unmasked rows) against float64: the relative error over the whole range each serves, x in
[-87, 0] and t in [-125.5, 0], within numerics.ATTENTION_EXP_ERR (the contract's allowance); 0 below it; and the
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


FORMS = ["scalar", "fma", "fma_base2"]
LOWEST = {"scalar": np.float32(-87), "fma": np.float32(-87), "fma_base2": np.float32(-125.5)}


def reduced_range_floats(lowest, to_base2) -> np.ndarray:
    """Every 61st float of [lowest, 0] (18M-28M of them), -0, the floats around `lowest`, and around each point where
    the reduction's n = rint(t) changes (f = +-1/2, where the polynomial's error peaks; t = x / to_base2): 64 floats
    either side."""
    top = int(np.float32(lowest).view(np.uint32))
    strided = np.arange(0x80000000, top + 1, 61, dtype=np.uint64).astype(np.uint32).view(np.float32)
    ties = (-(np.arange(0, 127) + 0.5) / to_base2).astype(np.float32)
    around = np.concatenate([ties[ties >= lowest], [np.float32(lowest)]])
    offsets = np.arange(-64, 65, dtype=np.int64)
    near = (around.view(np.uint32).astype(np.int64)[:, None] + offsets[None, :]).astype(np.uint32).view(np.float32)
    x = np.concatenate([strided, near.ravel(), np.float32([-0.0, 0.0])])
    return x[(x >= lowest) & (x <= 0)]


def exact(x, form):
    return np.exp2(x.astype(np.float64)) if form == "fma_base2" else np.exp(x.astype(np.float64))


@pytest.mark.parametrize("form", FORMS)
def test_exp_relative_error_over_its_range(form):
    x = reduced_range_floats(LOWEST[form], 1.0 if form == "fma_base2" else np.float64(LOG2E))
    y = _native.emulator_attention_exp(x, form)
    if y is None:
        pytest.skip("no AVX512-BF16 on this CPU: the FMA forms never run here")
    err = np.abs(y.astype(np.float64) / exact(x, form) - 1)
    worst = int(np.argmax(err))
    assert err[worst] <= ATTENTION_EXP_ERR, f"{form}({x[worst]!r}): relative error 2^{np.log2(err[worst]):.2f}"
    assert err[worst] > ATTENTION_EXP_ERR / 4  # the allowance is the degree-3 polynomial's, not a loose one
    # exp(0) rounds to the weight 1 exactly (bf16 keeps 8 bits), so a row's largest weight is 1.
    assert np.all(np.abs(y[x == 0] - 1) < 2.0**-9)


@pytest.mark.parametrize("form", FORMS)
def test_exp_below_its_range_is_zero(form):
    low = LOWEST[form]
    x = np.float32([np.nextafter(low, np.float32(-np.inf)), low - 1, -130.3, -1e30, -np.inf])
    y = _native.emulator_attention_exp(x, form)
    if y is None:
        pytest.skip("no AVX512-BF16 on this CPU: the FMA forms never run here")
    np.testing.assert_array_equal(y, 0)


def spans_of(M):
    """Row m's score range: 0 (every score equal), then from 0.01 through the exp's whole range to 300."""
    return np.concatenate([[0.0], np.geomspace(0.01, 300, M - 1)])


def bf16_exact(x):
    """x rounded to bf16 values (as fp32), so that the kernels' rounding of Q and K changes nothing."""
    return (np.asarray(x, np.float32).view(np.uint32) + 0x8000 & 0xFFFF0000).astype(np.uint32).view(np.float32)


def adversarial_heads(M, T, seed):
    """One head whose additive mask sets each row's score range: row m spans [-r_m, 0] with r_m from 0 (every score
    equal) through the exp's whole range to 300 (most weights underflow to 0); every fourth row has two keys tied at
    the max. Q K^T adds small scores on top."""
    r = np.random.default_rng(seed)
    q = (r.standard_normal((1, M, 64)) * 0.25).astype(np.float32)
    k = r.standard_normal((1, T, 64)).astype(np.float32)
    v = r.standard_normal((1, T, 64)).astype(np.float32)
    spans = spans_of(M)
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
        kt = k.transpose(0, 2, 1)
        for scale in (0.125, 1.0, 0.3):
            o = _native.emulator_attention(q, k, v, scale, threads=2, mask=mask)
            assert_within(o, attention_exact(q, kt, v, scale, mask), attention_bound(q, kt, v, scale, mask),
                          f"M={M} T={T} scale={scale}, masked")
        # Unmasked (the AVX-512 softmax's base-2 exponent): the same ranges by Q itself, bf16-exact, against K's
        # first column ramping over [-1, 0] and zero elsewhere, so the scores are exact.
        qs = np.zeros_like(q)
        qs[0, :, 0] = bf16_exact(spans_of(M))
        ks = np.zeros_like(k)
        ks[0, :, 0] = bf16_exact(-np.linspace(0, 1, T))
        for scale in (0.125, 1.0, 0.3):
            o = _native.emulator_attention(qs, ks, v, scale, threads=2)
            kst = ks.transpose(0, 2, 1)
            assert_within(o, attention_exact(qs, kst, v, scale), attention_bound(qs, kst, v, scale),
                          f"M={M} T={T} scale={scale}, unmasked")


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
