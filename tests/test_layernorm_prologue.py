"""The A prologue (kernels/gemm_contract.h, "A prologue"): a LayerNormalization over K whose output only
constant-weight projections read runs inside their EP node, against float64 numpy and ORT's CPU EP within the derived
bound (numerics.prologue_bound), placement proven; what the prologue cannot take stays on the CPU EP with the right
result; every kernel set and precision, the fake NPU device and the EPContext round trip.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
from onnx import TensorProto, helper

import onnxruntime_ep_xdna as xdna

from cpu_isa import check_with_isa
from ep_helpers import compiled_and_reloaded, cpu_session, ep_nodes, init, use_fake_npu, xdna_session
from numerics import (assert_within, fp32_eps, layernorm64, layernorm_bound, prologue_bound,
                      prologue_exact)

CPU = "CPUExecutionProvider"


def _model(a_shape, readers, eps=1e-5, beta=True, seed=0, ln_attrs=None, gamma_input=False, ln_output=False):
    """X -> LayerNormalization -> one node per reader: ("proj", N) a MatMul with a constant [K, N] weight,
    ("proj_bias", N) the same + a bias Add, ("proj_runtime_b", N) a MatMul with a run-time B input, ("relu",) a Relu
    (not a projection), ("proj_residual", N) a projection + a residual Add of input R. A symbolic batch dim, as
    Whisper's (ORT turns 2-D MatMul + Add into Gemm before partitioning). Returns (model, feeds, constants, outputs)."""
    rng = np.random.default_rng(seed)
    k = a_shape[-1]
    sym = ["batch"] + list(a_shape[1:])
    gamma = (1 + 0.3 * rng.standard_normal(k)).astype(np.float32)
    bias = (0.2 * rng.standard_normal(k)).astype(np.float32)
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, sym)]
    inits = [] if gamma_input else [init("gamma", gamma)]
    if gamma_input:
        inputs.append(helper.make_tensor_value_info("gamma", TensorProto.FLOAT, [k]))
    if beta:
        inits.append(init("beta", bias))
    feeds = {"X": (rng.standard_normal(a_shape) * 2 + 0.5).astype(np.float32)}
    if gamma_input:
        feeds["gamma"] = gamma
    attrs = dict(epsilon=eps, axis=-1)
    attrs.update(ln_attrs or {})
    nodes = [helper.make_node("LayerNormalization", ["X", "gamma"] + (["beta"] if beta else []), ["ln"], name="ln",
                              **attrs)]
    outputs, late_outputs, consts = [], [], {"gamma": gamma, "beta": bias if beta else None}
    for i, (kind, *rest) in enumerate(readers):
        y = f"y{i}"
        if kind == "relu":
            nodes.append(helper.make_node("Relu", ["ln"], [y], name=f"relu{i}"))
            outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, sym))
            continue
        n = rest[0]
        w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        consts[f"W{i}"] = w
        if kind == "proj_runtime_b":
            inputs.append(helper.make_tensor_value_info(f"W{i}", TensorProto.FLOAT, [k, n]))
            feeds[f"W{i}"] = w
        else:
            inits.append(init(f"W{i}", w))
        out_shape = sym[:-1] + [n]
        mm = y if kind in ("proj", "proj_runtime_b") else f"mm{i}"
        nodes.append(helper.make_node("MatMul", ["ln", f"W{i}"], [mm], name=f"mm{i}"))
        if kind == "proj_bias":
            b = rng.standard_normal(n).astype(np.float32)
            consts[f"b{i}"] = b
            inits.append(init(f"b{i}", b))
            nodes.append(helper.make_node("Add", [mm, f"b{i}"], [y], name=f"bias{i}"))
        elif kind in ("proj_residual", "proj_made_residual"):
            inputs.append(helper.make_tensor_value_info(f"R{i}", TensorProto.FLOAT, out_shape))
            feeds[f"R{i}"] = rng.standard_normal(list(a_shape[:-1]) + [n]).astype(np.float32)
            r = f"R{i}"
            if kind == "proj_made_residual":  # made by a node (an Abs, also a graph output), not a graph input
                nodes.append(helper.make_node("Abs", [r], [f"absR{i}"], name=f"abs{i}"))
                r = f"absR{i}"
                late_outputs.append(helper.make_tensor_value_info(r, TensorProto.FLOAT, out_shape))
                feeds[f"R{i}"] = np.abs(feeds[f"R{i}"])  # the value the Add sees (Abs of it: the same)
            nodes.append(helper.make_node("Add", [mm, r], [y], name=f"residual{i}"))
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, out_shape))
    outputs += late_outputs  # after the readers' outputs: ys[i] is reader i's
    if ln_output:
        outputs.append(helper.make_tensor_value_info("ln", TensorProto.FLOAT, sym))
    graph = helper.make_graph(nodes, "prologue", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    return model.SerializeToString(), feeds, consts, [o.name for o in outputs]


def _check_outputs(ys, feeds, consts, readers, eps, precision="bf16", cpu_ref=None):
    """Each projection's output within prologue_bound of float64 (+ its bias's rounding), and the CPU EP's within the
    fp32 version of the same bound; other outputs equal to the CPU EP's."""
    x = feeds["X"]
    gamma, beta = consts["gamma"], consts["beta"]
    e = layernorm_bound(x, gamma, beta, eps)
    y64 = np.abs(layernorm64(x, gamma, beta, eps))
    for i, (kind, *_rest) in enumerate(readers):
        if not kind.startswith("proj"):
            if cpu_ref is not None:
                np.testing.assert_array_equal(ys[i], cpu_ref[i])
            continue
        w = consts[f"W{i}"]
        exact = prologue_exact(x, gamma, beta, eps, w)
        bound = prologue_bound(x, gamma, beta, eps, w, "bf16" if kind == "proj_runtime_b" else precision)
        cpu_bound = fp32_eps(x.shape[-1]) * np.matmul(y64 + e, np.abs(w.astype(np.float64))) + np.matmul(e, np.abs(w))
        extra = feeds.get(f"R{i}") if kind in ("proj_residual", "proj_made_residual") else consts.get(f"b{i}")
        if extra is not None:
            exact = exact + extra
            slack = 2.0**-24 * (np.abs(exact) + bound)
            bound, cpu_bound = bound + slack, cpu_bound + slack
        assert_within(ys[i], exact, bound, f"reader {i} ({kind}, {precision}) vs float64")
        if cpu_ref is not None:
            assert_within(cpu_ref[i], exact, cpu_bound + 1e-30, f"reader {i}: the CPU EP vs float64")


def _on_cpu(sess):
    return xdna.placement(sess).on(CPU)


CASES = [
    # (X shape, readers, epsilon, beta)
    ((1, 1, 512), [("proj", 512)], 1e-5, True),  # a decoder step's row
    ((2, 37, 77), [("proj", 45)], 1e-5, True),  # odd K
    ((1, 1500, 64), [("proj", 96)], 1e-5, True),  # an encoder window's rows (K small to keep the test quick)
    ((3, 5, 96), [("proj_bias", 130)], 1e-3, False),  # another epsilon, no beta, the bias epilogue
    ((2, 7, 64), [("proj_bias", 64), ("proj", 64), ("proj_bias", 64)], 1e-5, True),  # Q, K, V of one LN
]


def check_case(a_shape, readers, eps, beta, precision="bf16", seed=0):
    model, feeds, consts, _ = _model(a_shape, readers, eps=eps, beta=beta, seed=seed)
    opts = {"precision": precision} if precision != "bf16" else None
    sess = xdna_session(model, opts)
    assert not _on_cpu(sess), f"{readers}: on the CPU EP: {_on_cpu(sess)}"
    assert ("ln", "LayerNormalization") in ep_nodes(sess)
    ys = sess.run(None, feeds)
    _check_outputs(ys, feeds, consts, readers, eps, precision, cpu_session(model).run(None, feeds))
    # The LN computed as ORT's CPU EP computes it, bit for bit: the same products of the LN left on the CPU EP (its
    # output made a graph output) give the same bits.
    kept, _, _, _ = _model(a_shape, readers, eps=eps, beta=beta, seed=seed, ln_output=True)
    sess_kept = xdna_session(kept, opts)
    assert ("ln", "LayerNormalization") in _on_cpu(sess_kept)
    for y, y_kept in zip(ys, sess_kept.run(None, feeds)):
        np.testing.assert_array_equal(y, y_kept, f"{readers} {precision}: prologue vs ORT's LN")


@pytest.mark.parametrize("precision", ["bf16", "int8", "bf16x3"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{len(c[1])}readers-eps{c[2]}" for c in CASES])
def test_prologue_within_bound(case, precision):
    check_case(*case, precision=precision)


def test_qkv_share_one_fused_node_and_one_layernorm():
    """Q, K and V projections of one LN: the LN is on the EP once, inside their fused node."""
    readers = [("proj_bias", 64), ("proj", 64), ("proj_bias", 64)]
    model, feeds, consts, _ = _model((2, 7, 64), readers)
    sess = xdna_session(model)
    placed = xdna.placement(sess)
    assert placed.count(xdna.EP_NAME, ("LayerNormalization",)) == 1
    assert placed.count(xdna.EP_NAME, ("MatMul",)) == 3
    assert not placed.on(CPU)
    _check_outputs(sess.run(None, feeds), feeds, consts, readers, 1e-5, "bf16", cpu_session(model).run(None, feeds))


@pytest.mark.parametrize("precision", ["bf16", "int8", "bf16x3"])
def test_special_rows(precision):
    """Constant rows (variance 0: the output is beta), rows with Inf or NaN (NaN rows, as ORT's), large offsets."""
    readers = [("proj", 40)]
    model, feeds, consts, _ = _model((1, 9, 70), readers, seed=3)
    x = feeds["X"]
    x[0, 0] = 0.5
    x[0, 1] = 0.1
    x[0, 2] = -3.7
    x[0, 3, 5] = np.inf
    x[0, 4, 0] = -np.inf
    x[0, 5, 9] = np.nan
    x[0, 6] = 1000 + np.random.default_rng(1).standard_normal(70).astype(np.float32)  # |mean| >> std
    x[0, 7] = 1e-20 * np.random.default_rng(2).standard_normal(70).astype(np.float32)  # variance far below eps
    opts = {"precision": precision} if precision != "bf16" else None
    sess = xdna_session(model, opts)
    assert ("ln", "LayerNormalization") in ep_nodes(sess)
    y = sess.run(None, feeds)[0]
    assert np.isnan(y[0, 3:6]).all()
    assert np.isfinite(y[0, [0, 1, 2, 6, 7, 8]]).all()
    _check_outputs([y], feeds, consts, readers, 1e-5, precision)
    # Where both are finite, the CPU EP's LN + MatMul agrees within both bounds.
    ref = cpu_session(model).run(None, feeds)[0]
    w = consts["W0"]
    rows = [0, 1, 2, 6, 7, 8]
    both = prologue_bound(x[0, rows], consts["gamma"], consts["beta"], 1e-5, w, precision) * 2
    ok = np.isfinite(ref[0, rows])
    assert_within(y[0, rows][ok], ref[0, rows][ok], both[ok], "vs the CPU EP")


@pytest.mark.parametrize("eps", [1e-3, 1e-5])
def test_epsilon_is_the_nodes(eps):
    """Rows of small variance (std 0.03), where epsilon moves the output by a factor up to 3: within the bound of
    the node's epsilon, and outside the bound of the other one (so the test can fail)."""
    readers = [("proj", 64)]
    model, feeds, consts, _ = _model((1, 8, 96), readers, eps=eps, seed=8)
    feeds["X"] = (feeds["X"] * 0.015).astype(np.float32)
    y = xdna_session(model).run(None, feeds)[0]
    x, g, b, w = feeds["X"], consts["gamma"], consts["beta"], consts["W0"]
    assert_within(y, prologue_exact(x, g, b, eps, w), prologue_bound(x, g, b, eps, w), f"epsilon {eps}")
    other = 1e-5 if eps == 1e-3 else 1e-3
    with pytest.raises(AssertionError):
        assert_within(y, prologue_exact(x, g, b, other, w), prologue_bound(x, g, b, other, w))


def test_layernorm_bound_holds_for_float32_arithmetic():
    """numerics.layernorm_bound covers a plain fp32 evaluation of the formula (numpy, sequential-ish sums)."""
    rng = np.random.default_rng(5)
    for k, scale, offset in [(512, 1, 0), (77, 3, 10), (1500, 0.01, 1), (64, 1, 300)]:
        x = (rng.standard_normal((50, k)) * scale + offset).astype(np.float32)
        g = rng.standard_normal(k).astype(np.float32)
        b = rng.standard_normal(k).astype(np.float32)
        mean = x.sum(-1, keepdims=True, dtype=np.float32) / np.float32(k)
        var = np.maximum((x * x).sum(-1, keepdims=True, dtype=np.float32) / np.float32(k) - mean * mean, 0)
        y32 = (x - mean) / np.sqrt(var + np.float32(1e-5)) * g + b
        assert_within(y32, layernorm64(x, g, b, 1e-5), layernorm_bound(x, g, b, 1e-5), f"K={k}")


@pytest.mark.parametrize("what", ["relu_reader", "graph_output", "runtime_b_reader", "axis_not_last", "gamma_input",
                                  "stash_double", "made_residual_on_shared"])
def test_refused_layernorm_stays_on_cpu(what):
    readers = {"relu_reader": [("proj", 40), ("relu",)], "runtime_b_reader": [("proj", 40), ("proj_runtime_b", 40)],
               "made_residual_on_shared": [("proj", 40), ("proj_made_residual", 40)]}.get(what, [("proj", 40)])
    kw = dict(ln_output=what == "graph_output", gamma_input=what == "gamma_input")
    shape = (2, 6, 64)
    if what == "axis_not_last":
        kw["ln_attrs"] = {"axis": 1}  # over the last two dims
    if what == "stash_double":
        kw["ln_attrs"] = {"stash_type": 11}
    model, feeds, consts, _ = _model(shape, readers, **kw)
    if what == "axis_not_last":
        return _check_axis_refusal(model, feeds)
    sess = xdna_session(model)
    on_cpu = _on_cpu(sess)
    if what == "stash_double":  # ORT's CPU EP has no double-stash LN kernel for float input: it may refuse too
        assert ("ln", "LayerNormalization") in on_cpu
        return
    assert ("ln", "LayerNormalization") in on_cpu, (what, ep_nodes(sess))
    assert ("mm0", "MatMul") in ep_nodes(sess)  # the product still runs on the EP, reading the LN's output
    ref = cpu_session(model).run(None, feeds)
    _check_outputs(sess.run(None, feeds), feeds, consts, readers, 1e-5, "bf16", ref)


def _check_axis_refusal(model, feeds):
    sess = xdna_session(model)
    assert ("ln", "LayerNormalization") in _on_cpu(sess)
    ref = cpu_session(model).run(None, feeds)[0]
    y = sess.run(None, feeds)[0]
    assert np.max(np.abs(y - ref)) < 0.05 * np.max(np.abs(ref))  # bf16 of the same LN output


def test_shared_layernorm_with_an_input_residual():
    """Two projections of one LN, one adding a residual that is a graph input: all in one fused node with the LN."""
    readers = [("proj", 40), ("proj_residual", 40)]
    model, feeds, consts, _ = _model((2, 6, 64), readers)
    sess = xdna_session(model)
    assert not _on_cpu(sess) and ("ln", "LayerNormalization") in ep_nodes(sess)
    _check_outputs(sess.run(None, feeds), feeds, consts, readers, 1e-5, "bf16", cpu_session(model).run(None, feeds))


def test_reader_below_min_mflop_keeps_the_layernorm():
    """One of two readers left on the CPU EP (min_mflop): the LN output is needed, so both read it from the CPU EP."""
    readers = [("proj", 512), ("proj", 4)]
    model, feeds, consts, _ = _model((1, 3, 64), readers)
    sess = xdna_session(model, {"min_mflop": "0.1"})
    assert ("ln", "LayerNormalization") in _on_cpu(sess)
    assert ("mm1", "MatMul") in _on_cpu(sess) and ("mm0", "MatMul") in ep_nodes(sess)
    _check_outputs(sess.run(None, feeds), feeds, consts, readers, 1e-5, "bf16", cpu_session(model).run(None, feeds))


def test_partition_report_names_the_prologue(tmp_path):
    report = tmp_path / "r.jsonl"
    model, _, _, _ = _model((1, 3, 64), [("proj", 64)])
    xdna_session(model, {"partition_report": str(report)})
    assert "with its LayerNormalization as the A prologue" in report.read_text()
    model, _, _, _ = _model((1, 3, 64), [("proj", 64), ("relu",)])
    report2 = tmp_path / "r2.jsonl"
    xdna_session(model, {"partition_report": str(report2)})
    assert "its LayerNormalization stays on the CPU EP (its output is read by other nodes" in report2.read_text()


def test_prologue_compiled_model_round_trips(tmp_path):
    readers = [("proj_bias", 64), ("proj", 64), ("proj_bias", 64)]
    model, feeds, consts, _ = _model((2, 7, 64), readers, seed=4)
    want = xdna_session(model).run(None, feeds)
    loaded = compiled_and_reloaded(model, tmp_path / "m_ctx.onnx")
    got = loaded.run(None, feeds)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_fake_npu_device(tmp_path, monkeypatch, capfd):
    from test_xrt_backend import write_kernel_dir

    use_fake_npu(monkeypatch)
    kernels = write_kernel_dir(tmp_path / "kernels", [(64, 256, 256)])
    readers = [("proj", 256)]
    model, feeds, consts, _ = _model((1, 5, 64), readers, seed=6)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 1
    sess = xdna_session(model, {"backend": "xrt", "kernel_dir": str(kernels), "log_level": "info"}, so=so)
    assert ("ln", "LayerNormalization") in ep_nodes(sess)
    _check_outputs(sess.run(None, feeds), feeds, consts, readers, 1e-5)
    del sess
    assert "1 GEMM calls on xrt, 0 on the CPU path" in capfd.readouterr().err


_ISA_CHECK = textwrap.dedent("""
    import test_layernorm_prologue as t
    for i, case in enumerate(t.CASES):
        for precision in ("bf16", "int8", "bf16x3"):
            t.check_case(*case, precision=precision, seed=30 + i)
    print("ok")
""")


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512", "avx512bf16", "amx"])
def test_each_kernel_set(isa):
    check_with_isa(isa, _ISA_CHECK, timeout=600)
