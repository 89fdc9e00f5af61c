"""The emulator's fused attention with few query rows (M <= 16, K and V as rows: a decoder step), one task per head
(kernels/emulator/emulator_attention.cc): attend_few_rows_bf16 (VDPBF16PS, beside the amx and avx512bf16 kernel
sets), attend_few_rows (avx512), attend_few_rows_avx2 (avx2), the unpacked GEMM kernels (generic). Against float64 within
numerics.attention_bound: T off the 16-key blocks and odd (a key pair half empty), head dims off the 32-lane chunks,
M = 1..16; bf16 K/V read as they lie give the bits of their fp32 values; each row alone gives the bits it gives among
others, 1 and 2 threads alike; K frames-first (rows H * D apart, prefetched on avx2) gives the bits of K as rows;
NaN/Inf rows and NaN in V as the contract says; every kernel set this CPU runs (XDNA_EMULATOR_ISA, one subprocess
each)."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from cpu_isa import check_with_isa
from numerics import assert_attention_nan_rows, assert_within, attention_bound, attention_exact, bf16_round

from onnxruntime_ep_xdna import _native

# H, M, T, D, Dv, scale
SHAPES = [
    (8, 1, 1500, 64, 64, 0.125),  # whisper-base cross-attention, one beam
    (8, 5, 1500, 64, 64, 0.125),  # five beams grouped into one head of five rows
    (2, 1, 1, 64, 64, 0.125),
    (3, 2, 15, 64, 64, 0.125),
    (2, 3, 17, 64, 64, 0.125),  # one key past a 16-key block, odd: the last pair half empty
    (2, 4, 33, 40, 24, 40 ** -0.5),  # head dims off the 32-lane chunks
    (1, 6, 77, 8, 100, 8 ** -0.5),
    (2, 7, 130, 96, 64, 96 ** -0.5),  # D: three chunks (the run-time chunk loop)
    (1, 11, 48, 130, 33, 130 ** -0.5),
    (2, 16, 301, 64, 64, 0.125),  # M at kUnpackedMaxM: rows in blocks of five
    (2, 5, 128, 64, 64, 0.125),  # avx2, over 4 rows: keys in blocks of 64, the last ending at T
    (1, 5, 65, 64, 40, 0.125),  # one key past a block; Dv past the last 16-column chunk
    (1, 3, 64, 64, 64, 2.0),  # peaked rows: most weights below e^-87, flushed to 0
]


def operands(H, M, T, D, Dv, seed):
    """Q, and K, V already bf16 values (as a graph's Cast gives them), with their bf16 bits."""
    r = np.random.default_rng(seed)
    q = (r.standard_normal((H, M, D)) * np.exp2(r.integers(-2, 3, (H, M, 1)))).astype(np.float32)
    k = bf16_round(r.standard_normal((H, T, D)).astype(np.float32))
    v = bf16_round(r.standard_normal((H, T, Dv)).astype(np.float32))
    return q, k, v, (k.view(np.uint32) >> 16).astype(np.uint16), (v.view(np.uint32) >> 16).astype(np.uint16)


def check_shape(H, M, T, D, Dv, scale, seed=0):
    q, k, v, k_bits, v_bits = operands(H, M, T, D, Dv, seed)
    o = _native.emulator_attention_bf16_kv(q, k_bits, v_bits, scale, threads=2)
    kt = k.transpose(0, 2, 1)
    assert_within(o, attention_exact(q, kt, v, scale), attention_bound(q, kt, v, scale), f"{H}x{M}x{T}x{D}x{Dv}")
    # fp32 K/V holding the same values: the same kernel, the same bits
    np.testing.assert_array_equal(_native.emulator_attention(q, k, v, scale, threads=2).view(np.uint32),
                                  o.view(np.uint32))
    np.testing.assert_array_equal(_native.emulator_attention_bf16_kv(q, k_bits, v_bits, scale, threads=1), o)
    for m in sorted({0, M - 1}):  # a row alone (one beam) gives the bits it gives among the others
        alone = _native.emulator_attention_bf16_kv(np.ascontiguousarray(q[:, m:m + 1]), k_bits, v_bits, scale)
        np.testing.assert_array_equal(alone[:, 0].view(np.uint32), o[:, m].view(np.uint32))


# K frames-first ([T, H, D], the prompt run's K: each head's key rows H * D apart), H, M, T, D, Dv, scale: rows 512
# bytes apart or more are prefetched ahead on the avx2 set (T off the prefetch distance, odd, D off 16, M over the
# row block), and 256 bytes apart are not.
FRAMES_FIRST_SHAPES = [
    (8, 3, 1500, 64, 64, 0.125),  # whisper-base's prompt run: 3 tokens
    (8, 1, 1500, 64, 64, 0.125),
    (8, 5, 1500, 64, 64, 0.125),
    (4, 3, 77, 64, 64, 0.125),
    (16, 2, 33, 40, 24, 40 ** -0.5),
    (2, 3, 17, 64, 64, 0.125),
]


def check_frames_first(H, M, T, D, Dv, scale, seed=0):
    """K read with its rows H * D apart gives the bits of K as rows (the same values)."""
    q, k, v, k_bits, v_bits = operands(H, M, T, D, Dv, seed)
    o = _native.emulator_attention_bf16_kv(q, k_bits, v_bits, scale, threads=2)
    frames = np.ascontiguousarray(k_bits.transpose(1, 0, 2))
    np.testing.assert_array_equal(
        _native.emulator_attention_bf16_kv(q, frames, v_bits, scale, threads=2, k_frames_first=True).view(np.uint32),
        o.view(np.uint32))
    kt = k.transpose(0, 2, 1)
    assert_within(o, attention_exact(q, kt, v, scale), attention_bound(q, kt, v, scale), f"{H}x{M}x{T}x{D}x{Dv}")


def check_nan_rows():
    """A row whose scores hold NaN or +Inf, or only -Inf, gives NaN in that row only (ORT's Softmax); a NaN in V
    gives NaN in its column of every row (0 x NaN is NaN, as ORT's MatMul gives)."""
    H, M, T, D = 2, 5, 50, 64
    q, k, v, k_bits, v_bits = operands(H, M, T, D, D, 3)
    k_bits[:, :, 0] = 0x3F80  # K[:, :, 0] = 1: a score of Q[.., 0] x 1
    k[:, :, 0] = 1
    q[0, 3, 5] = np.nan
    q[1, 4, 0] = np.inf               # +Inf scores
    q[1, 2, :] = 0
    q[1, 2, 0] = -np.inf              # every score -Inf
    o = _native.emulator_attention_bf16_kv(q, k_bits, v_bits, 0.125)
    expected = np.zeros((H, M), bool)
    expected[0, 3] = expected[1, 4] = expected[1, 2] = True
    assert_attention_nan_rows(o, q, k, v, 0.125, expected)
    v_bits[0, 7, 9] = 0x7FC0  # NaN in V: column 9 of head 0
    o = _native.emulator_attention_bf16_kv(np.nan_to_num(q, nan=0, posinf=0, neginf=0), k_bits, v_bits, 0.125)
    expected = np.zeros(o.shape, bool)
    expected[0, :, 9] = True
    np.testing.assert_array_equal(np.isnan(o), expected)
    # fp32 K / V: a NaN whose payload is only low bits stays a NaN when rounded to bf16 (a plain rounding would make
    # it Inf, and an Inf score of either sign a different row), as the bf16 NaN gives
    q = np.nan_to_num(q, nan=0, posinf=0, neginf=0)
    q[1, :, 2] = np.array([1, -1, 2, -2, 0.5], np.float32)  # both signs against head 1's NaN key
    low_nan = np.array([0x7F800001], np.uint32).view(np.float32)[0]
    k[1, 3, 2] = low_nan
    v[0, 7, 9] = low_nan
    k_bits[1, 3, 2] = 0x7FC0
    o = _native.emulator_attention_bf16_kv(q, k_bits, v_bits, 0.125)
    expected[1] = True  # every row of head 1 meets the NaN score
    np.testing.assert_array_equal(np.isnan(o), expected)
    o32 = _native.emulator_attention(q, k, v, 0.125)
    np.testing.assert_array_equal(np.isnan(o32), expected)
    np.testing.assert_array_equal(o32[~expected], o[~expected])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])))
def test_few_rows_within_bound_and_bits(shape):
    check_shape(*shape)


def test_few_rows_nan_and_inf():
    check_nan_rows()


@pytest.mark.parametrize("shape", FRAMES_FIRST_SHAPES, ids=lambda s: "x".join(map(str, s[:5])))
def test_frames_first_keys_same_bits(shape):
    check_frames_first(*shape)


# The per-head few-row kernel each forced kernel set runs (emulator_attention.cc, few_row_kernel).
FEW_ROW_KERNEL = {"generic": "unpacked", "avx2": "avx2", "avx512": "avx512", "avx512bf16": "avx512bf16",
                  "amx": "avx512bf16"}

_ISA_CHECK = textwrap.dedent("""
    import os
    import test_attention_few_rows as t
    from onnxruntime_ep_xdna import _native
    kernel = _native.emulator_attention_few_row_kernel()
    assert kernel == t.FEW_ROW_KERNEL[os.environ["XDNA_EMULATOR_ISA"]], kernel
    for i, shape in enumerate(t.SHAPES):
        t.check_shape(*shape, seed=10 + i)
    t.check_nan_rows()
    for i, shape in enumerate(t.FRAMES_FIRST_SHAPES):
        t.check_frames_first(*shape, seed=40 + i)
    print("ok")
""")


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512", "avx512bf16", "amx"])
def test_each_kernel_set(isa):
    check_with_isa(isa, _ISA_CHECK, timeout=600)
