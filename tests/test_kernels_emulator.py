"""The emulator backend against the GEMM contract (kernels/gemm_contract.h).

reference_gemm is the contract written as a scalar loop; emulator_gemm is the fast version. Both are checked
against numpy in float64 on bf16-rounded inputs, within the contract's bound
    |C - C_exact| <= (2^-8 + K * 2^-23) * (|A|.|B|) + tiny,
and against each other. Every kernel set the CPU supports (generic, avx2, avx512, avx512bf16, amx) is exercised through
XDNA_EMULATOR_ISA in a subprocess, since the choice is made once per process.
"""

import textwrap
import threading

import numpy as np
import pytest

from cpu_isa import AMX_REFUSED_BY_LINUX, CPU_HAS_AMX, check_with_isa, cpu_flags, run_with_isa
from numerics import TINY, assert_within, bf16_round
from onnxruntime_ep_xdna import _native

def exact_and_bound(a, b):
    a64 = bf16_round(a).astype(np.float64)
    b64 = bf16_round(b).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        exact = a64 @ b64
        scale = np.abs(a64) @ np.abs(b64)
    k = a.shape[1]
    return exact, (2.0**-8 + k * 2.0**-23) * scale + TINY


def assert_within_contract(c, a, b):
    exact, bound = exact_and_bound(a, b)
    assert c.dtype == np.float32
    assert_within(c, exact, bound)


def random_problem(m, k, n, seed):
    rng = np.random.default_rng(seed)
    # Mixed magnitudes so that rounding of A and B both matter and sums cancel.
    a = (rng.standard_normal((m, k)) * np.exp2(rng.integers(-4, 5, (m, k)))).astype(np.float32)
    b = (rng.standard_normal((k, n)) * np.exp2(rng.integers(-4, 5, (k, n)))).astype(np.float32)
    return a, b


SHAPES = [
    (1, 1, 1),
    (1, 64, 64),
    (1, 513, 300),  # GEMV, K and N not multiples of 64
    (1, 512, 1000),
    (2, 100, 257),
    (4, 70, 700),
    (5, 129, 256),  # just above the direct-kernel row count
    (7, 1, 300),  # K = 1
    (300, 300, 1),  # N = 1
    (65, 257, 130),
    (193, 200, 70),  # more rows than one blocked task
    (250, 300, 513),
]


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_emulator_and_reference_within_contract(m, k, n):
    a, b = random_problem(m, k, n, seed=m * 7919 + k * 31 + n)
    packed = _native.pack_b(b)
    c_emu = _native.emulator_gemm(a, packed)
    c_ref = _native.reference_gemm(a, packed)
    assert_within_contract(c_emu, a, b)
    assert_within_contract(c_ref, a, b)


def test_large_k_error_stays_in_bound():
    # K = 4096 exercises many k-chunks accumulating into C.
    a, b = random_problem(9, 4096, 70, seed=1)
    assert_within_contract(_native.emulator_gemm(a, _native.pack_b(b)), a, b)


def test_result_does_not_depend_on_thread_count():
    a, b = random_problem(301, 333, 450, seed=2)
    packed = _native.pack_b(b)
    first = _native.emulator_gemm(a, packed, threads=1)
    for threads in (0, 2, 3, 8):
        np.testing.assert_array_equal(_native.emulator_gemm(a, packed, threads=threads), first)


@pytest.mark.parametrize("m,k,n", [(0, 5, 7), (3, 5, 0), (0, 0, 0), (3, 0, 7), (1, 0, 1)])
def test_zero_sized_dimensions(m, k, n):
    a = np.ones((m, k), np.float32)
    b = np.ones((k, n), np.float32)
    packed = _native.pack_b(b)
    for c in (_native.emulator_gemm(a, packed), _native.reference_gemm(a, packed)):
        assert c.shape == (m, n)
        np.testing.assert_array_equal(c, np.zeros((m, n), np.float32))  # K = 0: empty sums are 0


@pytest.mark.parametrize("m,k,n", [(1, 64, 1500), (1, 1500, 64), (3, 7, 5), (4, 65, 33), (5, 130, 200), (16, 64, 100)])
def test_unpacked_run_time_b_within_contract(m, k, n):
    # Decoder attention: a few rows against a fresh K/V that is not worth packing; same contract, same answer.
    a, b = random_problem(m, k, n, seed=m * 7 + n)
    c = _native.emulator_gemm_unpacked(a, b)
    assert_within_contract(c, a, b)
    np.testing.assert_allclose(c, _native.reference_gemm(a, _native.pack_b(b)), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(_native.emulator_gemm_unpacked(a, b, threads=1), c)
    c_t = _native.emulator_gemm_unpacked(a, np.ascontiguousarray(b.T), b_transposed=True)  # K^T read from K
    assert_within_contract(c_t, a, b)  # summed in another order than c: the contract's bound, not equality


def test_unpacked_nan_inf_and_zero_k():
    a = np.ones((2, 8), np.float32)
    b = np.ones((8, 40), np.float32)
    a[0, 1] = np.inf
    b[1, :20] = 0.0  # Inf * 0 = NaN in row 0, columns < 20
    b[2, 39] = np.nan
    for c in (_native.emulator_gemm_unpacked(a, b), _native.emulator_gemm_unpacked(a, b.T.copy(), b_transposed=True)):
        assert np.isnan(c[0, :20]).all() and np.isposinf(c[0, 20:39]).all() and np.isnan(c[:, 39]).all()
        np.testing.assert_array_equal(c[1, :39], np.r_[np.full(20, 7.0), np.full(19, 8.0)].astype(np.float32))
    np.testing.assert_array_equal(_native.emulator_gemm_unpacked(np.ones((3, 0), np.float32),
                                                                 np.ones((0, 5), np.float32)), np.zeros((3, 5)))


@pytest.mark.parametrize("m,k,n", [(1, 200, 130), (4, 64, 64), (6, 100, 70), (150, 90, 200)])
def test_nan_and_inf_propagate_like_ieee(m, k, n):
    rng = np.random.default_rng(m + k + n)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    a[0, 3] = np.inf  # row 0: Inf*0 = NaN in the first half of the columns, +-Inf in the rest
    b[3, : n // 2] = 0.0
    b[9, n - 1] = np.nan  # last column: NaN in every row
    if m >= 4:
        a[1, 5], a[1, 6] = -np.inf, np.inf  # row 1: -Inf + Inf = NaN where B[5, j], B[6, j] share a sign
        a[2, 7] = np.nan  # row 2: NaN everywhere
        b[10, 0] = np.inf  # column 0: 0*Inf = NaN, except row 3 where 2*Inf = Inf
        a[:, 10] = 0.0
        a[3, 10] = 2.0
    exact, bound = exact_and_bound(a, b)
    assert np.isnan(exact).any() and np.isinf(exact).any()
    finite = np.isfinite(exact)
    packed = _native.pack_b(b)
    for c in (_native.emulator_gemm(a, packed), _native.reference_gemm(a, packed)):
        np.testing.assert_array_equal(np.isnan(c), np.isnan(exact))
        np.testing.assert_array_equal(np.isposinf(c), np.isposinf(exact))
        np.testing.assert_array_equal(np.isneginf(c), np.isneginf(exact))
        assert (np.abs(c[finite] - exact[finite]) <= bound[finite]).all()


def packed_offset(kpad, k, n):
    tk, tn = _native.TILE_K, _native.TILE_N
    return ((n // tn * (kpad // tk) + k // tk) * tk + k % tk) * tn + n % tn


ROUNDING_CASES = [  # (fp32 bits, expected bf16 bits)
    (0x3F808000, 0x3F80),  # 1 + 2^-8: tie, rounds to even (down)
    (0x3F818000, 0x3F82),  # 1 + 3*2^-8: tie, rounds to even (up)
    (0x3F808001, 0x3F81),  # just above the tie: up
    (0x3F807FFF, 0x3F80),  # just below the tie: down
    (0xBF818000, 0xBF82),  # negative tie
    (0x7F7FFFFF, 0x7F80),  # fp32 max rounds past the bf16 max: +Inf
    (0xFF7FFFFF, 0xFF80),  # -Inf
    (0x7F7F7FFF, 0x7F7F),  # stays the largest finite bf16
    (0x7F800000, 0x7F80),  # +Inf stays
    (0xFF800000, 0xFF80),  # -Inf stays
    (0x7FC00000, 0x7FC0),  # quiet NaN stays
    (0x7F800001, 0x7FC0),  # signalling NaN with a low payload: still a NaN (quiet), not Inf
    (0xFFFFFFFF, 0xFFFF),  # negative NaN keeps its sign
    (0x80000000, 0x8000),  # -0
    (0x00000001, 0x0000),  # tiny subnormal rounds to 0
]


def test_pack_b_rounds_to_nearest_even():
    bits = np.array([c[0] for c in ROUNDING_CASES], dtype=np.uint32)
    b = np.zeros((70, 3), np.float32)  # K > 64: values land in the second k-tile too
    b[:, 1] = np.resize(bits, 70).view(np.float32)
    packed = _native.pack_b(b)
    assert (packed.K, packed.N, packed.Kpad, packed.Npad) == (70, 3, 128, 256)
    data = packed.data
    assert data.shape == (128 * 256,)
    expected = np.resize(np.array([c[1] for c in ROUNDING_CASES], dtype=np.uint16), 70)
    got = np.array([data[packed_offset(128, k, 1)] for k in range(70)], dtype=np.uint16)
    np.testing.assert_array_equal(got, expected)
    # Pads are exact zeros.
    mask = np.ones(data.shape, bool)
    for k in range(70):
        for n in range(3):
            mask[packed_offset(128, k, n)] = False
    assert not data[mask].any()


def test_a_is_rounded_like_b():
    # C = A . I picks out bf16(A), so every corner case of the rounding shows up in C.
    bits = np.array([c[0] for c in ROUNDING_CASES], dtype=np.uint32)
    expected_bits = np.array([c[1] for c in ROUNDING_CASES], dtype=np.uint32) << 16
    a = bits.view(np.float32).reshape(-1, 1)
    packed = _native.pack_b(np.ones((1, 1), np.float32))
    for c in (_native.emulator_gemm(a, packed), _native.reference_gemm(a, packed)):
        got = c.reshape(-1)
        want = expected_bits.view(np.float32)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        finite = ~np.isnan(want)
        # A product with +1 and a sum starting at +0 turn -0 into +0 (IEEE): compare values, not bits, there.
        np.testing.assert_array_equal(got[finite], want[finite] + np.float32(0))


def test_concurrent_calls_from_python_threads():
    problems = [random_problem(m, k, n, seed=i) for i, (m, k, n) in
                enumerate([(1, 512, 2000), (300, 256, 300), (3, 700, 129), (100, 64, 1000)])]
    packed = [_native.pack_b(b) for _, b in problems]
    expected = [_native.emulator_gemm(a, p, threads=1) for (a, _), p in zip(problems, packed)]
    errors = []

    def worker(worker_id):
        try:
            for round_ in range(8):
                i = (worker_id + round_) % len(problems)
                c = _native.emulator_gemm(problems[i][0], packed[i], threads=worker_id % 3)
                np.testing.assert_array_equal(c, expected[i])
        except Exception as e:  # surfaced below: a failing thread must fail the test
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


# ---- every kernel set this CPU can run, each in its own process ----

_ISA_CHECK = textwrap.dedent("""
    import numpy as np
    from onnxruntime_ep_xdna import _native
    rng = np.random.default_rng(5)
    for m, k, n in [(1, 1, 1), (1, 300, 700), (3, 65, 63), (4, 512, 256), (7, 130, 200), (12, 301, 200), (16, 65, 130),
                    (200, 257, 300)]:
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        if k > 2:
            a[0, 1] = np.inf; b[1, :n // 2] = 0; a[-1, 2] = np.nan
        p = _native.pack_b(b)
        r = _native.reference_gemm(a, p)
        for c in (_native.emulator_gemm(a, p), _native.emulator_gemm_unpacked(a, b),
                  _native.emulator_gemm_unpacked(a, np.ascontiguousarray(b.T), b_transposed=True)):
            assert (np.isnan(c) == np.isnan(r)).all() and (np.isinf(c) == np.isinf(r)).all(), (m, k, n)
            ok = np.isfinite(r)
            tol = (2.0**-7 + 2 * k * 2.0**-23) * (np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64))) + 1e-30
            assert (np.abs(c[ok] - r[ok]) <= tol[ok] * 1.02).all(), (m, k, n)
    print("ok")
""")


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512", "avx512bf16", "amx"])
def test_each_kernel_set(isa):
    check_with_isa(isa, _ISA_CHECK, timeout=300)


# ---- AMX (TDPBF16PS): every row, K and N tail of its 16 x 16 tiles, 32 x 32 blocks and 32-deep k steps ----

_AMX_SWEEP = textwrap.dedent("""
    import numpy as np
    from numerics import assert_same_gemm, assert_within, bf16_bound, bf16_round
    from onnxruntime_ep_xdna import _native
    assert _native.emulator_kernel_name() == "amx"
    rng = np.random.default_rng(11)
    ks = [1, 2, 31, 32, 33, 63, 64, 65, 200, 513]
    ns = [1, 15, 16, 17, 31, 33, 64, 65, 130, 300]
    ms = list(range(1, 41)) + [47, 64, 100, 193, 250]  # the direct kernel up to 6 rows, AMX from 7
    for i, m in enumerate(ms):
        for j in range(2):
            k, n = ks[(i + 3 * j) % len(ks)], ns[(2 * i + 5 * j) % len(ns)]
            a = (rng.standard_normal((m, k)) * np.exp2(rng.integers(-4, 5, (m, k)))).astype(np.float32)
            b = (rng.standard_normal((k, n)) * np.exp2(rng.integers(-4, 5, (k, n)))).astype(np.float32)
            p = _native.pack_b(b)
            c = _native.emulator_gemm(a, p)
            what = f"{m}x{k}x{n}"
            assert_within(c, a.astype(np.float64) @ b.astype(np.float64), bf16_bound(a, b, k), what)
            assert_same_gemm(c, _native.reference_gemm(a, p), bf16_round(a), bf16_round(b))
            np.testing.assert_array_equal(_native.emulator_gemm(a, p, threads=1), c, err_msg=what)
    # Row blocks of several tasks and ragged edges together, K over many tile steps.
    a = rng.standard_normal((389, 1030)).astype(np.float32)
    b = rng.standard_normal((1030, 211)).astype(np.float32)
    p = _native.pack_b(b)
    c = _native.emulator_gemm(a, p)
    assert_within(c, a.astype(np.float64) @ b.astype(np.float64), bf16_bound(a, b, 1030), "389x1030x211")
    assert_same_gemm(c, _native.reference_gemm(a, p), bf16_round(a), bf16_round(b))
    print("ok")
""")


def test_amx_bf16_shape_sweep_within_contract():
    check_with_isa("amx", _AMX_SWEEP)


# ---- Few rows (beam search) on a B paired once for the AMX tiles (the emulator backend's bf16 weights) ----

_PAIRED_SWEEP = textwrap.dedent("""
    import sys
    import numpy as np
    from numerics import assert_same_gemm, assert_within, bf16_bound, bf16_round
    from onnxruntime_ep_xdna import _native
    amx = _native.emulator_kernel_name() == "amx"
    wanted = [_native.emulator_wants_paired_b(m) for m in (1, 2, 16, 17)]
    assert wanted == ([False, True, True, False] if amx else [False] * 4)
    rng = np.random.default_rng(17)
    ks = [1, 2, 31, 32, 33, 64, 65, 513]
    ns = [1, 15, 16, 17, 33, 64, 65, 130, 515]
    for m in range(1, 21):  # 1: the direct kernel; 2..16: the tiles on the paired B; 17..20: the blocked path
        for j in range(3):
            k, n = ks[(m + 3 * j) % len(ks)], ns[(2 * m + 5 * j) % len(ns)]
            a = (rng.standard_normal((m, k)) * np.exp2(rng.integers(-4, 5, (m, k)))).astype(np.float32)
            b = (rng.standard_normal((k, n)) * np.exp2(rng.integers(-4, 5, (k, n)))).astype(np.float32)
            if j == 2 and k > 3:  # Inf and NaN go through the tiles as IEEE fp32 says
                a[0, 3], b[1, 0] = np.inf, np.nan
            p = _native.pack_b(b)
            pairs = _native.emulator_pair_b(p)
            assert pairs.size == (p.Kpad * p.Npad // 2 if amx else 0)
            c = _native.emulator_gemm_paired(a, p, pairs, threads=2)
            what = f"{m}x{k}x{n}"
            with np.errstate(invalid="ignore"):
                exact = a.astype(np.float64) @ b.astype(np.float64)
            assert_within(c, exact, bf16_bound(a, b, k), what)
            finite = np.isfinite(a).all() and np.isfinite(b).all()
            if finite:
                assert_same_gemm(c, _native.reference_gemm(a, p), bf16_round(a), bf16_round(b))
            # Columns split over threads: every output computed the same way whatever the split.
            np.testing.assert_array_equal(_native.emulator_gemm_paired(a, p, pairs, threads=1), c, err_msg=what)
    # A weight with many 64-column tiles and 32-deep steps (the logits projection's shape, smaller).
    a = rng.standard_normal((5, 512)).astype(np.float32)
    b = rng.standard_normal((512, 4133)).astype(np.float32)
    p = _native.pack_b(b)
    c = _native.emulator_gemm_paired(a, p, _native.emulator_pair_b(p))
    assert_within(c, a.astype(np.float64) @ b.astype(np.float64), bf16_bound(a, b, 512), "5x512x4133")
    print("ok")
""")


@pytest.mark.parametrize("isa", ["amx", "avx512"])
def test_paired_few_rows_sweep_within_contract(isa):
    # amx: the tiles on the paired B; avx512: no paired kernel (empty pairs), the direct kernel serves.
    check_with_isa(isa, _PAIRED_SWEEP)


_DEFAULT_CHOICE = textwrap.dedent("""
    from onnxruntime_ep_xdna import _native
    print(_native.emulator_kernel_name(), _native.emulator_int8_kernel_name())
""")


def test_default_kernel_choice_follows_the_cpu():
    flags = cpu_flags()
    if not {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        pytest.skip("no AVX-512 on this CPU: the choice among the AVX-512 and AMX sets is not made here")
    proc = run_with_isa("", _DEFAULT_CHOICE)
    assert proc.returncode == 0, proc.stderr
    if CPU_HAS_AMX and AMX_REFUSED_BY_LINUX not in proc.stderr:
        assert proc.stdout.split() == ["amx", "amx"]
    # AMX refused by Linux (simulated): AVX-512 kernels, and on an Intel core fp32 FMA rather than VDPBF16PS
    # (slower there, benchmarks/README.md); the refusal is logged once.
    denied = run_with_isa("", _DEFAULT_CHOICE, env_extra={"XDNA_EMULATOR_DENY_AMX": "1"})
    assert denied.returncode == 0, denied.stderr
    bf16_set, int8_set = denied.stdout.split()
    assert int8_set == ("vnni" if "avx512_vnni" in flags else "avx2")
    intel = "GenuineIntel" in open("/proc/cpuinfo").read()
    assert bf16_set == ("avx512bf16" if "avx512_bf16" in flags and not intel else "avx512")
    if CPU_HAS_AMX:
        assert denied.stderr.count(AMX_REFUSED_BY_LINUX) == 1
    forced = run_with_isa("amx", _DEFAULT_CHOICE, env_extra={"XDNA_EMULATOR_DENY_AMX": "1"})
    assert "XDNA_EMULATOR_ISA=amx is not available on this CPU; using 'avx512" in forced.stderr
    assert forced.returncode == 0 and forced.stdout.split()[0] == bf16_set
