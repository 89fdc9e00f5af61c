"""MatMul operands made by a Transpose (attention's head split and K^T) are read through it: the Transpose is
claimed with the MatMul and never materialised. Placement and results against numpy within the bf16 bound."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from ep_helpers import assert_within, bf16_bound, ep_nodes, make_model, rng, tensor, xdna_session


def run_case(nodes, feeds, a, b):
    """Runs the graph on the EP and checks y against numpy's a @ b (a, b: the operands as the MatMul sees them)."""
    out_shape = list(np.matmul(a, b).shape)
    model = make_model(nodes, [tensor(name, list(v.shape)) for name, v in feeds.items()], [tensor("y", out_shape)])
    sess = xdna_session(model)
    y = sess.run(None, feeds)[0]
    assert_within(y, np.matmul(a.astype(np.float64), b.astype(np.float64)), bf16_bound(a, b, a.shape[-1]))
    return sess


@pytest.mark.parametrize("m", [1, 3, 40])  # unpacked (few rows) and packed paths
def test_k_transposed_from_cache_layout(m):
    # decoder with past: scores = Q [1,8,m,64] . K^T, K kept as [1,8,T,64]
    q = rng(1).standard_normal((1, 8, m, 64)).astype(np.float32)
    k = rng(2).standard_normal((1, 8, 37, 64)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2], name="tr"),
             helper.make_node("MatMul", ["q", "kt"], ["y"], name="mm")]
    sess = run_case(nodes, {"q": q, "k": k}, q, k.transpose(0, 1, 3, 2))
    assert sorted(ep_nodes(sess)) == [("mm", "MatMul"), ("tr", "Transpose")]


@pytest.mark.parametrize("m", [2, 50])
def test_head_split_transposes_on_both_operands(m):
    # encoder: Q [1,T,H,D] -> [1,H,T,D] as A; K [1,S,H,D] -> [1,H,D,S] as B (perm 0,2,3,1)
    q = rng(3).standard_normal((1, m, 4, 32)).astype(np.float32)
    k = rng(4).standard_normal((1, 70, 4, 32)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["q"], ["qh"], perm=[0, 2, 1, 3], name="tq"),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 3, 1], name="tk"),
             helper.make_node("MatMul", ["qh", "kt"], ["y"], name="mm")]
    sess = run_case(nodes, {"q": q, "k": k}, q.transpose(0, 2, 1, 3), k.transpose(0, 2, 3, 1))
    assert sorted(ep_nodes(sess)) == [("mm", "MatMul"), ("tk", "Transpose"), ("tq", "Transpose")]


def test_transpose_moving_a_last_dim_and_default_perm():
    # A's K dimension is not its innermost one (gathered), and a Transpose without perm (reverse) on 2-D B.
    a = rng(5).standard_normal((2, 24, 6)).astype(np.float32)  # A = a^T per batch: [2, 6, 24]
    b = rng(6).standard_normal((10, 24)).astype(np.float32)    # B = b^T: [24, 10]
    nodes = [helper.make_node("Transpose", ["a"], ["at"], perm=[0, 2, 1], name="ta"),
             helper.make_node("Transpose", ["b"], ["bt"], name="tb"),
             helper.make_node("MatMul", ["at", "bt"], ["y"], name="mm")]
    sess = run_case(nodes, {"a": a, "b": b}, a.transpose(0, 2, 1), b.T)
    assert len(ep_nodes(sess)) == 3


def test_shared_transpose_stays_on_the_cpu():
    # The transposed copy is needed by another node anyway: only the MatMul is claimed.
    q = rng(7).standard_normal((1, 2, 3, 16)).astype(np.float32)
    k = rng(8).standard_normal((1, 2, 9, 16)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2], name="tr"),
             helper.make_node("MatMul", ["q", "kt"], ["y"], name="mm"),
             helper.make_node("Relu", ["kt"], ["r"], name="relu")]
    model = make_model(nodes, [tensor("q", list(q.shape)), tensor("k", list(k.shape))],
                       [tensor("y", [1, 2, 3, 9]), tensor("r", [1, 2, 16, 9])])
    sess = xdna_session(model)
    y, r = sess.run(None, {"q": q, "k": k})
    assert ep_nodes(sess) == [("mm", "MatMul")]
    kt = k.transpose(0, 1, 3, 2)
    np.testing.assert_array_equal(r, np.maximum(kt, 0))
    assert_within(y, q.astype(np.float64) @ kt.astype(np.float64), bf16_bound(q, kt, q.shape[-1]))
