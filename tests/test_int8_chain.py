"""The int8 FFN chain (ops/int8_chain.h, issue 13): inside one fused node, MatMul -> (bias) -> GELU -> MatMul ->
(bias) -> (residual) in int8 runs in row panels with the intermediate kept in cache. Its outputs are the same bits
as the unchained run (XDNA_INT8_CHAIN=off: the same quantiser and the same sums), on every int8 kernel set; the
chain is really taken where it should be (the partition report's int8_chain_calls) and not where it should not
(few rows, bf16, a second reader, the fake NPU device); placement is unchanged; the result is within the bound
derived from the arithmetic (numerics.carried_bound); the EPContext round trip keeps it.
"""

from __future__ import annotations

import gc
import os
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from cpu_isa import check_with_int8_isa
from ep_helpers import (IR_VERSION, ep_nodes, executed, init, tensor, use_fake_npu,
                        xdna_session)
from numerics import (assert_within, carried_bound, epilogue_bound, epilogue_exact, layernorm64, precision_bound,
                      prologue_bound)

MS = "com.microsoft"


def ffn_model(d, f, n2=None, layernorm=True, bias1=True, bias2=True, residual=True, gelu="ms", second_reader=False,
              seed=0):
    """X [batch, t, d] -> (LayerNormalization) -> MatMul W1 [d, f] -> (+ b1) -> GELU ("ms": com.microsoft Gelu,
    "erf": the decomposed form PyTorch exports) -> MatMul W2 [f, n2] -> (+ b2) -> (+ X). second_reader: the GELU's
    output is a graph output too. Returns (model, constants)."""
    n2 = d if n2 is None else n2
    assert not residual or n2 == d
    rng = np.random.default_rng(seed)
    c = {"W1": (rng.standard_normal((d, f)) / np.sqrt(d)).astype(np.float32),
         "W2": (rng.standard_normal((f, n2)) / np.sqrt(f)).astype(np.float32),
         "b1": (0.3 * rng.standard_normal(f)).astype(np.float32) if bias1 else None,
         "b2": (0.3 * rng.standard_normal(n2)).astype(np.float32) if bias2 else None,
         "gamma": (1 + 0.2 * rng.standard_normal(d)).astype(np.float32) if layernorm else None,
         "beta": (0.1 * rng.standard_normal(d)).astype(np.float32) if layernorm else None}
    inits = [init(k, v) for k, v in c.items() if v is not None]
    nodes, a = [], "X"
    if layernorm:
        nodes.append(helper.make_node("LayerNormalization", ["X", "gamma", "beta"], ["ln"], name="ln", axis=-1,
                                      epsilon=1e-5))
        a = "ln"
    nodes.append(helper.make_node("MatMul", [a, "W1"], ["h"], name="fc1"))
    h = "h"
    if bias1:
        nodes.append(helper.make_node("Add", [h, "b1"], ["hb"], name="fc1_bias"))
        h = "hb"
    if gelu == "ms":
        nodes.append(helper.make_node("Gelu", [h], ["g"], name="gelu", domain=MS))
    else:
        inits += [init("sqrt2", np.float32(np.sqrt(2))), init("one", np.float32(1)), init("half", np.float32(0.5))]
        nodes += [helper.make_node("Div", [h, "sqrt2"], ["gd"], name="gelu_div"),
                  helper.make_node("Erf", ["gd"], ["ge"], name="gelu_erf"),
                  helper.make_node("Add", ["ge", "one"], ["gp"], name="gelu_add"),
                  helper.make_node("Mul", [h, "gp"], ["gm"], name="gelu_mul"),
                  helper.make_node("Mul", ["gm", "half"], ["g"], name="gelu")]
    nodes.append(helper.make_node("MatMul", ["g", "W2"], ["m2"], name="fc2"))
    y = "m2"
    if bias2:
        nodes.append(helper.make_node("Add", [y, "b2"], ["m2b"], name="fc2_bias"))
        y = "m2b"
    if residual:
        nodes.append(helper.make_node("Add", [y, "X"], ["y"], name="residual"))
    else:
        nodes.append(helper.make_node("Identity", [y], ["y"], name="out"))
    outputs = [tensor("y", ["batch", "t", n2])] + ([tensor("g", ["batch", "t", f])] if second_reader else [])
    graph = helper.make_graph(nodes, "ffn", [tensor("X", ["batch", "t", d])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)],
                              ir_version=IR_VERSION)
    return model.SerializeToString(), c


def run(model, x, chain, precision="int8", report=None, options=None, so=None):
    """(outputs, placement, run-time report lines by node) of one session, XDNA_INT8_CHAIN set for its creation."""
    old = os.environ.pop("XDNA_INT8_CHAIN", None)
    if not chain:
        os.environ["XDNA_INT8_CHAIN"] = "off"
    try:
        opts = {"precision": precision, **(options or {})}
        if report:
            opts["partition_report"] = str(report)
        s = xdna_session(model, opts, so=so)
    finally:
        os.environ.pop("XDNA_INT8_CHAIN", None)
        if old is not None:
            os.environ["XDNA_INT8_CHAIN"] = old
    ys = s.run(None, {"X": x})
    placed = ep_nodes(s)
    del s
    gc.collect()  # the run-time report lines are written as the session goes
    lines = {e["node"]: e for e in executed(report)} if report else {}
    return ys, placed, lines


def exact_and_bound(x, c, gelu=True, residual=True):
    """float64 output and its bound: LN (if any) -> int8 fc1 -> bias -> GELU -> int8 fc2 carrying that error."""
    if c["gamma"] is not None:
        p1 = np.matmul(layernorm64(x, c["gamma"], c["beta"], 1e-5), c["W1"].astype(np.float64))
        e1 = prologue_bound(x, c["gamma"], c["beta"], 1e-5, c["W1"], "int8")
    else:
        p1 = np.matmul(x.astype(np.float64), c["W1"].astype(np.float64))
        e1 = precision_bound(x, c["W1"], "int8")
    h = epilogue_exact(p1, c["b1"], gelu=gelu)
    eh = epilogue_bound(e1, p1, c["b1"], gelu=gelu)
    p2 = np.matmul(h, c["W2"].astype(np.float64))
    e2 = carried_bound(h, eh, c["W2"], "int8")
    r = x if residual else None
    return epilogue_exact(p2, c["b2"], residual=r), epilogue_bound(e2, p2, c["b2"], residual=r)


def check_case(batch, t, d, f, n2=None, seed=0, report_dir=None, **kw):
    """Chained against unchained: the same bits, the same placement, the chain taken exactly when M = batch * t > 16;
    both within the derived bound of float64. Returns the chained output."""
    model, c = ffn_model(d, f, n2, seed=seed, **kw)
    x = (np.random.default_rng(seed + 1).standard_normal((batch, t, d)) * 1.5).astype(np.float32)
    report_dir = Path(report_dir or tempfile.mkdtemp())
    (y_chain,), placed_chain, lines_chain = run(model, x, True, report=report_dir / f"chain{seed}.jsonl")
    (y_plain,), placed_plain, lines_plain = run(model, x, False, report=report_dir / f"plain{seed}.jsonl")
    what = f"{batch}x{t}x{d}x{f} {kw}"
    np.testing.assert_array_equal(y_chain, y_plain, what)
    assert placed_chain == placed_plain, what
    assert ("fc1", "MatMul") in placed_chain and ("fc2", "MatMul") in placed_chain, placed_chain
    chained = batch * t > 16
    for node in ("fc1", "fc2"):
        assert lines_chain[node]["int8_chain_calls"] == (1 if chained else 0), (what, lines_chain[node])
        assert lines_plain[node]["int8_chain_calls"] == 0, (what, lines_plain[node])
        assert lines_chain[node]["precision"] == "int8"
    exact, bound = exact_and_bound(x, c, residual=kw.get("residual", True))
    assert_within(y_chain, exact, bound, what)
    return y_chain


CASES = [  # (batch, t, d, f, n2, options): M = batch * t
    (1, 1, 40, 72, None, {}),
    (1, 7, 40, 72, None, {}),
    (1, 33, 40, 72, None, {}),
    (3, 11, 64, 128, None, {}),
    (1, 33, 40, 72, 24, {"residual": False}),
    (1, 33, 40, 72, None, {"bias1": False, "bias2": False}),
    (1, 33, 40, 72, None, {"layernorm": False}),
    (1, 33, 40, 72, None, {"gelu": "erf"}),
    (1, 100, 96, 200, None, {}),
    (1, 1500, 64, 128, None, {}),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}x{c[3]}-{c[4]}-{c[5]}")
def test_chained_bits_equal_unchained(case, tmp_path):
    batch, t, d, f, n2, kw = case
    check_case(batch, t, d, f, n2, report_dir=tmp_path, **kw)


_ISA_SCRIPT = textwrap.dedent("""
    import test_int8_chain as t
    for i, (batch, steps, d, f, n2, kw) in enumerate(t.CASES):
        if batch * steps > 16 or steps == 7:
            t.check_case(batch, steps, d, f, n2, seed=10 + i, **kw)
    print("ok")
""")


@pytest.mark.parametrize("int8_isa", ["generic", "avx2", "avxvnni", "vnni", "amx"])
def test_chained_bits_each_int8_kernel_set(int8_isa):
    check_with_int8_isa(int8_isa, _ISA_SCRIPT, timeout=900)


def test_non_finite_rows_same_bits(tmp_path):
    """Rows holding Inf or NaN (NaN scales, zero quantised rows: the contract's NaN rule) give the same bits chained."""
    model, _ = ffn_model(40, 72)
    x = np.random.default_rng(6).standard_normal((1, 70, 40)).astype(np.float32)
    x[0, 3, 5], x[0, 40, 0], x[0, 69, 39] = np.inf, np.nan, -np.inf
    (y_chain,), _, lines = run(model, x, True, report=tmp_path / "a.jsonl")
    (y_plain,), _, _ = run(model, x, False)
    assert lines["fc1"]["int8_chain_calls"] == 1
    np.testing.assert_array_equal(y_chain, y_plain)  # NaN where NaN
    assert np.isnan(y_chain[0, [3, 40, 69]]).all() and np.isfinite(np.delete(y_chain[0], [3, 40, 69], 0)).all()


def test_not_chained_with_a_second_reader_or_in_bf16(tmp_path, capfd):
    """The GELU's output also a graph output: both products run as before (the same bits as with the chain off),
    and the EP says why once; bf16 nodes never chain."""
    import onnxruntime as ort

    model, _ = ffn_model(40, 72, second_reader=True)
    x = np.random.default_rng(3).standard_normal((1, 40, 40)).astype(np.float32)
    so = ort.SessionOptions()
    so.log_severity_level = 1
    ys, placed, lines = run(model, x, True, report=tmp_path / "a.jsonl", options={"log_level": "info"}, so=so)
    assert "'fc1' and node 'fc2': not run as one int8 chain (its output 'g' has other readers)" in capfd.readouterr().err
    ys_off, placed_off, _ = run(model, x, False, report=tmp_path / "b.jsonl")
    for a, b in zip(ys, ys_off):
        np.testing.assert_array_equal(a, b)
    assert placed == placed_off
    assert all(e["int8_chain_calls"] == 0 for e in lines.values()), lines
    model, _ = ffn_model(40, 72)
    _, _, lines = run(model, x, True, precision="bf16", report=tmp_path / "c.jsonl")
    assert lines and all(e["int8_chain_calls"] == 0 for e in lines.values()), lines


def test_fake_npu_runs_unchained(tmp_path, monkeypatch):
    """On the xrt backend (the fake device, with i8_f32 kernels of both shapes) the chain is not taken: each product
    runs on the device as before, and gives the emulator's chained bits (the contract's int32 sums are exact)."""
    from test_xrt_int8 import write_kernel_dir

    model, c = ffn_model(256, 256)  # the fake device's kernels: K a multiple of 64, N of 256
    x = (np.random.default_rng(4).standard_normal((1, 40, 256)) * 1.5).astype(np.float32)
    (y_emulator,), _, lines = run(model, x, True, report=tmp_path / "emu.jsonl")
    assert lines["fc1"]["int8_chain_calls"] == 1
    use_fake_npu(monkeypatch)
    kernels = write_kernel_dir(tmp_path / "kernels", int8=[(256, 256, 256)])
    (y,), placed, lines = run(model, x, True, report=tmp_path / "npu.jsonl",
                              options={"backend": "xrt", "kernel_dir": str(kernels)})
    assert ("fc1", "MatMul") in placed and ("fc2", "MatMul") in placed
    for node in ("fc1", "fc2"):
        assert lines[node]["backend"] == "xrt" and lines[node]["device_calls"] == 1, lines[node]
        assert lines[node]["int8_chain_calls"] == 0, lines[node]
    np.testing.assert_array_equal(y, y_emulator)
    exact, bound = exact_and_bound(x, c)
    assert_within(y, exact, bound, "fake NPU")


def test_epcontext_round_trip_keeps_the_chain(tmp_path):
    """A session loaded from an EPContext model chains the same nodes: the same bits as the original session."""
    import onnxruntime as ort
    import onnxruntime_ep_xdna as xdna

    model, _ = ffn_model(40, 72)
    x = np.random.default_rng(5).standard_normal((1, 50, 40)).astype(np.float32)
    (y,), _, _ = run(model, x, True)
    ctx = tmp_path / "ctx.onnx"
    so = ort.SessionOptions()
    so.add_session_config_entry("ep.context_enable", "1")
    so.add_session_config_entry("ep.context_file_path", str(ctx))
    xdna_session(model, {"precision": "int8"}, so=so)
    report = tmp_path / "reloaded.jsonl"
    s = ort.InferenceSession(str(ctx), xdna.session_options(),
                             providers=[(xdna.EP_NAME, {"precision": "int8", "partition_report": str(report)}),
                                        "CPUExecutionProvider"])
    np.testing.assert_array_equal(s.run(None, {"X": x})[0], y)
    del s
    gc.collect()
    lines = {e["node"]: e for e in executed(report)}
    assert lines["fc1"]["int8_chain_calls"] == 1 and lines["fc2"]["precision"] == "int8", lines
