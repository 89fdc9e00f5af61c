"""The fused attention with an additive mask and the NaN rule (kernels/attention_contract.h; ops/attention.cc): the
decoder's masked self-attention MatMul -> [scale] -> Add(mask) -> Softmax -> Where(IsNaN(P), 0, P) -> MatMul as one
node. Kernels against float64 (numerics.assert_masked_attention: NaN rows as ORT's Softmax gives them, or zero under
the NaN rule, the rest within attention_bound): causal masks, fully masked rows, NaN/Inf in Q/K/V/mask, ragged T,
few rows (bf16 and fp32 K/V) and many rows, every kernel set this CPU runs; the EP: placement (one node), against
ORT's CPU EP and float64, mask shapes that broadcast, refusals, the fake XRT device (declines, logged)."""

from __future__ import annotations

import textwrap

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from cpu_isa import check_with_isa
from ep_helpers import EP, bf16_round_trip, cpu_session, ep_nodes, init, make_model, tensor, use_fake_npu, xdna_session
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


# ---- the EP: the decoder's pattern as one node ----

def masked_model(B, H, M, T, D=64, mask_shape=None, nan_rule=True, bf16_kv=True, scale_on="q", mask_first=False,
                 mask_constant=None, where_zero=0.0, kv_batch=None):
    """decoder_graph's self-attention (the optimised decoder_with_past, after the bf16 cache): q [B, H, M, D] scaled
    by a Mul, K^T by a Transpose of k [B, H, T, D], both K and V through Cast(bf16) -> Cast(float), the scores plus
    the mask (mask_shape: a run-time input; mask_constant: an initializer), Softmax, Where(IsNaN(P), 0, P), P V."""
    s = D ** -0.5
    nodes, inits = [], [init("scale", np.array(s, np.float32)), init("zero", np.array(where_zero, np.float32))]
    k, v = "k", "v"
    if bf16_kv:
        casts, (k, v) = bf16_round_trip("k", "v")
        nodes += casts
    nodes.append(helper.make_node("Transpose", [k], ["kt"], perm=[0, 1, 3, 2], name="tk"))
    if scale_on == "q":
        nodes += [helper.make_node("Mul", ["q", "scale"], ["qs"], name="mq"),
                  helper.make_node("MatMul", ["qs", "kt"], ["scores"], name="qk")]
    else:
        nodes += [helper.make_node("MatMul", ["q", "kt"], ["raw"], name="qk"),
                  helper.make_node("Mul", ["raw", "scale"], ["scores"], name="ms")]
    kv_batch = B if kv_batch is None else kv_batch
    inputs = [tensor("q", [B, H, M, D]), tensor("k", [kv_batch, H, T, D]), tensor("v", [kv_batch, H, T, D])]
    if mask_constant is not None:
        inits.append(init("mask", mask_constant))
    else:
        inputs.append(tensor("mask", mask_shape))
    add_in = ["mask", "scores"] if mask_first else ["scores", "mask"]
    nodes += [helper.make_node("Add", add_in, ["masked"], name="add"),
              helper.make_node("Softmax", ["masked"], ["p"], axis=-1, name="sm")]
    probs = "p"
    if nan_rule:
        nodes += [helper.make_node("IsNaN", ["p"], ["isnan"], name="isnan"),
                  helper.make_node("Where", ["isnan", "zero", "p"], ["p0"], name="where")]
        probs = "p0"
    nodes.append(helper.make_node("MatMul", [probs, v], ["o"], name="pv"))
    return make_model(nodes, inputs, [tensor("o", [B, H, M, D])], inits)


def masked_feeds(B, H, M, T, mask_shape, seed, D=64):
    """Q, K, V and the causal mask in mask_shape (rows: M or 1, the last one; keys: T, or 1: zeros)."""
    r = np.random.default_rng(seed)
    rows = causal(M, T) if mask_shape[-2] == M else causal(M, T)[-1:]
    mask = np.broadcast_to(rows if mask_shape[-1] == T else np.zeros((rows.shape[0], 1), np.float32), mask_shape)
    return {"q": r.standard_normal((B, H, M, D)).astype(np.float32),
            "k": r.standard_normal((B, H, T, D)).astype(np.float32),
            "v": r.standard_normal((B, H, T, D)).astype(np.float32),
            "mask": np.ascontiguousarray(mask, np.float32).reshape(mask_shape)}


FUSED = {("tk", "Transpose"), ("mq", "Mul"), ("qk", "MatMul"), ("add", "Add"), ("sm", "Softmax"),
         ("isnan", "IsNaN"), ("where", "Where"), ("pv", "MatMul")}


def check_ep(model, f, nan_rule=True, bf16_kv=True):
    sess = xdna_session(model, {"backend": "emulator"})
    out = sess.run(None, f)[0]
    cpu = cpu_session(model).run(None, f)[0]
    k, v = (bf16_round(f[n]) if bf16_kv else f[n] for n in ("k", "v"))
    kt = np.swapaxes(k, -1, -2)
    D = f["q"].shape[-1]
    q = f["q"]
    assert_masked_attention(out, q, kt, v, D ** -0.5, f["mask"], nan_rule, "EP")
    if nan_rule:  # ORT's CPU EP: the same zero rows (and the finite ones within the bound)
        assert_masked_attention(cpu, q, kt, v, D ** -0.5, f["mask"], True, "CPU EP")
    np.testing.assert_array_equal(np.isnan(out), np.isnan(cpu))
    return sess, out, cpu


@pytest.mark.parametrize("B,H,M,T,mask_shape", [
    (1, 8, 1, 129, [1, 1, 1, 129]),   # a step at batch 1: the mask as decoder_graph's Where gives it
    (5, 8, 1, 129, [5, 1, 1, 129]),   # five beams, a mask per beam
    (5, 8, 1, 129, [1, 129]),         # rank 2, broadcast over batch and heads
    (1, 8, 4, 4, [1, 1, 4, 4]),       # the prompt: four tokens, causal
    (2, 8, 3, 5, [3, 5]),             # the prompt after two cached tokens
    (2, 3, 20, 20, [2, 3, 20, 20]),   # many rows, a mask per head
    (2, 2, 3, 40, [1, 1, 3, 1]),      # broadcast over the keys: expanded
])
def test_masked_self_attention_is_one_node(B, H, M, T, mask_shape):
    model = masked_model(B, H, M, T, mask_shape=mask_shape)
    f = masked_feeds(B, H, M, T, mask_shape, seed=M + T)
    if mask_shape[-1] == 1:
        f["mask"] = np.zeros(mask_shape, np.float32)
        f["mask"][..., 1, 0] = NEG_INF  # a fully masked row
    sess, _, _ = check_ep(model, f)
    placed = set(ep_nodes(sess))
    assert FUSED <= placed, FUSED - placed
    assert {("k_to_fp32", "Cast"), ("v_to_fp32", "Cast")} <= placed  # K and V read as bf16


@pytest.mark.parametrize("variant", [dict(nan_rule=False), dict(bf16_kv=False), dict(scale_on="scores"),
                                     dict(mask_first=True)])
def test_masked_variants(variant):
    B, H, M, T = 2, 2, 3, 37
    model = masked_model(B, H, M, T, mask_shape=[B, 1, M, T], **variant)
    f = masked_feeds(B, H, M, T, [B, 1, M, T], seed=9)
    f["mask"][1, 0, 2] = NEG_INF  # a fully masked row: NaN without the rule, zero with it
    sess, out, _ = check_ep(model, f, variant.get("nan_rule", True), variant.get("bf16_kv", True))
    assert ("sm", "Softmax") in ep_nodes(sess) and ("add", "Add") in ep_nodes(sess)
    assert np.isnan(out[1, :, 2]).all() != variant.get("nan_rule", True)


def test_non_finite_inputs_match_the_cpu_ep():
    """NaN in Q, +Inf in K, NaN / +Inf in the mask, Inf in V: the NaN rule's zero rows and NaN columns as ORT's CPU
    EP gives them."""
    B, H, M, T = 2, 2, 3, 40
    model = masked_model(B, H, M, T, mask_shape=[B, H, M, T], bf16_kv=False)
    f = masked_feeds(B, H, M, T, [B, H, M, T], seed=4)
    f["q"][0, 1, 2, 5] = np.nan
    f["k"][1, 0, 33, :] = np.inf
    f["mask"][0, 0, 1, 20] = np.nan
    f["mask"][1, 1, 0, 3] = np.inf
    f["v"][0, 0, 12, 7] = np.inf
    f["v"][1, 1, 39, 2] = np.nan
    _, out, cpu = check_ep(model, f, bf16_kv=False)
    np.testing.assert_array_equal(out[np.isnan(out) | (cpu == 0)], cpu[np.isnan(out) | (cpu == 0)])


@pytest.mark.parametrize("why,kwargs", [
    ("constant mask", dict(mask_constant=np.zeros((1, 1, 3, 20), np.float32))),
    ("Where of a non-zero", dict(where_zero=1.0)),
])
def test_refused_patterns_stay_unfused(why, kwargs):
    """A constant mask (not a run-time input of the node) and a Where that is not the NaN rule: the Softmax stays on
    the CPU EP, the numbers as ORT's."""
    B, H, M, T = 1, 2, 3, 20
    mask_shape = [1, 1, M, T]
    model = masked_model(B, H, M, T, mask_shape=mask_shape, **kwargs)
    f = masked_feeds(B, H, M, T, mask_shape, seed=1)
    if "mask_constant" in kwargs:
        del f["mask"]
    sess = xdna_session(model, {"backend": "emulator"})
    assert ("sm", "Softmax") not in ep_nodes(sess), why
    out = sess.run(None, f)[0]
    cpu = cpu_session(model).run(None, f)[0]
    assert np.abs(out - cpu).max() < 0.05


def test_mask_that_would_enlarge_the_scores_is_refused():
    """A mask whose known dims do not broadcast to the scores' stays on the CPU EP (its Add would make a bigger
    tensor than the attention's)."""
    B, H, M, T = 1, 2, 3, 20
    model = masked_model(B, H, M, T, mask_shape=[4, H, M, T])
    assert ("sm", "Softmax") not in ep_nodes(xdna_session(model, {"backend": "emulator"}))


def test_fake_device_declines_masked_attention_with_a_logged_reason(tmp_path, monkeypatch, capfd):
    """The xrt backend's attn_f32 kernels have no mask and no NaN rule: the fused node runs on the CPU path, logged."""
    from test_attention_fusion import attention_kernel_dir

    use_fake_npu(monkeypatch)
    B, H, M, T = 1, 2, 64, 64
    kdir = attention_kernel_dir(tmp_path / "k", T, H, 64 ** -0.5)
    model = masked_model(B, H, M, T, mask_shape=[1, 1, M, T], bf16_kv=False, scale_on="scores")
    f = masked_feeds(B, H, M, T, [1, 1, M, T], seed=2)
    so = ort.SessionOptions()
    so.log_severity_level = 1
    sess = xdna_session(model, {"backend": "xrt", "kernel_dir": str(kdir), "log_level": "info"}, so=so)
    assert ("sm", "Softmax") in ep_nodes(sess) and ("where", "Where") in ep_nodes(sess)
    out = sess.run(None, f)[0]
    del sess
    cpu = cpu_session(model).run(None, f)[0]
    assert_masked_attention(out, f["q"], np.swapaxes(f["k"], -1, -2), f["v"], 64 ** -0.5, f["mask"], True, "fake")
    np.testing.assert_array_equal(np.isnan(out), np.isnan(cpu))
    err = capfd.readouterr().err
    assert "no NaN rule" in err and f"{B * H} not for the device" in err, err[-3000:]


def test_beams_against_one_kv_with_a_mask_per_beam():
    """One query row per beam against K/V broadcast over the beams (the grouped path: the beams become the rows of one
    head), each beam with its own mask row."""
    B, H, M, T = 5, 3, 1, 70
    model = masked_model(B, H, M, T, mask_shape=[B, 1, M, T], kv_batch=1)
    f = masked_feeds(B, H, M, T, [B, 1, M, T], seed=11)
    f["k"], f["v"] = f["k"][:1], f["v"][:1]
    f["mask"] = np.where(np.random.default_rng(3).random((B, 1, M, T)) < 0.3, NEG_INF, 0).astype(np.float32)
    f["mask"][2] = NEG_INF  # beam 2 fully masked: its rows zero under the NaN rule
    sess, out, _ = check_ep(model, f)
    assert ("sm", "Softmax") in ep_nodes(sess)
    assert (out[2] == 0).all() and not (out[1] == 0).any()
