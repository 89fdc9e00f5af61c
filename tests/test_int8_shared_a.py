"""Sibling int8 products of one A (ops/int8_shared_a.h, issue 13): inside one fused node, consecutive int8 MatMuls
that read the same A (Whisper's prompt run: the twelve cross-attention K/V projections of the encoder output) run
with A quantised once and their blocks as one job, a bf16 output (plain or split into heads) rounded from each
block. Their outputs are the same bits as each node on its own (XDNA_INT8_SHARED_A=off: the same quantiser, the
same int32 sums, the same rounding), on every int8 kernel set; the set is really taken where it should be (the
partition report's int8_shared_a_calls) and not where it should not (few rows, bf16, the fake NPU device);
placement is unchanged; the results are within the bound derived from the arithmetic.
"""

from __future__ import annotations

import gc
import os
import re
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from cpu_isa import check_with_int8_isa
from ep_helpers import bits_of, ep_nodes, executed, init, make_model, tensor, use_fake_npu, xdna_session
from numerics import (assert_within, bf16_output_bound, epilogue_bound, epilogue_exact, layernorm64, precision_bound,
                      prologue_bound)

C, H, D = 64, 4, 16  # model width, heads, head depth (H * D = C)
OUTPUTS = ["q", "r", "k_present", "k_readback", "v_present", "v_readback"]
PRODUCTS = ["proj_q", "proj_r", "proj_k", "proj_v"]


def siblings_model(*, layernorm=False, r_width=40, width=C, heads=H, depth=D, seed=0):
    """x [b, t, C] -> (LayerNormalization) -> four MatMuls of it, as Whisper's decoder_model leaves them:
      proj_q + bias -> q (fp32);  proj_r -> Cast(bf16) -> r [b, t, r_width] (bf16);
      proj_k -> Cast(bf16) -> Reshape [b, t, H, D] -> Transpose -> k_present (the Reshape's output also read: a Cast
        to float, k_readback, as the keys' attention reads them);
      proj_v + bias -> Cast(bf16) -> Reshape -> Transpose -> v_present (read back through a Cast: v_readback).
    Returns (model, constants)."""
    C, H, D = width, heads, depth
    rng = np.random.default_rng(seed)
    c = {name: (rng.standard_normal((C, n)) / np.sqrt(C)).astype(np.float32)
         for name, n in (("Wq", C), ("Wr", r_width), ("Wk", H * D), ("Wv", H * D))}
    c["bq"] = (0.3 * rng.standard_normal(C)).astype(np.float32)
    c["bv"] = (0.3 * rng.standard_normal(H * D)).astype(np.float32)
    c["gamma"] = (1 + 0.2 * rng.standard_normal(C)).astype(np.float32) if layernorm else None
    c["beta"] = (0.1 * rng.standard_normal(C)).astype(np.float32) if layernorm else None
    inits = [init(k, v) for k, v in c.items() if v is not None] + [init("shape", np.array([0, 0, H, D], np.int64))]
    nodes = []
    a = "x"
    if layernorm:
        nodes.append(helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], axis=-1, epsilon=1e-5,
                                      name="ln"))
        a = "ln"
    nodes += [helper.make_node("MatMul", [a, "Wq"], ["mq"], name="proj_q"),
              helper.make_node("Add", ["mq", "bq"], ["q"], name="bias_q"),
              helper.make_node("MatMul", [a, "Wr"], ["mr"], name="proj_r"),
              helper.make_node("Cast", ["mr"], ["r"], to=TensorProto.BFLOAT16, name="round_r"),
              helper.make_node("MatMul", [a, "Wk"], ["mk"], name="proj_k"),
              helper.make_node("Cast", ["mk"], ["k16"], to=TensorProto.BFLOAT16, name="round_k"),
              helper.make_node("Reshape", ["k16", "shape"], ["k_frames"], name="split_k"),
              helper.make_node("Transpose", ["k_frames"], ["k_present"], perm=[0, 2, 1, 3], name="move_k"),
              helper.make_node("Cast", ["k_frames"], ["k_readback"], to=TensorProto.FLOAT, name="readback_k"),
              helper.make_node("MatMul", [a, "Wv"], ["mv"], name="proj_v"),
              helper.make_node("Add", ["mv", "bv"], ["mvb"], name="bias_v"),
              helper.make_node("Cast", ["mvb"], ["v16"], to=TensorProto.BFLOAT16, name="round_v"),
              helper.make_node("Reshape", ["v16", "shape"], ["v_frames"], name="split_v"),
              helper.make_node("Transpose", ["v_frames"], ["v_present"], perm=[0, 2, 1, 3], name="move_v"),
              helper.make_node("Cast", ["v_present"], ["v_readback"], to=TensorProto.FLOAT, name="readback_v")]
    outputs = [tensor("q", ["b", "t", C]), tensor("r", ["b", "t", r_width], TensorProto.BFLOAT16),
               tensor("k_present", ["b", H, "t", D], TensorProto.BFLOAT16), tensor("k_readback", ["b", "t", H, D]),
               tensor("v_present", ["b", H, "t", D], TensorProto.BFLOAT16), tensor("v_readback", ["b", H, "t", D])]
    return make_model(nodes, [tensor("x", ["b", "t", C])], outputs, inits), c


def as_float(bits: np.ndarray) -> np.ndarray:
    return bits.view(np.float32) if bits.dtype == np.uint32 else (bits.astype(np.uint32) << 16).view(np.float32)


def run(model, x, shared, precision="int8", report=None, options=None, so=None):
    """(output bits by name, placement, run-time report lines by node) of one session, XDNA_INT8_SHARED_A set for
    its creation."""
    old = os.environ.pop("XDNA_INT8_SHARED_A", None)
    if not shared:
        os.environ["XDNA_INT8_SHARED_A"] = "off"
    try:
        opts = {"precision": precision, **(options or {})}
        if report:
            opts["partition_report"] = str(report)
        s = xdna_session(model, opts, so=so)
    finally:
        os.environ.pop("XDNA_INT8_SHARED_A", None)
        if old is not None:
            os.environ["XDNA_INT8_SHARED_A"] = old
    values = s.run_with_ort_values(OUTPUTS, {"x": ort.OrtValue.ortvalue_from_numpy(x)})
    got = {n: bits_of(v) for n, v in zip(OUTPUTS, values)}
    placed = ep_nodes(s)
    del s, values
    gc.collect()  # the run-time report lines are written as the session goes
    lines = {e["node"]: e for e in executed(report)} if report else {}
    return got, placed, lines


def check_bounds(got, x, c):
    """Each output against float64 numpy: the int8 GEMM's bound (with the prologue's, if any), the epilogue's, and
    one rounding to bf16 where the output is bf16."""
    B, T, _ = x.shape
    gamma, beta = c["gamma"], c["beta"]
    a = x if gamma is None else layernorm64(x, gamma, beta, 1e-5)

    def product(w):
        exact = np.matmul(np.asarray(a, np.float64), w.astype(np.float64))
        bound = precision_bound(x, w, "int8") if gamma is None else prologue_bound(x, gamma, beta, 1e-5, w, "int8")
        return exact, bound

    p, e = product(c["Wq"])
    assert_within(as_float(got["q"]), epilogue_exact(p, c["bq"]), epilogue_bound(e, p, c["bq"]), "q")
    p, e = product(c["Wr"])
    assert_within(as_float(got["r"]), p, bf16_output_bound(e, p), "r")
    p, e = product(c["Wk"])
    split = as_float(got["k_present"]).transpose(0, 2, 1, 3).reshape(B, T, H * D)
    assert_within(split, p, bf16_output_bound(e, p), "k_present")
    p, e = product(c["Wv"])
    ev, pv = epilogue_bound(e, p, c["bv"]), epilogue_exact(p, c["bv"])
    split = as_float(got["v_present"]).transpose(0, 2, 1, 3).reshape(B, T, H * D)
    assert_within(split, pv, bf16_output_bound(ev, pv), "v_present")


def check_case(B, T, layernorm=False, r_width=40, seed=0, report_dir=None, x=None):
    """Shared against unshared: the same bits, the same placement, the set taken exactly when M = B * T > 16; within
    the derived bounds of float64. Returns the shared run's outputs."""
    model, c = siblings_model(layernorm=layernorm, r_width=r_width, seed=seed)
    if x is None:
        x = (np.random.default_rng(seed + 1).standard_normal((B, T, C)) * 1.5).astype(np.float32)
    report_dir = Path(report_dir or tempfile.mkdtemp())
    got, placed, lines = run(model, x, True, report=report_dir / f"shared{seed}.jsonl")
    want, placed_off, lines_off = run(model, x, False, report=report_dir / f"plain{seed}.jsonl")
    what = f"{B}x{T} layernorm={layernorm} r_width={r_width}"
    for name in OUTPUTS:
        np.testing.assert_array_equal(got[name], want[name], f"{what}: {name}")
    assert got["k_present"].shape == (B, H, T, D) and got["r"].shape == (B, T, r_width)
    assert placed == placed_off, what
    on_ep = {name for name, _ in placed}
    assert set(PRODUCTS) <= on_ep and {"round_r", "split_k", "move_k", "split_v", "move_v"} <= on_ep, on_ep
    shared = B * T > 16
    for node in PRODUCTS:
        assert lines[node]["int8_shared_a_calls"] == (1 if shared else 0), (what, lines[node])
        assert lines_off[node]["int8_shared_a_calls"] == 0, (what, lines_off[node])
        assert lines[node]["precision"] == "int8" and lines[node]["cpu_calls"] == 0, lines[node]
        # the report's per-product memory counts (the NPU model reads them) are those of the nodes on their own
        assert lines[node]["ep_buffers"] == lines_off[node]["ep_buffers"], (what, lines[node], lines_off[node])
    if np.isfinite(x).all() and B * T:
        check_bounds(got, x, c)
    return got


CASES = [  # (B, T, layernorm, r_width): M = B * T
    (1, 1, False, 40),
    (1, 16, False, 40),
    (1, 17, False, 40),
    (3, 11, False, 40),
    (2, 37, True, 40),
    (1, 100, False, 16),
    (1, 300, True, 72),
    (1, 1500, False, 40),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-ln{int(c[2])}-r{c[3]}")
def test_shared_bits_equal_unshared(case, tmp_path):
    B, T, layernorm, r_width = case
    check_case(B, T, layernorm, r_width, report_dir=tmp_path)


_ISA_SCRIPT = textwrap.dedent("""
    import test_int8_shared_a as t
    for i, (B, T, layernorm, r_width) in enumerate(t.CASES):
        if B * T > 16:
            t.check_case(B, T, layernorm, r_width, seed=10 + i)
    print("ok")
""")


@pytest.mark.parametrize("int8_isa", ["generic", "avx2", "avxvnni", "vnni", "amx"])
def test_shared_bits_each_int8_kernel_set(int8_isa):
    check_with_int8_isa(int8_isa, _ISA_SCRIPT, timeout=900)


def test_non_finite_rows_same_bits(tmp_path):
    """Rows holding Inf or NaN (NaN scales, zero quantised rows: the contract's NaN rule) give the same bits."""
    x = np.random.default_rng(6).standard_normal((1, 70, C)).astype(np.float32)
    x[0, 3, 5], x[0, 40, 0], x[0, 69, C - 1] = np.inf, np.nan, -np.inf
    got = check_case(1, 70, x=x, report_dir=tmp_path)
    q = as_float(got["q"])[0]
    assert np.isnan(q[[3, 40, 69]]).all() and np.isfinite(np.delete(q, [3, 40, 69], 0)).all()


def test_logged_and_not_taken_in_bf16(tmp_path, capfd):
    """The EP says which nodes share their A when the fused node is made, and why a set runs one by one (few rows);
    bf16 nodes never form a set."""
    model, _ = siblings_model()
    so = ort.SessionOptions()
    so.log_severity_level = 1
    x = np.random.default_rng(3).standard_normal((1, 5, C)).astype(np.float32)
    run(model, x, True, options={"log_level": "info"}, so=so)
    err = capfd.readouterr().err
    said = re.search(r"nodes ('proj_\w'(?:, 'proj_\w')*) \(int8, A 'x'\): run on one quantised A", err)
    assert said and sorted(said.group(1).split(", ")) == sorted(f"'{n}'" for n in PRODUCTS), err[-3000:]
    assert "and the 3 after it: not run on one quantised A (few rows (5)" in err, err[-3000:]
    x = np.random.default_rng(3).standard_normal((1, 40, C)).astype(np.float32)
    _, _, lines = run(model, x, True, precision="bf16", report=tmp_path / "bf16.jsonl")
    assert lines and all(e["int8_shared_a_calls"] == 0 for e in lines.values()), lines


def test_fake_npu_runs_one_by_one(tmp_path, monkeypatch):
    """On the xrt backend (the fake device, with an i8_f32 kernel of the shape) the set is not taken: each product
    runs on the device as before, and gives the emulator's bits (the contract's int32 sums are exact)."""
    from test_xrt_int8 import write_kernel_dir

    model, _ = siblings_model(r_width=256, width=256, heads=4, depth=64)  # the fake device: N a multiple of 256
    x = (np.random.default_rng(4).standard_normal((1, 40, 256)) * 1.5).astype(np.float32)
    got, _, lines = run(model, x, True, report=tmp_path / "emu.jsonl")
    assert lines["proj_k"]["int8_shared_a_calls"] == 1
    use_fake_npu(monkeypatch)
    kernels = write_kernel_dir(tmp_path / "kernels", int8=[(256, 256, 256)])
    npu, placed, lines = run(model, x, True, report=tmp_path / "npu.jsonl",
                             options={"backend": "xrt", "kernel_dir": str(kernels)})
    assert set(PRODUCTS) <= {name for name, _ in placed}
    for node in PRODUCTS:
        assert lines[node]["backend"] == "xrt" and lines[node]["device_calls"] == 1, lines[node]
        assert lines[node]["int8_shared_a_calls"] == 0, lines[node]
    for name in OUTPUTS:
        np.testing.assert_array_equal(npu[name], got[name], name)
