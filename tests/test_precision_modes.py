"""The precision modes of the contract (kernels/gemm_contract.h, "Precision modes") on the emulator, kernel level:
int8 (A8W8) and bf16x3, each against float64 numpy within its own derived bound (tests/numerics.py), int8 also
bit for bit against a numpy model of its integer arithmetic. Not yet reachable through the EP (issue 13)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from numerics import assert_within, bf16x3_bound, int8_bound
from onnxruntime_ep_xdna import _native

SHAPES = [(1, 1, 1), (1, 513, 300), (3, 64, 64), (7, 200, 130), (64, 384, 1536), (300, 129, 67)]


def problem(m, k, n, seed):
    rng = np.random.default_rng(seed)
    # Mixed magnitudes across rows and columns, so that per-row / per-column scales matter.
    a = (rng.standard_normal((m, k)) * np.exp2(rng.integers(-4, 5, (m, 1)))).astype(np.float32)
    b = (rng.standard_normal((k, n)) * np.exp2(rng.integers(-4, 5, (1, n)))).astype(np.float32)
    return a, b


def int8_model(a, b):
    """The int8 contract's arithmetic in numpy, step for step in fp32 as the kernels do it."""
    def quant(x):  # rows of x
        amax = np.max(np.abs(x), axis=1, keepdims=True).astype(np.float32)
        scale = amax / np.float32(127)
        with np.errstate(divide="ignore"):
            inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
        return np.clip(np.rint(x * inv), -127, 127).astype(np.int64), scale
    qa, sa = quant(a)
    qbt, sb = quant(np.ascontiguousarray(b.T))
    acc = qa @ qbt.T
    assert np.abs(acc).max(initial=0) < 2**31
    return acc.astype(np.float32) * (sa * sb.T).astype(np.float32)


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int8_within_bound_and_bit_exact(m, k, n):
    a, b = problem(m, k, n, seed=m * 7 + k + n)
    c = _native.emulator_gemm_int8(a, _native.quantize_b_int8(b))
    assert_within(c, a.astype(np.float64) @ b.astype(np.float64), int8_bound(a, b), f"int8 {m}x{k}x{n}")
    np.testing.assert_array_equal(c, int8_model(a, b))


def test_int8_bound_is_not_loose_enough_to_pass_anything():
    # The arithmetic uses a fair share of its bound somewhere (a bound 100x too loose would hide real bugs).
    a, b = problem(16, 256, 64, seed=3)
    c = _native.emulator_gemm_int8(a, _native.quantize_b_int8(b))
    err = np.abs(c - a.astype(np.float64) @ b.astype(np.float64))
    assert np.max(err / int8_bound(a, b)) > 0.01


def test_int8_zero_and_nonfinite_rows_and_columns():
    a, b = problem(4, 100, 5, seed=1)
    a[1] = 0
    b[:, 2] = 0
    a[3, 7] = np.inf
    b[9, 4] = np.nan
    c = _native.emulator_gemm_int8(a, _native.quantize_b_int8(b))
    assert np.all(c[1, :4] == 0) and np.all(c[[0, 2], 2] == 0)  # column 4 is NaN everywhere
    assert np.all(np.isnan(c[3])) and np.all(np.isnan(c[:, 4]))
    ok = np.ix_([0, 2], [0, 1, 3])
    assert_within(c[ok], (a.astype(np.float64) @ b.astype(np.float64))[ok], int8_bound(a, b)[ok], "finite part")


def test_int8_largest_k_is_exact_and_past_it_refused():
    k = _native.INT8_MAX_K
    a = np.ones((2, k), np.float32)
    a[1] = -1
    b = np.ones((k, 3), np.float32)
    c = _native.emulator_gemm_int8(a, _native.quantize_b_int8(b))
    # 127 * 127 * K < 2^31: exact in int32 (and the VNNI kernel's offset sum, which wraps, comes back exact).
    np.testing.assert_array_equal(c, int8_model(a, b))
    with pytest.raises(ValueError):
        _native.emulator_gemm_int8(np.ones((1, k + 1), np.float32), _native.quantize_b_int8(np.ones((k + 1, 1), np.float32)))


def test_int8_generic_kernel_matches_the_fast_one_bit_for_bit():
    code = textwrap.dedent("""
        import numpy as np, sys
        from onnxruntime_ep_xdna import _native
        rng = np.random.default_rng(5)
        a = rng.standard_normal((37, 333)).astype(np.float32)
        b = rng.standard_normal((333, 71)).astype(np.float32)
        np.save(sys.argv[1], _native.emulator_gemm_int8(a, _native.quantize_b_int8(b)))
        print(_native.emulator_int8_kernel_name())
    """)
    out = {}
    for isa in ("", "generic"):
        path = f"/tmp/int8_{os.getpid()}_{isa or 'best'}.npy"
        env = dict(os.environ, XDNA_EMULATOR_ISA=isa)
        name = subprocess.run([sys.executable, "-c", code, path], env=env, check=True, capture_output=True,
                              text=True).stdout.strip()
        out[name] = np.load(path)
        os.unlink(path)
    assert "generic" in out
    for c in out.values():
        np.testing.assert_array_equal(c, out["generic"])


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_bf16x3_within_near_fp32_bound(m, k, n):
    a, b = problem(m, k, n, seed=m + k * 3 + n)
    c = _native.emulator_gemm_bf16x3(a, _native.pack_b_bf16x3(b))
    assert_within(c, a.astype(np.float64) @ b.astype(np.float64), bf16x3_bound(a, b, k), f"bf16x3 {m}x{k}x{n}")


def test_bf16x3_bound_rejects_plain_bf16():
    # The near-fp32 bound is ~2^7 tighter than bf16's: one bf16 GEMM must break it, or it proves nothing.
    a, b = problem(32, 512, 64, seed=9)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    plain = _native.emulator_gemm(a, _native.pack_b(b))
    assert np.any(np.abs(plain - exact) > bf16x3_bound(a, b, 512))


def test_bf16x3_nonfinite_inputs_propagate_as_in_bf16():
    a, b = problem(3, 70, 4, seed=2)
    a[0, 5] = np.inf
    b[6, 1] = np.nan
    c = _native.emulator_gemm_bf16x3(a, _native.pack_b_bf16x3(b))
    exact = a.astype(np.float64) @ b.astype(np.float64)
    assert_within(c, exact, bf16x3_bound(a, b, 70), "non-finite")
