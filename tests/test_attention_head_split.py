"""The head split read through by the fused attention node (ops/transpose_fusion.cc read_through_head_split): Q (and
K, V where nothing else reads them) made by MatMul -> [Mul by a scalar] -> Reshape [.., H*D] -> [.., H, D] ->
Transpose, as optimum's Whisper exports them. The Reshape (and the scale before it) run inside the fused node: they
are placed on our EP, and the results are the bits of the same attention fed the split tensor (it is only
addressing), within numerics.attention_bound of float64 and of ORT's CPU EP. A Reshape that is not a plain split
of the last dim, or that something else reads, stays on the CPU EP with the same results."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from ep_helpers import cpu_session, ep_nodes, init, make_model, tensor, xdna_session
from numerics import assert_within, attention_bound, attention_exact

EMULATOR = {"backend": "emulator"}


def head_split_model(B, H, M, T, D, split=("q",), shape=None, q_scale=None, kv_batch=None, extra_reader=False,
                     out_shape=None, merge=None):
    """Attention over Q [B, H, M, D], K^T [B, H, D, T], V [B, H, T, D]. Each name in `split` comes as [B, rows, H*D]
    through Reshape(shape, default [0, 0, H, D]) and its Transpose, the others as [B, rows, H, D] through their
    Transpose only (the reference: the same attention fed the split tensor). q_scale: a Mul of Q by that scalar
    before its Reshape (or before its Transpose when Q is not split). kv_batch: K and V's batch (1: broadcast over
    the beams). extra_reader: Q's Reshape output is also a graph output. merge: the heads merged again after it,
    O -> Transpose(0, 2, 1, 3) -> Reshape(merge) -> "om" [B, M, H*D] (out_proj's input), the model's output."""
    kv_b = B if kv_batch is None else kv_batch
    rows = {"q": (B, M), "k": (kv_b, T), "v": (kv_b, T)}
    perms = {"q": [0, 2, 1, 3], "k": [0, 2, 3, 1], "v": [0, 2, 1, 3]}
    nodes, inits, inputs, outputs = [], [], [], [tensor("o", out_shape or [B, H, M, D])]
    heads = {}
    for name in ("q", "k", "v"):
        b, r = rows[name]
        src = name
        if name in split:
            inputs.append(tensor(name, [b, r, H * D]))
            if name == "q" and q_scale is not None:
                nodes.append(helper.make_node("Mul", [src, "q_scale"], ["q_scaled"], name="q_mul"))
                src = "q_scaled"
            nodes.append(helper.make_node("Reshape", [src, f"{name}_shape"], [f"{name}_4d"], name=f"{name}_reshape"))
            inits.append(init(f"{name}_shape", np.array(shape or [0, 0, H, D], np.int64)))
            src = f"{name}_4d"
            if name == "q" and extra_reader:
                outputs.append(tensor("q_4d", [b, r, H, D]))
        else:
            inputs.append(tensor(name, [b, r, H, D]))
        nodes.append(helper.make_node("Transpose", [src], [f"{name}_t"], perm=perms[name], name=f"{name}_transpose"))
        heads[name] = f"{name}_t"
    if q_scale is not None:
        inits.append(init("q_scale", np.array(q_scale, np.float32)))
        if "q" not in split:  # the reference: the scale after the Transpose (read into the attention's scale)
            nodes.append(helper.make_node("Mul", [heads["q"], "q_scale"], ["q_scaled"], name="q_mul"))
            heads["q"] = "q_scaled"
    nodes += [helper.make_node("MatMul", [heads["q"], heads["k"]], ["scores"], name="qk"),
              helper.make_node("Softmax", ["scores"], ["p"], axis=-1, name="sm"),
              helper.make_node("MatMul", ["p", heads["v"]], ["o"], name="pv")]
    if merge is not None:
        nodes += [helper.make_node("Transpose", ["o"], ["o_t"], perm=[0, 2, 1, 3], name="o_transpose"),
                  helper.make_node("Reshape", ["o_t", "merge_shape"], ["om"], name="o_reshape")]
        inits.append(init("merge_shape", np.array(merge, np.int64)))
        outputs = [tensor("om", [B, M, H * D])] + outputs[1:]
    return make_model(nodes, inputs, outputs, inits)


def feeds(B, H, M, T, D, split, seed, kv_batch=None):
    """The split tensors [B, rows, H, D] (as the reference takes them) and the same bytes as [B, rows, H*D]."""
    r = np.random.default_rng(seed)
    kv_b = B if kv_batch is None else kv_batch
    four = {"q": r.standard_normal((B, M, H, D)).astype(np.float32),
            "k": r.standard_normal((kv_b, T, H, D)).astype(np.float32),
            "v": r.standard_normal((kv_b, T, H, D)).astype(np.float32)}
    fed = {n: (a.reshape(a.shape[0], a.shape[1], H * D) if n in split else a) for n, a in four.items()}
    return four, fed


def check_bounds(out, cpu, four, scale):
    q = four["q"].transpose(0, 2, 1, 3)
    kt = four["k"].transpose(0, 2, 3, 1)
    v = four["v"].transpose(0, 2, 1, 3)
    bound = attention_bound(q, kt, v, scale)
    exact = attention_exact(q, kt, v, scale)
    assert_within(out, exact, bound, "EP vs float64")
    assert_within(out, cpu, 2 * bound, "EP vs ORT's CPU EP")


@pytest.mark.parametrize("split", [("q",), ("q", "k", "v")])
@pytest.mark.parametrize("B,H,M,T,D", [(1, 3, 20, 33, 64), (2, 2, 5, 40, 40), (5, 8, 1, 150, 64)])
def test_head_split_is_in_the_fused_node(B, H, M, T, D, split):
    """The decoder's Q (scale, Reshape, Transpose) and the encoder's Q, K, V: every node of the chain on our EP, the
    bits of the attention fed the split tensors, within the bounds of float64 and ORT's CPU EP."""
    scale = D ** -0.5  # D=40: not a power of 2, so a scale applied in a different place would change bits
    model = head_split_model(B, H, M, T, D, split, q_scale=scale)
    sess = xdna_session(model, EMULATOR)
    placed = ep_nodes(sess)
    for name in split:
        assert (f"{name}_reshape", "Reshape") in placed and (f"{name}_transpose", "Transpose") in placed, placed
    assert ("q_mul", "Mul") in placed and ("sm", "Softmax") in placed, placed
    four, fed = feeds(B, H, M, T, D, split, seed=B * 100 + M)
    out = sess.run(None, fed)[0]

    reference = xdna_session(head_split_model(B, H, M, T, D, (), q_scale=scale), EMULATOR)
    assert ("q_mul", "Mul") in ep_nodes(reference)
    np.testing.assert_array_equal(out, reference.run(None, four)[0])
    check_bounds(out, cpu_session(model).run(None, fed)[0], four, scale)


def test_decoder_step_with_broadcast_cross_kv():
    """A decode step of 5 beams against one window's K and V (batch 1, broadcast): the one-job-per-head path reads Q
    rows H*D apart in the unsplit tensor; the bits of the split-fed attention."""
    B, H, M, T, D = 5, 8, 1, 300, 64
    model = head_split_model(B, H, M, T, D, ("q",), q_scale=0.125, kv_batch=1)
    sess = xdna_session(model, EMULATOR)
    assert ("q_reshape", "Reshape") in ep_nodes(sess)
    four, fed = feeds(B, H, M, T, D, ("q",), seed=3, kv_batch=1)
    out = sess.run(None, fed)[0]
    reference = xdna_session(head_split_model(B, H, M, T, D, (), q_scale=0.125, kv_batch=1), EMULATOR)
    np.testing.assert_array_equal(out, reference.run(None, four)[0])
    check_bounds(out, cpu_session(model).run(None, fed)[0], four, 0.125)


@pytest.mark.parametrize("shape", [[0, -1, 2, 64], [-1, 0, 2, 64], [3, 0, 2, 64]])
def test_other_spellings_of_the_split(shape):
    """-1 for one kept dim (the others kept and the last one H*D: it is that dim) and a dim given as itself."""
    B, H, M, T, D = 3, 2, 4, 30, 64
    model = head_split_model(B, H, M, T, D, ("q",), shape=shape)
    sess = xdna_session(model, EMULATOR)
    assert ("q_reshape", "Reshape") in ep_nodes(sess)
    four, fed = feeds(B, H, M, T, D, ("q",), seed=4)
    out = sess.run(None, fed)[0]
    np.testing.assert_array_equal(out, xdna_session(head_split_model(B, H, M, T, D, ()), EMULATOR).run(None, four)[0])
    check_bounds(out, cpu_session(model).run(None, fed)[0], four, 1.0)


@pytest.mark.parametrize("case", ["extra_reader", "not_a_split", "batch_mismatch"])
def test_reshapes_that_stay_on_the_cpu_ep(case):
    """Q's Reshape also read elsewhere; a Reshape that moves rows across dims ([B, M, H*D] -> [B, H, M, D]); a kept
    dim spelled as another number ([1, -1, H, D] of batch 2): the Reshape stays on the CPU EP, the attention is still
    fused, within the bounds of ORT's CPU EP."""
    B, H, M, T, D = 2, 4, 4, 30, 16
    shape = {"extra_reader": [0, 0, H, D], "not_a_split": [0, H, -1, D], "batch_mismatch": [1, -1, H, D]}[case]
    model = head_split_model(B, H, M, T, D, ("q",), shape=shape, extra_reader=case == "extra_reader",
                             out_shape=["ob", "oh", "om", "od"])
    sess = xdna_session(model, EMULATOR)
    placed = ep_nodes(sess)
    assert ("q_reshape", "Reshape") not in placed and ("sm", "Softmax") in placed, placed
    four, fed = feeds(B, H, M, T, D, ("q",), seed=5)
    outs, cpu = sess.run(None, fed), cpu_session(model).run(None, fed)
    for got, want in zip(outs[1:], cpu[1:]):  # the Reshape's own output, read elsewhere
        np.testing.assert_array_equal(got, want)
    q = fed["q"].reshape({"extra_reader": (B, M, H, D), "not_a_split": (B, H, M, D),
                          "batch_mismatch": (1, B * M, H, D)}[case]).transpose(0, 2, 1, 3)
    kt, v = four["k"].transpose(0, 2, 3, 1), four["v"].transpose(0, 2, 1, 3)
    assert outs[0].shape == cpu[0].shape
    assert_within(outs[0], cpu[0], 2 * attention_bound(q, kt, v, 1.0), "EP vs ORT's CPU EP")


def test_symbolic_last_dim_checked_at_run_time():
    """x's last dim unknown in the graph: claimed, and a run with a last dim other than H*D fails clearly (as ORT's
    Reshape would), without a crash; a right one runs."""
    B, H, M, T, D = 1, 2, 3, 20, 16
    nodes = [helper.make_node("Reshape", ["q", "shape"], ["q4"], name="q_reshape"),
             helper.make_node("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3], name="q_transpose"),
             helper.make_node("MatMul", ["qt", "kt"], ["scores"], name="qk"),
             helper.make_node("Softmax", ["scores"], ["p"], axis=-1, name="sm"),
             helper.make_node("MatMul", ["p", "v"], ["o"], name="pv")]
    model = make_model(nodes, [tensor("q", ["b", "m", "hd"]), tensor("kt", ["b", H, D, "t"]),
                               tensor("v", ["b", H, "t", D])],
                       [tensor("o", ["b", H, "m", D])], [init("shape", np.array([0, 0, H, D], np.int64))])
    sess = xdna_session(model, EMULATOR)
    assert ("q_reshape", "Reshape") in ep_nodes(sess)
    r = np.random.default_rng(6)
    kt = r.standard_normal((B, H, D, T)).astype(np.float32)
    v = r.standard_normal((B, H, T, D)).astype(np.float32)
    q = r.standard_normal((B, M, H * D)).astype(np.float32)
    out = sess.run(None, {"q": q, "kt": kt, "v": v})[0]
    qh = q.reshape(B, M, H, D).transpose(0, 2, 1, 3)
    assert_within(out, attention_exact(qh, kt, v, 1.0), attention_bound(qh, kt, v, 1.0), "EP vs float64")
    with pytest.raises(Exception, match="last dim is 34, the Reshape splits 32"):
        sess.run(None, {"q": r.standard_normal((B, M, H * D + 2)).astype(np.float32), "kt": kt, "v": v})


def merged(o):
    """O [B, H, M, D] as out_proj reads it: [B, M, H*D]."""
    b, h, m, d = o.shape
    return o.transpose(0, 2, 1, 3).reshape(b, m, h * d)


@pytest.mark.parametrize("merge", [[0, 0, 128], [0, 0, -1], [-1, 0, 128]])
@pytest.mark.parametrize("B,H,M,T,D,kv_batch", [(2, 2, 7, 40, 64, None), (5, 2, 1, 90, 64, 1), (1, 2, 3, 20, 64, None)])
def test_head_merge_is_written_by_the_fused_node(B, H, M, T, D, kv_batch, merge):
    """Transpose(0, 2, 1, 3) and Reshape [B, M, H*D] after the attention: on our EP, written directly (rows of
    different heads interleaved: M > 1, and the one-job-per-head path of the beams: M = 1), the bits of the
    unmerged attention merged by numpy."""
    split = ("q", "k", "v")
    model = head_split_model(B, H, M, T, D, split, q_scale=0.125, kv_batch=kv_batch, merge=merge)
    sess = xdna_session(model, EMULATOR)
    placed = ep_nodes(sess)
    assert ("o_transpose", "Transpose") in placed and ("o_reshape", "Reshape") in placed, placed
    four, fed = feeds(B, H, M, T, D, split, seed=20 + M, kv_batch=kv_batch)
    out = sess.run(None, fed)[0]
    assert out.shape == (B, M, H * D)
    reference = xdna_session(head_split_model(B, H, M, T, D, (), q_scale=0.125, kv_batch=kv_batch), EMULATOR)
    o = reference.run(None, four)[0]
    np.testing.assert_array_equal(out, merged(o))
    check_bounds(o, merged_inverse(cpu_session(model).run(None, fed)[0], H), four, 0.125)


def merged_inverse(om, h):
    b, m, hd = om.shape
    return om.reshape(b, m, h, hd // h).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("case", ["other_perm", "read_elsewhere", "not_a_merge"])
def test_head_merges_that_stay_on_the_cpu_ep(case):
    """A Transpose other than (0, 2, 1, 3), a merged tensor also read elsewhere, a Reshape that is not the merge: the
    Transpose and Reshape stay on the CPU EP, the attention is still fused, within bounds of ORT's CPU EP."""
    B, H, M, T, D = 2, 2, 4, 30, 16
    nodes = [helper.make_node("Transpose", ["q"], ["qt"], perm=[0, 2, 1, 3], name="q_transpose"),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 3, 1], name="k_transpose"),
             helper.make_node("Transpose", ["v"], ["vt"], perm=[0, 2, 1, 3], name="v_transpose"),
             helper.make_node("MatMul", ["qt", "kt"], ["scores"], name="qk"),
             helper.make_node("Softmax", ["scores"], ["p"], axis=-1, name="sm"),
             helper.make_node("MatMul", ["p", "vt"], ["o"], name="pv"),
             helper.make_node("Transpose", ["o"], ["o_t"], perm=[0, 2, 1, 3] if case != "other_perm" else [0, 1, 3, 2],
                              name="o_transpose"),
             helper.make_node("Reshape", ["o_t", "merge_shape"], ["om"], name="o_reshape")]
    shape = {"other_perm": [0, 0, -1], "read_elsewhere": [0, 0, H * D], "not_a_merge": [0, -1, D]}[case]
    outputs = [tensor("om", ["a", "b", "c"])]
    if case == "read_elsewhere":
        outputs.append(tensor("o_t", ["a", "b", "c", "d"]))
    model = make_model(nodes, [tensor("q", [B, M, H, D]), tensor("k", [B, T, H, D]), tensor("v", [B, T, H, D])],
                       outputs, [init("merge_shape", np.array(shape, np.int64))])
    sess = xdna_session(model, EMULATOR)
    placed = ep_nodes(sess)
    assert ("o_reshape", "Reshape") not in placed and ("sm", "Softmax") in placed, placed
    four, _ = feeds(B, H, M, T, D, (), seed=30)
    outs, cpu = sess.run(None, four), cpu_session(model).run(None, four)
    q, kt, v = four["q"].transpose(0, 2, 1, 3), four["k"].transpose(0, 2, 3, 1), four["v"].transpose(0, 2, 1, 3)
    bound = attention_bound(q, kt, v, 1.0)
    if case == "other_perm":
        bound = bound.transpose(0, 1, 3, 2)
    else:
        bound = bound.transpose(0, 2, 1, 3)
    for got, want in zip(outs, cpu):
        assert got.shape == want.shape
        assert_within(got, want, 2 * bound.reshape(want.shape), "EP vs ORT's CPU EP")
