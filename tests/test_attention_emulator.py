"""The emulator's fused attention with many query rows (kernels/emulator/emulator_attention.cc, attend_many_rows:
blocks of 32 query rows of a head, scores kept in cache; TDPBF16PS in emulator_attention_amx.cc where the amx kernel
set runs, else the active set's blocked GEMM kernel). Against float64 within numerics.attention_bound: encoder-sized
heads, T, M and the head dims off the 16/32 blocks, K and V given transposed (the contract's strides), NaN/Inf rows;
every kernel set this CPU runs (XDNA_EMULATOR_ISA, one subprocess each); 1 and 2 threads give the same bits."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from cpu_isa import check_with_isa
from numerics import assert_attention_nan_rows, assert_within, attention_bound, attention_exact
from test_attention_fusion import check_on_one_and_two_threads, feeds, sdpa_model

from onnxruntime_ep_xdna import _native

# H, M, T, D, Dv, K given as K^T, V given as V^T, scale
SHAPES = [
    (2, 100, 77, 64, 64, False, False, 0.125),
    (3, 33, 31, 40, 24, True, False, 40 ** -0.5),
    (2, 17, 1, 64, 64, False, True, 0.125),
    (1, 70, 130, 8, 100, True, True, 8 ** -0.5),
    (2, 47, 200, 96, 64, False, False, 96 ** -0.5),
    (1, 64, 33, 64, 64, False, False, 2.0),  # peaked rows: most weights exp() below -87, flushed to 0
    (1, 193, 45, 64, 64, False, True, 0.125),  # one row past 3 AMX blocks (64 rows) and 2 of the others (96)
    (2, 40, 66, 33, 17, True, False, 33 ** -0.5),  # odd head dims: a bf16 pair half empty
    (2, 1500, 1500, 64, 64, False, False, 0.125),  # two encoder heads (whisper-base: 8 of them)
]


def operands(H, M, T, D, Dv, k_t, v_t, seed):
    r = np.random.default_rng(seed)
    q = (r.standard_normal((H, M, D)) * np.exp2(r.integers(-2, 3, (H, M, 1)))).astype(np.float32)
    k = r.standard_normal((H, T, D)).astype(np.float32)
    v = r.standard_normal((H, T, Dv)).astype(np.float32)
    args = (q, np.ascontiguousarray(k.transpose(0, 2, 1)) if k_t else k,
            np.ascontiguousarray(v.transpose(0, 2, 1)) if v_t else v)
    return args, q, k.transpose(0, 2, 1), v


def check_shape(H, M, T, D, Dv, k_t, v_t, scale, seed=0):
    """One call of every head against float64 within the bound; 1 and 2 threads bit-identical."""
    args, q, kt, v = operands(H, M, T, D, Dv, k_t, v_t, seed)
    o = _native.emulator_attention(*args, scale, threads=2, k_transposed=k_t, v_transposed=v_t)
    assert_within(o, attention_exact(q, kt, v, scale), attention_bound(q, kt, v, scale), f"{H}x{M}x{T}x{D}x{Dv}")
    one = _native.emulator_attention(*args, scale, threads=1, k_transposed=k_t, v_transposed=v_t)
    np.testing.assert_array_equal(one, o)
    for h in (0, H - 1):  # a head alone gives the bits it gives among others
        alone = _native.emulator_attention(args[0][h], args[1][h], args[2][h], scale, k_transposed=k_t,
                                           v_transposed=v_t)
        np.testing.assert_array_equal(alone, o[h])


def check_nan_rows():
    """A row whose scores hold NaN or +Inf, or only -Inf, gives NaN in that row only (ORT's Softmax)."""
    H, M, T, D = 2, 40, 50, 64
    (q, k, v), _, _, _ = operands(H, M, T, D, D, False, False, 3)
    k[:, :, 0] = np.abs(k[:, :, 0]) + 0.5
    q[0, 3, 5] = np.nan
    q[1, 35, 0] = np.inf                # +Inf scores
    q[1, 20, :] = 0
    q[1, 20, 0] = -np.inf               # every score -Inf
    o = _native.emulator_attention(q, k, v, 0.125)
    expected = np.zeros((H, M), bool)
    expected[0, 3] = expected[1, 35] = expected[1, 20] = True
    assert_attention_nan_rows(o, q, k, v, 0.125, expected)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + ("-kt" if s[5] else "")
                         + ("-vt" if s[6] else ""))
def test_many_rows_within_bound(shape):
    check_shape(*shape)


def test_encoder_self_attention_all_heads():
    """Whisper-base's encoder self-attention: 8 heads, T = M = 1500, D = 64, in one call."""
    check_shape(8, 1500, 1500, 64, 64, False, False, 0.125, seed=1)


def test_nan_and_inf_rows():
    check_nan_rows()


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_non_finite_v(isa):
    check_with_isa(isa, "import test_attention_emulator as t\nt.check_non_finite_v()\nprint('ok')\n")


def check_non_finite_v():
    """NaN and +-Inf in V (many rows): NaN / Inf exactly in the columns the float64 reference gives them, the rest
    within the bound (the avx2 path rounds V into its panels with a vector rounding that must keep NaN a NaN)."""
    H, M, T, D = 2, 100, 70, 64
    (q, k, v), q64, kt, v64 = operands(H, M, T, D, D, False, False, 4)  # v64 is v
    payload_nan = np.array([0x7f800001, 0xffc00000], np.uint32).view(np.float32)  # rounding its bits naively: +Inf
    v[0, 5, 3], v[1, 30, 2] = payload_nan
    v[1, 9, 7] = np.inf
    v[1, 20, 8] = -np.inf
    o = _native.emulator_attention(q, k, v, 0.125, threads=2)
    assert_within(o, attention_exact(q64, kt, v64, 0.125), attention_bound(q64, kt, v64, 0.125), "non-finite V")


_ISA_CHECK = textwrap.dedent("""
    import numpy as np
    import test_attention_emulator as t
    from onnxruntime_ep_xdna import _native
    for i, shape in enumerate(t.SHAPES):
        if shape[1] == 1500:
            shape = (1,) + shape[1:]  # one encoder head (the generic kernels are slow)
        t.check_shape(*shape, seed=10 + i)
    t.check_nan_rows()
    print("ok")
""")


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512", "amx"])
def test_each_kernel_set(isa):
    check_with_isa(isa, _ISA_CHECK, timeout=600)


@pytest.mark.parametrize("B,H,M,T", [(1, 8, 1500, 1500), (2, 3, 45, 97)])
def test_encoder_sized_attention_on_the_ep(B, H, M, T):
    """Through the EP: K and V in the export's [B, T, H, D] layout (row stride H * D), compared with float64 and
    ORT's CPU EP; 1 and 2 EP threads give the same bits."""
    check_on_one_and_two_threads(sdpa_model(B, H, M, T, scale_on="mul"), feeds(B, H, M, T, 21))
