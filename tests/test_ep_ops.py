"""Every claimed case: placed on the EP (proved by ORT's assignment info), within the bf16 bound of the exact
result, and consistent with ORT's CPU EP."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from ep_helpers import (
    EP,
    assert_within,
    bf16_bound,
    cpu_session,
    ep_nodes,
    init,
    make_model,
    rng,
    tensor,
    xdna_session,
)

DISABLE_ALL = ort.GraphOptimizationLevel.ORT_DISABLE_ALL


def run_both(model, feeds, exact, bound, expect_on_ep, level=None, options=None):
    sess = xdna_session(model, options, level)
    on_ep = ep_nodes(sess)
    assert sorted(op for _, op in on_ep) == sorted(expect_on_ep), f"placement: {on_ep}"
    out = sess.run(None, feeds)[0]
    ref = cpu_session(model, level).run(None, feeds)[0]
    assert_within(out, exact, bound, "EP vs exact")
    assert_within(ref, exact, bound, "CPU EP vs exact (sanity of the bound)")
    assert_within(out, ref, 2 * bound, "EP vs CPU EP")
    return sess, out


def matmul_exact(a, b):
    return np.matmul(a.astype(np.float64), b.astype(np.float64))


def matmul_bound(a, b):
    return bf16_bound(a, b, a.shape[-1])


# ---- MatMul with a constant weight ----------------------------------------------------------------------

@pytest.mark.parametrize(
    "a_shape,b_shape",
    [
        ((7, 100), (100, 65)),
        ((300, 64), (64, 257)),
        ((2, 5, 33), (33, 17)),  # 3-D activations, as in transformer layers
        ((2, 3, 4, 9), (9, 5)),
        ((1, 1), (1, 1)),
        ((1, 512), (512, 3)),  # a decoder GEMV
        ((33,), (33, 17)),  # 1-D A
        ((4, 33), (33,)),  # 1-D B
        # batched constant B (matrices large enough that padding each to a 64x256 block stays within 4x the
        # weight: smaller ones are left to the CPU EP, see test_ep_hardening.py)
        ((3, 4, 60), (3, 60, 50)),
        ((4, 60), (3, 60, 50)),  # A broadcast against batched B
    ],
)
def test_matmul_constant_weight(a_shape, b_shape):
    r = rng(sum(a_shape) + sum(b_shape))
    a = r.standard_normal(a_shape).astype(np.float32)
    b = r.standard_normal(b_shape).astype(np.float32)
    y_rank = len(np.matmul(a, b).shape)
    model = make_model(
        [helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")],
        [tensor("a", list(a_shape))],
        [tensor("y", [None] * y_rank)],
        [init("w", b)],
    )
    run_both(model, {"a": a}, matmul_exact(a, b), matmul_bound(a, b), ["MatMul"])


def test_matmul_add_becomes_gemm_and_is_claimed_at_default_level():
    """ORT fuses MatMul+Add with a 2-D constant weight into Reshape->Gemm->Reshape before GetCapability."""
    r = rng(1)
    a = r.standard_normal((2, 6, 48)).astype(np.float32)
    w = r.standard_normal((48, 40)).astype(np.float32)
    bias = r.standard_normal(40).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["a", "w"], ["h"], name="mm"), helper.make_node("Add", ["h", "bias"], ["y"])],
        [tensor("a", [2, 6, 48])],
        [tensor("y", [2, 6, 40])],
        [init("w", w), init("bias", bias)],
    )
    exact = matmul_exact(a, w) + bias
    bound = matmul_bound(a, w) + 2.0**-23 * np.abs(exact)
    run_both(model, {"a": a}, exact, bound, ["Gemm"])
    # Without optimizations the MatMul itself is claimed and the Add stays on the CPU EP.
    sess, _ = run_both(model, {"a": a}, exact, bound, ["MatMul"], level=DISABLE_ALL)
    assert "Add" in [op for _, op in _cpu_nodes(sess)]


def _cpu_nodes(sess):
    import onnxruntime_ep_xdna as xdna

    return xdna.placement(sess).on("CPUExecutionProvider")


# ---- MatMul with both operands at run time (attention) ---------------------------------------------------

@pytest.mark.parametrize(
    "a_shape,b_shape",
    [
        ((1, 4, 30, 16), (1, 4, 16, 30)),  # attention scores Q.K^T
        ((1, 4, 30, 30), (1, 4, 30, 16)),  # attention . V
        ((2, 1, 5, 7), (1, 3, 7, 4)),  # broadcasting of batch dims both ways
        ((9, 13), (13, 70)),
        ((6, 13), (2, 13, 5)),
        ((13,), (2, 13, 5)),  # 1-D A
        ((2, 5, 13), (13,)),  # 1-D B
        ((13,), (13,)),  # dot product -> scalar
    ],
)
def test_matmul_both_runtime(a_shape, b_shape):
    r = rng(len(a_shape) * 10 + len(b_shape))
    a = r.standard_normal(a_shape).astype(np.float32)
    b = r.standard_normal(b_shape).astype(np.float32)
    y_rank = np.matmul(a, b).ndim
    model = make_model(
        [helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")],
        [tensor("a", list(a_shape)), tensor("b", list(b_shape))],
        [tensor("y", [None] * y_rank)],
    )
    run_both(model, {"a": a, "b": b}, matmul_exact(a, b), matmul_bound(a, b), ["MatMul"])


# ---- Gemm -------------------------------------------------------------------------------------------------

GEMM_C = ["none", "const_n", "const_mn", "const_scalar", "const_m1", "runtime_1n", "runtime_mn"]


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_kind", GEMM_C)
@pytest.mark.parametrize("b_runtime", [False, True])
def test_gemm(trans_a, trans_b, c_kind, b_runtime):
    M, K, N = 11, 70, 9
    alpha, beta = 0.75, -1.5
    r = rng(trans_a * 100 + trans_b * 10 + GEMM_C.index(c_kind) + 1000 * b_runtime)
    a = r.standard_normal((K, M) if trans_a else (M, K)).astype(np.float32)
    b = r.standard_normal((N, K) if trans_b else (K, N)).astype(np.float32)
    c_shape = {"none": None, "const_n": (N,), "const_mn": (M, N), "const_scalar": (), "const_m1": (M, 1),
               "runtime_1n": (1, N), "runtime_mn": (M, N)}[c_kind]
    c = None if c_shape is None else r.standard_normal(c_shape).astype(np.float32)
    inputs = [tensor("a", list(a.shape))]
    inits, feeds, names = [], {"a": a}, ["a", "b"]
    if b_runtime:
        inputs.append(tensor("b", list(b.shape)))
        feeds["b"] = b
    else:
        inits.append(init("b", b))
    if c is not None:
        names.append("c")
        if c_kind.startswith("runtime"):
            inputs.append(tensor("c", list(c.shape)))
            feeds["c"] = c
        else:
            inits.append(init("c", c))
    node = helper.make_node("Gemm", names, ["y"], name="gemm", transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    model = make_model([node], inputs, [tensor("y", [M, N])], inits)
    a2 = a.T if trans_a else a
    b2 = b.T if trans_b else b
    exact = alpha * matmul_exact(a2, b2)
    if c is not None:
        exact = exact + beta * c.astype(np.float64)
    bound = abs(alpha) * matmul_bound(a2, b2) + 4 * 2.0**-24 * (np.abs(exact) + (0 if c is None else abs(beta) * np.abs(c)))
    run_both(model, feeds, exact, bound, ["Gemm"])


# ---- shapes across runs, odd sizes, special values --------------------------------------------------------

def test_dynamic_shapes_across_runs_in_one_session():
    r = rng(5)
    w = r.standard_normal((24, 40)).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")],
        [tensor("a", ["batch", "seq", 24])],
        [tensor("y", ["batch", "seq", 40])],
        [init("w", w)],
    )
    sess = xdna_session(model)
    assert ep_nodes(sess) == [("mm", "MatMul")]
    for shape in [(1, 1, 24), (2, 3, 24), (5, 300, 24), (1, 1, 24)]:
        a = r.standard_normal(shape).astype(np.float32)
        assert_within(sess.run(None, {"a": a})[0], matmul_exact(a, w), matmul_bound(a, w), str(shape))


@pytest.mark.parametrize("a_shape,b_shape", [((0, 8), (8, 5)), ((4, 0), (0, 5)), ((4, 8), (8, 0)), ((2, 0, 8), (8, 3))])
def test_zero_size_dimensions(a_shape, b_shape):
    a = np.ones(a_shape, np.float32)
    b = np.ones(b_shape, np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")],
        [tensor("a", [None] * len(a_shape)), tensor("b", [None] * len(b_shape))],
        [tensor("y", [None] * len(a_shape))],
    )
    sess = xdna_session(model)
    assert ep_nodes(sess) == [("mm", "MatMul")]
    out = sess.run(None, {"a": a, "b": b})[0]
    np.testing.assert_array_equal(out, np.matmul(a, b))


def test_nan_and_inf_propagate_like_ieee():
    r = rng(6)
    a = r.standard_normal((6, 20)).astype(np.float32)
    w = r.standard_normal((20, 7)).astype(np.float32)
    a[1, 3] = np.nan
    a[2, 5] = np.inf
    a[3, 0] = -np.inf
    w[4, 2] = np.inf  # row 0 of A times inf in column 2; A[2,5]*W[5,:] adds inf too
    w[:, 6] = 0.0  # inf * 0 = nan in column 6 for rows 2, 3
    model = make_model(
        [helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")], [tensor("a", [6, 20])], [tensor("y", [6, 7])],
        [init("w", w)],
    )
    with np.errstate(invalid="ignore"):  # inf * 0 is the point
        exact = (a.astype(np.float64)[:, :, None] * w.astype(np.float64)[None, :, :]).sum(axis=1)
    sess = xdna_session(model)
    assert ep_nodes(sess) == [("mm", "MatMul")]
    out = sess.run(None, {"a": a})[0]
    assert np.isnan(exact).any() and np.isinf(exact).any()
    with np.errstate(invalid="ignore"):
        assert_within(out, exact, matmul_bound(np.nan_to_num(a, posinf=0, neginf=0, nan=0), np.nan_to_num(w, posinf=0)))


def test_large_values_round_within_bf16_range():
    a = np.full((2, 3), 1e30, np.float32)
    w = np.full((3, 2), 1e5, np.float32)
    model = make_model([helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")], [tensor("a", [2, 3])],
                       [tensor("y", [2, 2])], [init("w", w)])
    out = xdna_session(model).run(None, {"a": a})[0]
    assert_within(out, matmul_exact(a, w), matmul_bound(a, w))


# ---- what stays on the CPU EP -----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "dtype,np_dtype",
    [(TensorProto.DOUBLE, np.float64), (TensorProto.INT32, np.int32), (TensorProto.FLOAT16, np.float16),
     (TensorProto.INT64, np.int64)],
)
def test_non_float32_left_on_cpu(dtype, np_dtype):
    a = np.arange(12).reshape(3, 4).astype(np_dtype)
    w = np.arange(8).reshape(4, 2).astype(np_dtype)
    model = make_model([helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")], [tensor("a", [3, 4], dtype)],
                       [tensor("y", [3, 2], dtype)], [init("w", w)], opset=17)
    sess = xdna_session(model)
    assert ep_nodes(sess) == []
    np.testing.assert_array_equal(sess.run(None, {"a": a})[0], np.matmul(a, w))


def test_min_mflop_leaves_small_nodes_on_cpu():
    r = rng(7)
    w_small = r.standard_normal((8, 8)).astype(np.float32)
    w_big = r.standard_normal((8, 512)).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["a", "ws"], ["h"], name="small"),
         helper.make_node("MatMul", ["h", "wb"], ["y"], name="big")],
        [tensor("a", [64, 8])], [tensor("y", [64, 512])], [init("ws", w_small), init("wb", w_big)],
    )
    # small: 2*64*8*8 = 8192 FLOP; big: 2*64*8*512 = 524288 FLOP
    sess = xdna_session(model, {"min_mflop": "0.1"})
    assert ep_nodes(sess) == [("big", "MatMul")]
    a = r.standard_normal((64, 8)).astype(np.float32)
    h = np.matmul(a.astype(np.float64), w_small)
    assert_within(sess.run(None, {"a": a})[0], h @ w_big, bf16_bound(h, w_big, 8) + 1e-5 * np.abs(h) @ np.abs(w_big))
