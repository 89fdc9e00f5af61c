"""The fused attention with an additive mask and the NaN rule (kernels/attention_contract.h; ops/attention.cc): the
decoder's masked self-attention MatMul -> [scale] -> Add(mask) -> Softmax -> Where(IsNaN(P), 0, P) -> MatMul as one
node. Kernels against float64 (numerics.assert_masked_attention: NaN rows as ORT's Softmax gives them, or zero under
the NaN rule, the rest within attention_bound): causal masks, fully masked rows, NaN/Inf in Q/K/V/mask, ragged T,
few rows (bf16 and fp32 K/V) and many rows, every kernel set this CPU runs; the EP: placement (one node), against
ORT's CPU EP and float64, mask shapes that broadcast, refusals, the fake XRT device (declines, logged)."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from cpu_isa import check_with_isa
from numerics import assert_masked_attention, bf16_round

from onnxruntime_ep_xdna import _native

NEG_INF = np.float32(-np.inf)


def causal(M, T):
    """The decoder's mask for M new tokens after T - M cached ones: row m sees keys t <= T - M + m."""
    return np.where(np.arange(T)[None, :] <= np.arange(T - M, T)[:, None], 0, NEG_INF).astype(np.float32)


def operands(H, M, T, D, Dv, seed):
    r = np.random.default_rng(seed)
    q = (r.standard_normal((H, M, D)) * np.exp2(r.integers(-2, 3, (H, M, 1)))).astype(np.float32)
    k = bf16_round(r.standard_normal((H, T, D)).astype(np.float32))
    v = bf16_round(r.standard_normal((H, T, Dv)).astype(np.float32))
    return q, k, v


def bits(x):
    return (x.view(np.uint32) >> 16).astype(np.uint16)


def masks(H, M, T, seed):
    """Causal, causal plus a random -Inf pattern and finite values, one fully masked row per head."""
    r = np.random.default_rng(seed)
    c = np.broadcast_to(causal(M, T), (H, M, T)).copy()
    mixed = c + np.where(r.random((H, M, T)) < 0.2, NEG_INF, r.standard_normal((H, M, T)).astype(np.float32))
    mixed[:, M // 2] = NEG_INF  # fully masked rows
    return c, mixed.astype(np.float32)


# H, M, T, D, Dv, scale: few rows (a decoder step: beams x tokens, the prompt's 3-5 tokens) and many rows
SHAPES = [
    (8, 1, 129, 64, 64, 0.125),
    (8, 4, 4, 64, 64, 0.125),  # the prompt: 4 tokens, causal
    (2, 5, 133, 64, 64, 0.125),
    (3, 3, 17, 40, 24, 40 ** -0.5),  # ragged T (one key past a 16-key block, odd) and head dims
    (2, 16, 301, 64, 64, 0.125),
    (2, 40, 40, 64, 64, 0.125),  # many rows: attend_many_rows
    (1, 70, 130, 33, 17, 33 ** -0.5),
]


def check_shape(H, M, T, D, Dv, scale, seed=0):
    q, k, v = operands(H, M, T, D, Dv, seed)
    kt = k.transpose(0, 2, 1)
    for mask in masks(H, M, T, seed):
        for rule in (False, True):
            what = f"{H}x{M}x{T}x{D}x{Dv} rule={rule}"
            o = _native.emulator_attention(q, k, v, scale, threads=2, mask=mask, zero_nan_rows=rule)
            assert_masked_attention(o, q, kt, v, scale, mask, rule, what)
            one = _native.emulator_attention(q, k, v, scale, threads=1, mask=mask, zero_nan_rows=rule)
            np.testing.assert_array_equal(one, o)
            if M <= 16:  # bf16 K/V read as they lie: the same values, the same kernel, the same bits
                b = _native.emulator_attention_bf16_kv(q, bits(k), bits(v), scale, mask=mask, zero_nan_rows=rule)
                np.testing.assert_array_equal(b.view(np.uint32), o.view(np.uint32))


def check_non_finite():
    """NaN / +Inf in Q, K, the mask; a NaN in V: NaN rows (or zero rows under the rule, NaN in V's NaN column)."""
    H, M, T, D = 2, 5, 50, 64
    for M in (5, 24):
        q, k, v = operands(H, M, T, D, D, 3)
        mask = np.broadcast_to(causal(M, T), (H, M, T)).copy()
        q[0, 3, 5] = np.nan
        mask[1, 1, 7] = np.nan
        mask[1, 2, 9] = np.inf
        k[1, 30, :] = np.inf  # +-Inf scores in the rows that see key 30 (Inf x 0 where Q is 0: NaN)
        mask[0, 4, :] = NEG_INF
        v[0, 40, 9] = np.nan  # column 9 of head 0: NaN in every row that sees key 40, and in zero rows
        v[1, 10, 3] = np.inf
        kt = k.transpose(0, 2, 1)
        for rule in (False, True):
            o = _native.emulator_attention(q, k, v, 0.125, mask=mask, zero_nan_rows=rule)
            assert_masked_attention(o, q, kt, v, 0.125, mask, rule, f"M={M} rule={rule}")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])))
def test_masked_kernels_within_bound(shape):
    check_shape(*shape)


def test_masked_kernels_non_finite():
    check_non_finite()


_ISA_CHECK = textwrap.dedent("""
    import test_attention_masked as t
    for i, shape in enumerate(t.SHAPES):
        t.check_shape(*shape, seed=20 + i)
    t.check_non_finite()
    print("ok")
""")


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512", "avx512bf16", "amx"])
def test_each_kernel_set(isa):
    check_with_isa(isa, _ISA_CHECK, timeout=900)
