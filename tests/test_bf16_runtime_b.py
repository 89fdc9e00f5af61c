"""A MatMul whose run-time B comes through a Cast from bfloat16 (issue 7: the decoder's self-attention cache kept in
bf16, decoder_graph pass 7). The MatMul claims the Cast (and a Transpose between, K^T read from K) and reads the
bf16 tensor as it lies: the contract rounds a run-time B to bf16 as it reads it, exactly as ORT's Cast to bfloat16
does (test_bf16_cross_kv checks that), so the product has the bits of the same MatMul fed the fp32 tensor, on every
path (few rows unpacked, more rows packed, int8 and bf16x3 policies, every kernel set, the xrt backend on the fake
device). Where the Cast must stay a tensor (another reader) it stays on the CPU EP and the MatMul reads fp32."""

from __future__ import annotations

import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxruntime_ep_xdna as xdna
from cpu_isa import check_with_isa
from ep_helpers import EP, bf16_round_trip, ep_nodes, make_model, tensor, use_fake_npu, xdna_session
from numerics import assert_within, bf16_round, precision_bound

D = 64


def self_attention_model(B, H, M, T, bf16=True, rank4=True):
    """The decoder's self-attention products as decoder_graph pass 7 leaves them: scores = Q . Transpose(K) and
    out = P . V, K and V cast to bf16 and back first when `bf16` (in Whisper the bf16 tensors are the cache; here
    the CPU EP's Cast makes them from the fp32 inputs). `rank4=False`: 2-D operands (one head; the tall path)."""
    shape = (lambda *d: [B, H, *d]) if rank4 else (lambda *d: list(d))
    perm = [0, 1, 3, 2] if rank4 else [1, 0]
    nodes, k, v = [], "k", "v"
    if bf16:
        casts, (k, v) = bf16_round_trip("k", "v")
        nodes += casts
    nodes += [helper.make_node("Transpose", [k], ["kt"], perm=perm, name="tk"),
              helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
              helper.make_node("MatMul", ["p", v], ["o"], name="pv")]
    return make_model(nodes, [tensor("q", shape(M, D)), tensor("k", shape(T, D)), tensor("p", shape(M, T)),
                              tensor("v", shape(T, D))], [tensor("scores", shape(M, T)), tensor("o", shape(M, D))])


def feeds(B, H, M, T, seed, rank4=True):
    r = np.random.default_rng(seed)
    shape = (lambda *d: (B, H, *d)) if rank4 else (lambda *d: d)
    return {"q": r.standard_normal(shape(M, D)).astype(np.float32),
            "k": r.standard_normal(shape(T, D)).astype(np.float32),
            "p": r.random(shape(M, T)).astype(np.float32),
            "v": r.standard_normal(shape(T, D)).astype(np.float32)}


# (B, H, M, T, rank4): one query row per beam (the decoder step), a few rows (unpacked), more than 16 rows (packed
# per call: the prompt), odd T (the kernels' right edges), 2-D (one tall product)
CASES = [(5, 8, 1, 128, True), (1, 8, 1, 1, True), (2, 3, 4, 77, True), (1, 2, 40, 33, True), (1, 1, 20, 200, False),
         (1, 1, 3, 65, False)]


def check_same_bits(B, H, M, T, rank4, precision, seed):
    f = feeds(B, H, M, T, seed, rank4)
    opts = {"precision": precision}
    with_cast = xdna_session(self_attention_model(B, H, M, T, True, rank4), opts)
    plain = xdna_session(self_attention_model(B, H, M, T, False, rank4), opts)
    on_ep = {name for name, _ in ep_nodes(with_cast)}
    assert {"k_to_fp32", "v_to_fp32", "tk", "qk", "pv"} <= on_ep, on_ep
    assert not {"k_to_bf16", "v_to_bf16"} & on_ep  # float -> bf16 is the CPU EP's (in Whisper: the graph's)
    # bf16 and int8 round a run-time B to bf16 as the Cast does: the fp32 graph's bits. bf16x3 keeps more of an
    # fp32 B, so there the reference is the fp32 graph fed the values the Casts leave.
    exact_b = precision == "bf16x3"
    ref = dict(f, k=bf16_round(f["k"]), v=bf16_round(f["v"])) if exact_b else f
    got, want = with_cast.run(None, f), plain.run(None, ref)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.view(np.uint32), w.view(np.uint32))
    kt, v = np.swapaxes(ref["k"], -1, -2), ref["v"]
    scores, out = got
    # float64 of the products' inputs: the bound is the policy's for a run-time B (numerics.precision_bound)
    assert_within(scores, f["q"].astype(np.float64) @ kt, precision_bound(f["q"], kt, precision, runtime_b=True),
                  "Q K^T vs float64")
    assert_within(out, f["p"].astype(np.float64) @ v, precision_bound(f["p"], v, precision, runtime_b=True),
                  "P V vs float64")


@pytest.mark.parametrize("B,H,M,T,rank4", CASES)
@pytest.mark.parametrize("precision", ["bf16", "int8", "bf16x3"])
def test_bf16_b_through_a_fused_cast_gives_the_fp32_graphs_bits(B, H, M, T, rank4, precision):
    check_same_bits(B, H, M, T, rank4, precision, seed=B * 1000 + M * 10 + T)


def test_the_claim_says_it_reads_b_as_bf16(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(self_attention_model(2, 2, 1, 16))
    reasons = {d.node: d.reason for d in xdna.partition(path).decisions if d.claimed}
    assert "B read as bf16 through its Cast" in reasons["qk"] and "Transpose" in reasons["qk"], reasons
    assert "B read as bf16 through its Cast" in reasons["pv"] and "Transpose" not in reasons["pv"], reasons


def test_a_cast_read_elsewhere_stays_on_the_cpu_ep():
    """The Cast's output is also a graph output: it must exist as a tensor, so it runs on the CPU EP and the
    MatMul reads it as fp32 (same bits)."""
    B, H, M, T = 2, 2, 1, 50
    m = onnx.load_from_string(self_attention_model(B, H, M, T))
    m.graph.output.append(tensor("vf", [B, H, T, D]))
    s = xdna_session(m.SerializeToString())
    on_ep = {name for name, _ in ep_nodes(s)}
    assert {"pv", "qk", "k_to_fp32"} <= on_ep and "v_to_fp32" not in on_ep, on_ep
    f = feeds(B, H, M, T, seed=5)
    plain = xdna_session(self_attention_model(B, H, M, T, bf16=False))
    np.testing.assert_array_equal(s.run(["o"], f)[0].view(np.uint32), plain.run(["o"], f)[0].view(np.uint32))


def test_a_cast_from_float16_stays_on_the_cpu_ep(tmp_path):
    """Only a Cast from bfloat16 is read through (the contract's own rounding): a Cast from float16 runs on the CPU
    EP and the MatMul, claimed without it, reads its fp32 output."""
    B, H, M, T = 1, 2, 3, 40
    m = onnx.load_from_string(self_attention_model(B, H, M, T))
    for node in m.graph.node:
        for a in node.attribute:
            if a.name == "to" and a.i == TensorProto.BFLOAT16:
                a.i = TensorProto.FLOAT16
    for vi in list(m.graph.value_info):
        m.graph.value_info.remove(vi)
    path = tmp_path / "m.onnx"
    path.write_bytes(m.SerializeToString())
    reasons = {d.node: d.reason for d in xdna.partition(path).decisions if d.claimed}
    assert set(reasons) == {"qk", "pv"} and not any("bf16" in r for r in reasons.values()), reasons
    s = xdna_session(m.SerializeToString())
    on_ep = {name for name, _ in ep_nodes(s)}
    assert {"qk", "pv", "tk"} <= on_ep and not {"k_to_fp32", "v_to_fp32"} & on_ep, on_ep
    f = feeds(B, H, M, T, seed=6)
    half = dict(f, k=f["k"].astype(np.float16).astype(np.float32), v=f["v"].astype(np.float16).astype(np.float32))
    plain = xdna_session(self_attention_model(B, H, M, T, bf16=False))
    for g, w in zip(s.run(None, f), plain.run(None, half)):
        np.testing.assert_array_equal(g.view(np.uint32), w.view(np.uint32))


def test_cpu_ep_alone_runs_the_bf16_graph_within_the_bound():
    """Without the EP the Casts run on the CPU EP: the fp32 MatMul then sees B rounded to bf16 (A exact)."""
    from ep_helpers import cpu_session

    B, H, M, T = 2, 3, 1, 90
    f = feeds(B, H, M, T, seed=9)
    scores, out = cpu_session(self_attention_model(B, H, M, T)).run(None, f)
    kt = np.swapaxes(bf16_round(f["k"]), -1, -2).astype(np.float64)
    assert_within(scores, f["q"].astype(np.float64) @ kt, precision_bound(f["q"], kt, "bf16", runtime_b=True))
    v = bf16_round(f["v"]).astype(np.float64)
    assert_within(out, f["p"].astype(np.float64) @ v, precision_bound(f["p"], v, "bf16", runtime_b=True))


_ISA_CHECK = textwrap.dedent("""
    import test_bf16_runtime_b as t
    for i, case in enumerate(t.CASES):
        for precision in ("bf16", "int8"):
            t.check_same_bits(*case, precision=precision, seed=30 + i)
    print("ok")
""")


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512", "avx512bf16", "amx"])
def test_each_kernel_set(isa):
    check_with_isa(isa, _ISA_CHECK, timeout=600)


def test_xrt_backend_on_the_fake_device(tmp_path, monkeypatch):
    """More than 16 rows against a run-time B: packed per call and sent to the device (the fake NPU's kernel of
    K=64, N=256), packed from the bf16 tensor: the same bits as from the fp32 one."""
    from test_xrt_backend import write_kernel_dir

    use_fake_npu(monkeypatch)
    kernels = write_kernel_dir(tmp_path / "kernels", [(D, 256, 256)])
    B, H, M, T = 1, 2, 24, 256
    opts = {"backend": "xrt", "kernel_dir": str(kernels)}
    with_cast = xdna_session(self_attention_model(B, H, M, T), opts)
    plain = xdna_session(self_attention_model(B, H, M, T, bf16=False), opts)
    assert {"k_to_fp32", "qk"} <= {name for name, _ in ep_nodes(with_cast)}
    f = feeds(B, H, M, T, seed=13)
    got, want = with_cast.run(["scores"], f)[0], plain.run(["scores"], f)[0]
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    kt = np.swapaxes(f["k"], -1, -2)
    assert_within(got, f["q"].astype(np.float64) @ kt, precision_bound(f["q"], kt, "bf16", runtime_b=True))
