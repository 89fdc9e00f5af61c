"""The precision modes of the contract (kernels/gemm_contract.h, "Precision modes") on the emulator, kernel level:
int8 (A8W8) and bf16x3, each against float64 numpy within its own derived bound (tests/numerics.py), int8 also
bit for bit against a numpy model of its integer arithmetic. Not yet reachable through the EP (issue 13)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cpu_isa import AMX_REFUSED_BY_LINUX, CPU_HAS_AMX, cpu_flags, run_with_isa, unavailable
from numerics import assert_within, bf16x3_bound, int8_bound
from onnxruntime_ep_xdna import _native

SHAPES = [(1, 1, 1), (1, 513, 300), (3, 64, 64), (7, 200, 130), (64, 384, 1536), (300, 129, 67), (700, 515, 300)]


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


_INT8_ISA_CHECK = textwrap.dedent("""
    import numpy as np, sys
    from onnxruntime_ep_xdna import _native
    rng = np.random.default_rng(5)
    out = {}
    # Random shapes on both sides of the few-row / blocked split and of the 4-deep, 16-wide packing.
    shapes = [(1, 1, 1), (3, 5, 17), (16, 333, 71), (17, 64, 64), (37, 333, 71), (200, 130, 300)]
    # Every row count of the AMX kernel's 16-row tiles and 32-row blocks (the VNNI kernel below 4 rows), K around
    # its 64-deep steps and N around its 16-column tiles and 32-column blocks.
    ks, ns = [1, 4, 63, 64, 65, 129, 200], [1, 15, 16, 17, 31, 32, 33, 50]
    shapes += [(m, ks[m % len(ks)], ns[(3 * m) % len(ns)]) for m in range(1, 41)] + [(250, 65, 33), (389, 1030, 211)]
    for m, k, n in shapes:
        a = (rng.standard_normal((m, k)) * np.exp2(rng.integers(-8, 9, (m, 1)))).astype(np.float32)
        b = (rng.standard_normal((k, n)) * np.exp2(rng.integers(-8, 9, (1, n)))).astype(np.float32)
        out[f"random {m}x{k}x{n}"] = _native.emulator_gemm_int8(a, _native.quantize_b_int8(b))
    # Few rows (beam search: AMX tiles of just those rows from 2 rows, VNNI at 1) on decoder-like K and N with
    # tails, on one thread and on two (columns split: the same bits either way).
    for m in range(1, 21):
        k, n = [512, 513, 2048, 65][m % 4], [512, 515, 2049, 1040, 33][m % 5]
        a = (rng.standard_normal((m, k)) * np.exp2(rng.integers(-8, 9, (m, 1)))).astype(np.float32)
        qb = _native.quantize_b_int8(rng.standard_normal((k, n)).astype(np.float32))
        c = _native.emulator_gemm_int8(a, qb, 1)
        np.testing.assert_array_equal(_native.emulator_gemm_int8(a, qb, 2), c, err_msg=f"threads, {m}x{k}x{n}")
        out[f"few rows {m}x{k}x{n}"] = c
    # 5 rows (beam search; avx2: 5 x 8 blocks of their own) at the edges: K of one partial quad, of one quad, a
    # ragged K; N ending in the first or second 8-column half of a panel, or shorter than 8; a NaN row; a
    # 512 x 512 weight (the decoder's: split over two threads on avx2).
    for k, n in [(1, 9), (4, 24), (7, 3), (66, 40), (513, 23), (512, 512), (2048, 51)]:
        a = (rng.standard_normal((5, k)) * np.exp2(rng.integers(-8, 9, (5, 1)))).astype(np.float32)
        a[3, k // 2] = np.nan
        qb = _native.quantize_b_int8(rng.standard_normal((k, n)).astype(np.float32))
        c = _native.emulator_gemm_int8(a, qb, 1)
        np.testing.assert_array_equal(_native.emulator_gemm_int8(a, qb, 2), c, err_msg=f"threads, 5x{k}x{n}")
        for r in range(5):  # each row alone (the 1-row kernel) gives its bits among the five
            np.testing.assert_array_equal(_native.emulator_gemm_int8(a[r:r + 1], qb, 1), c[r:r + 1],
                                          err_msg=f"row {r} alone, 5x{k}x{n}")
        out[f"five rows 5x{k}x{n}"] = c
    # Many rows (encoder-like M, split over row blocks and threads) with every dimension ragged: M not a multiple
    # of the 32-row tile blocks, K of the 64-deep steps, N of the 32-column blocks; one thread and two alike.
    for m, k, n in [(1500, 520, 530), (1501, 2049, 97), (333, 512, 2047)]:
        a = (rng.standard_normal((m, k)) * np.exp2(rng.integers(-8, 9, (m, 1)))).astype(np.float32)
        qb = _native.quantize_b_int8(rng.standard_normal((k, n)).astype(np.float32))
        c = _native.emulator_gemm_int8(a, qb, 1)
        np.testing.assert_array_equal(_native.emulator_gemm_int8(a, qb, 2), c, err_msg=f"threads, {m}x{k}x{n}")
        out[f"many rows {m}x{k}x{n}"] = c
    # Adversarial: every product +-127 * +-127, K at the int32-exact limit (sums near +-2^31; the VNNI offset sum
    # wraps; an int16 pair sum would saturate), signs in all combinations, a ragged K and N.
    k = _native.INT8_MAX_K
    a = np.ones((6, k), np.float32)
    a[1] = -1
    a[2, ::2] = -1
    a[3, 1::3] = -1
    a[4] = -1e30
    a[5, -1] = 1e-30
    b = np.ones((k, 19), np.float32)
    b[:, 1] = -1
    b[::2, 2] = -1
    b[:, 3] = -0.5
    b[k // 2, 4] = -3
    qb = _native.quantize_b_int8(b)
    out["adversarial"] = _native.emulator_gemm_int8(a, qb)
    out["adversarial_a"], out["adversarial_b"] = a, b
    # The same sums through every row-block height (avx2: 16-column blocks up to 3 rows, 6-row blocks, 5 x 8
    # blocks for 5 rows, 4 rows on their own) and the few-row column split on two threads.
    for r in range(1, 6):
        out[f"adversarial {r} rows"] = _native.emulator_gemm_int8(a[:r], qb, 2)
    # Products x * (127 / amax) that round in fp32 to a .5 tie although the exact product is not one: the
    # contract rounds the fp32 product (to even); an FMA-fused x * inv + magic would round the exact one.
    inv = np.float32(127) / np.float32(3)
    ties = [np.float32(3)]
    for j in range(127):
        x0 = np.array([(j + 0.5) / float(inv)], np.float32)
        for d in range(-3, 4):
            x = (x0.view(np.int32) + d).view(np.float32)[0]
            p32, exact = np.float32(x * inv), float(x) * float(inv)
            if p32 % 1 == 0.5 and np.rint(p32) != np.rint(exact):
                ties.append(x)
    assert len(ties) > 20
    t = np.array([ties, [-x for x in ties]] * 4, np.float32)  # 8 rows: AMX tiles, not only the VNNI few rows
    out["ties"] = _native.emulator_gemm_int8(t, _native.quantize_b_int8(np.eye(t.shape[1], 20, dtype=np.float32)))
    out["ties_a"] = t
    a33 = np.tile(a, (6, 1))[:33]  # the same rows through two-tile AMX blocks and a one-row tail
    out["adversarial 33 rows"] = _native.emulator_gemm_int8(a33, _native.quantize_b_int8(b))
    np.savez(sys.argv[1], **out)
    print(_native.emulator_int8_kernel_name())
""")


def test_int8_every_kernel_set_gives_the_same_bits():
    # One process per forced kernel set (the choice is made once per process); the int8 kernel follows it.
    results = {}
    # (XDNA_EMULATOR_ISA, XDNA_EMULATOR_INT8_ISA): the int8 set beside each bf16 set, and the int8 sets that a CPU
    # with more would not choose (avx2 beside avxvnni; avxvnni beside AVX-512) forced on their own.
    runs = [("", ""), ("generic", ""), ("avx2", ""), ("avx512", ""), ("avx512bf16", ""), ("amx", ""),
            ("", "avx2"), ("", "avxvnni")]
    for isa, int8_isa in runs:
        path = f"/tmp/int8_{os.getpid()}_{isa or 'best'}_{int8_isa}.npz"
        proc = run_with_isa(isa, _INT8_ISA_CHECK, path, env_extra={"XDNA_EMULATOR_INT8_ISA": int8_isa})
        assert proc.returncode == 0, proc.stderr
        if (isa and unavailable(isa, proc)) or f"XDNA_EMULATOR_INT8_ISA={int8_isa} is not available" in proc.stderr:
            os.unlink(path)
            continue
        assert not int8_isa or proc.stdout.strip() == int8_isa
        with np.load(path) as f:
            results.setdefault(proc.stdout.strip(), {k: f[k] for k in f.files})
        os.unlink(path)
    assert "generic" in results and "avx2" in results  # every x86-64 CI machine has AVX2
    assert "amx" in results or not CPU_HAS_AMX or AMX_REFUSED_BY_LINUX in proc.stderr
    assert "avxvnni" in results or "avx_vnni" not in cpu_flags()
    reference = results["generic"]
    for name, got in results.items():
        for case, c in got.items():
            np.testing.assert_array_equal(c, reference[case], err_msg=f"{name} vs generic: {case}")
    # And they are the contract's: the adversarial sums (127 * 127 * K and its signed variants) are exact.
    adv = reference["adversarial"]
    np.testing.assert_array_equal(adv, int8_model(reference["adversarial_a"], reference["adversarial_b"]))
    for r in range(1, 6):
        np.testing.assert_array_equal(reference[f"adversarial {r} rows"], adv[:r], err_msg=f"{r} rows")
    t = reference["ties_a"]
    np.testing.assert_array_equal(reference["ties"], int8_model(t, np.eye(t.shape[1], 20, dtype=np.float32)))
    k = _native.INT8_MAX_K  # 127 * 127 * k in int32, dequantised by (1/127)^2
    assert adv[0, 0] == -adv[0, 1] == -adv[1, 0] and abs(adv[0, 0] - k) <= k * 2.0**-20


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
