"""Attention K and V kept in bf16 (issue 7: the decoder's cross-attention K/V stored once per window at half the
bytes). A Cast bfloat16 -> float in front of K^T or V is claimed with the fused attention (ops/attention.cc) and the
kernels read the bf16 tensor as it lies. Because ORT's Cast float -> bfloat16 rounds to nearest even exactly as the
contract's f32_to_bf16 (checked first), a graph that casts K/V to bf16 and back gives the EP's fused attention the
very values it would have rounded itself: the same bits as the fp32 graph, on every path of the kernel (few rows
read bf16 directly; other layouts and backends get exact fp32 copies). Where the EP leaves the attention to the CPU
EP, the Cast runs there and the result stays within the contract's bound."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from ep_helpers import EP, bf16_round_trip, cpu_session, ep_nodes, make_model, tensor, xdna_session
from numerics import assert_within, attention_bound, attention_exact, bf16_round

D = 64


def test_ort_cast_to_bfloat16_rounds_as_the_contract():
    """Ties to even (both directions), carries into the exponent, subnormals, signs, infinities: bit for bit
    numerics.bf16_round (the contract's f32_to_bf16); NaN stays NaN."""
    model = make_model([helper.make_node("Cast", ["x"], ["h"], to=TensorProto.BFLOAT16),
                        helper.make_node("Cast", ["h"], ["y"], to=TensorProto.FLOAT)],
                       [tensor("x", [None])], [tensor("y", [None])])
    special = np.array([0x3F808000, 0x3F818000, 0x3F80C000, 0x3F807FFF, 0x3F808001, 0x3F7FFFFF, 0x7F7FFFFF,
                        0x7F7F8000, 0x00008000, 0x00018000, 0x00000001, 0x807F8000, 0xBF808000, 0x7F800000,
                        0xFF800000, 0x00000000, 0x80000000], np.uint32)
    rng = np.random.default_rng(0)
    random_bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    random_bits = random_bits[(random_bits & 0x7FFFFFFF) <= 0x7F800000]  # NaN payloads: checked separately
    x = np.concatenate([special, special | 0x80000000, random_bits]).view(np.float32)
    y = cpu_session(model).run(None, {"x": x})[0]
    np.testing.assert_array_equal(y.view(np.uint32), bf16_round(x).view(np.uint32))
    nan = np.array([np.nan, -np.nan], np.float32)
    assert np.isnan(cpu_session(model).run(None, {"x": nan})[0]).all()


def attention_model(B, H, M, T, kv_bf16=True, k_as_kt=False):
    """Decoder cross-attention as optimum exports it (Q [B, H, M, D]; K, V [B, H, T, D]; K^T by a Transpose, the
    scale as sqrt on Q and K^T), with K and V cast to bf16 and back first when `kv_bf16` (in the Whisper copies the
    bf16 tensors are graph inputs; here the CPU EP's Cast makes them, so the test feeds fp32). `k_as_kt`: K given
    transposed [B, H, D, T] (a layout the few-row kernel does not read: the widened path)."""
    s = D ** -0.5
    nodes, k, v = [], "k", "v"
    if kv_bf16:
        casts, (k, v) = bf16_round_trip("k", "v")
        nodes += casts
    kt_perm = [0, 1, 2, 3] if k_as_kt else [0, 1, 3, 2]
    nodes += [helper.make_node("Transpose", [k], ["kt"], perm=kt_perm, name="tk"),
              helper.make_node("Mul", ["q", "sqrt_s"], ["qs"], name="mq"),
              helper.make_node("Mul", ["kt", "sqrt_s"], ["ks"], name="mk"),
              helper.make_node("MatMul", ["qs", "ks"], ["scores"], name="qk"),
              helper.make_node("Softmax", ["scores"], ["p"], axis=-1, name="sm"),
              helper.make_node("MatMul", ["p", v], ["o"], name="pv")]
    k_shape = [1, H, D, T] if k_as_kt else [1, H, T, D]
    return make_model(nodes, [tensor("q", [B, H, M, D]), tensor("k", k_shape), tensor("v", [1, H, T, D])],
                      [tensor("o", [B, H, M, D])],
                      [helper.make_tensor("sqrt_s", TensorProto.FLOAT, [], [s ** 0.5])])


def feeds(B, H, M, T, seed, k_as_kt=False):
    r = np.random.default_rng(seed)
    k = r.standard_normal((1, H, T, D)).astype(np.float32)
    return {"q": r.standard_normal((B, H, M, D)).astype(np.float32),
            "k": np.ascontiguousarray(k.transpose(0, 1, 3, 2)) if k_as_kt else k,
            "v": r.standard_normal((1, H, T, D)).astype(np.float32)}


@pytest.mark.parametrize("B,H,M,T,k_as_kt", [(1, 8, 1, 1500, False), (5, 8, 1, 1500, False), (2, 3, 5, 77, False),
                                             (1, 2, 40, 33, False), (2, 2, 3, 50, True)])
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_bf16_kv_through_a_fused_cast_gives_the_fp32_graphs_bits(B, H, M, T, k_as_kt, precision):
    f = feeds(B, H, M, T, seed=B * 1000 + T, k_as_kt=k_as_kt)
    with_cast = xdna_session(attention_model(B, H, M, T, True, k_as_kt), {"precision": precision})
    plain = xdna_session(attention_model(B, H, M, T, False, k_as_kt), {"precision": precision})
    on_ep = {name for name, op in ep_nodes(with_cast)}
    assert {"k_to_fp32", "v_to_fp32", "tk", "mq", "mk", "qk", "sm", "pv"} <= on_ep, on_ep
    assert not {"k_to_bf16", "v_to_bf16"} & on_ep  # float -> bf16 is the CPU EP's (in Whisper: decoder_model's)
    out = with_cast.run(None, f)[0]
    np.testing.assert_array_equal(out.view(np.uint32), plain.run(None, f)[0].view(np.uint32))
    q = f["q"]
    kt = f["k"] if k_as_kt else f["k"].transpose(0, 1, 3, 2)
    bound = attention_bound(q, kt, f["v"], D ** -0.5)
    assert_within(out, attention_exact(q, kt, f["v"], D ** -0.5), bound, "EP with bf16 K/V vs float64")


def test_cpu_ep_alone_runs_the_bf16_graph_within_the_bound():
    B, H, M, T = 3, 4, 1, 300
    f = feeds(B, H, M, T, seed=7)
    out = cpu_session(attention_model(B, H, M, T)).run(None, f)[0]
    kt = f["k"].transpose(0, 1, 3, 2)
    assert_within(out, attention_exact(f["q"], kt, f["v"], D ** -0.5), attention_bound(f["q"], kt, f["v"], D ** -0.5))


def test_attention_the_ep_unfuses_leaves_the_scaled_ks_cast_on_the_cpu_ep():
    """bf16x3 policy: the attention runs as separate products; K's Cast on the CPU EP (a scale Mul lies between it
    and the product), V's read through by its MatMul (test_bf16_runtime_b); still within the bound."""
    B, H, M, T = 2, 2, 1, 200
    f = feeds(B, H, M, T, seed=3)
    s = xdna_session(attention_model(B, H, M, T), {"precision": "bf16x3"})
    on_ep = {name for name, op in ep_nodes(s)}
    assert {"qk", "pv", "v_to_fp32"} <= on_ep and not {"k_to_fp32", "sm"} & on_ep, on_ep
    out = s.run(None, f)[0]
    kt = f["k"].transpose(0, 1, 3, 2)
    assert_within(out, attention_exact(f["q"], kt, f["v"], D ** -0.5), attention_bound(f["q"], kt, f["v"], D ** -0.5))


def test_a_cast_read_elsewhere_stays_on_the_cpu_ep():
    """The Cast's output has a second reader: it must exist as a tensor, so the attention reads it as fp32."""
    B, H, M, T = 1, 2, 1, 64
    model = attention_model(B, H, M, T)
    import onnx

    m = onnx.load_from_string(model)
    m.graph.output.append(tensor("vf", [1, H, T, D]))
    s = xdna_session(m.SerializeToString())
    on_ep = {name for name, op in ep_nodes(s)}
    assert "pv" in on_ep and "v_to_fp32" not in on_ep and "k_to_fp32" in on_ep, on_ep
    f = feeds(B, H, M, T, seed=5)
    plain = xdna_session(attention_model(B, H, M, T, kv_bf16=False))
    np.testing.assert_array_equal(s.run(["o"], f)[0], plain.run(None, f)[0])


@pytest.mark.parametrize("kv_bf16", [False, True])
@pytest.mark.parametrize("B,H,T", [(5, 8, 1500), (3, 2, 77), (7, 3, 40)])
def test_beams_over_broadcast_kv_give_each_beams_own_bits(B, H, T, kv_bf16):
    """Beam search's cross-attention: B batch rows of one query row each against batch-1 K/V (broadcast) run as
    one head of B rows per head (ops/attention.cc), K and V read once per head. Each row's arithmetic is its own:
    the bits equal those of each beam run alone."""
    f = feeds(B, H, 1, T, seed=B * 10 + T)
    together = xdna_session(attention_model(B, H, 1, T, kv_bf16)).run(None, f)[0]
    alone = xdna_session(attention_model(1, H, 1, T, kv_bf16))
    for b in range(B):
        one = alone.run(None, {"q": f["q"][b:b + 1], "k": f["k"], "v": f["v"]})[0]
        np.testing.assert_array_equal(together[b:b + 1].view(np.uint32), one.view(np.uint32))
    kt = f["k"].transpose(0, 1, 3, 2)
    assert_within(together, attention_exact(f["q"], kt, f["v"], D ** -0.5), attention_bound(f["q"], kt, f["v"], D ** -0.5))
