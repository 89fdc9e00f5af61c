"""The GEMM epilogue (kernels/gemm_contract.h, "Epilogue"): a MatMul's bias Add, Gelu / BiasGelu and residual Add
run by the EP inside the product, against float64 numpy and ORT's CPU EP within the derived bound
(numerics.epilogue_bound), placement proven; what the epilogue cannot take stays on the CPU EP with the right result.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
from onnx import helper

import onnxruntime_ep_xdna as xdna

from cpu_isa import check_with_int8_isa, check_with_isa
from ep_helpers import compiled_and_reloaded, cpu_session, ep_nodes, init, make_model, tensor, xdna_session
from numerics import assert_within, epilogue_bound, epilogue_exact, fp32_eps, gelu64, precision_bound

MS = "com.microsoft"


def _model(a_shape, k, n, steps, seed=0, opset=17, bias_shape=None, residual_shape=None, extra_outputs=()):
    """MatMul(A, W) followed by `steps`: "bias" (Add of a constant), "gelu" (com.microsoft Gelu), "onnx_gelu"
    (ONNX Gelu, opset 20), "tanh_gelu" (ONNX Gelu approximate=tanh), "biasgelu" (com.microsoft BiasGelu),
    "residual" (Add of input R), "runtime_bias" (Add of input R shaped bias_shape). Returns (model bytes, feeds,
    constants)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    bias = rng.standard_normal(bias_shape or (n,)).astype(np.float32)
    out_shape = list(a_shape[:-1]) + [n]
    # A symbolic batch dim, as Whisper's: with static 3-D shapes ORT turns MatMul + Add into Reshape, Gemm, Reshape
    # before partitioning (MatMulAddFusion).
    sym = lambda s: ["batch"] + list(s[1:]) if len(s) >= 3 else list(s)  # noqa: E731
    nodes = [helper.make_node("MatMul", ["A", "W"], ["mm"], name="mm")]
    inits = [init("W", w)]
    inputs = [tensor("A", sym(a_shape))]
    feeds = {"A": rng.standard_normal(a_shape).astype(np.float32)}
    value = "mm"
    for i, step in enumerate(steps):
        out = f"s{i}"
        if step == "bias":
            inits.append(init("bias", bias))
            nodes.append(helper.make_node("Add", [value, "bias"], [out], name=f"bias_add{i}"))
        elif step == "gelu":
            nodes.append(helper.make_node("Gelu", [value], [out], name=f"gelu{i}", domain=MS))
        elif step == "erf_gelu":  # as PyTorch exports it (Whisper's fc1): x/2 (1 + erf(x / sqrt 2))
            inits += [init(f"sqrt2_{i}", np.float32(np.sqrt(2))), init(f"one_{i}", np.float32(1)),
                      init(f"half_{i}", np.float32(0.5))]
            nodes += [helper.make_node("Div", [value, f"sqrt2_{i}"], [f"d{i}"], name=f"gelu_div{i}"),
                      helper.make_node("Erf", [f"d{i}"], [f"e{i}"], name=f"gelu_erf{i}"),
                      helper.make_node("Add", [f"e{i}", f"one_{i}"], [f"p{i}"], name=f"gelu_add{i}"),
                      helper.make_node("Mul", [value, f"p{i}"], [f"m{i}"], name=f"gelu_mul{i}"),
                      helper.make_node("Mul", [f"m{i}", f"half_{i}"], [out], name=f"gelu{i}")]
        elif step == "onnx_gelu":
            nodes.append(helper.make_node("Gelu", [value], [out], name=f"gelu{i}"))
        elif step == "tanh_gelu":
            nodes.append(helper.make_node("Gelu", [value], [out], name=f"gelu{i}", approximate="tanh"))
        elif step == "biasgelu":
            inits.append(init("bias", bias))
            nodes.append(helper.make_node("BiasGelu", [value, "bias"], [out], name=f"biasgelu{i}", domain=MS))
        elif step in ("residual", "runtime_bias"):
            shape = residual_shape or out_shape
            inputs.append(tensor("R", sym(shape) if len(shape) == len(a_shape) else list(shape)))
            feeds["R"] = rng.standard_normal(shape).astype(np.float32)
            nodes.append(helper.make_node("Add", ["R", value], [out], name=f"residual_add{i}"))  # product second
        else:
            raise ValueError(step)
        value = out
    outputs = [tensor(value, sym(out_shape))] + [tensor(v, sym(out_shape)) for v in extra_outputs]
    graph = helper.make_graph(nodes, "epilogue", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    return model.SerializeToString(), feeds, {"W": w, "bias": bias}, value


def _exact_and_bound(steps, feeds, consts, precision):
    a, w = feeds["A"], consts["W"]
    product = np.matmul(a.astype(np.float64), w.astype(np.float64))
    bias = consts["bias"] if any(s in ("bias", "biasgelu") for s in steps) else None
    gelu = any("gelu" in s for s in steps)
    residual = feeds.get("R") if "residual" in steps else None
    exact = epilogue_exact(product, bias, gelu, residual)
    e = precision_bound(a, w, precision)
    bound = epilogue_bound(e, product, bias, gelu, residual)
    cpu_e = fp32_eps(a.shape[-1]) * np.matmul(np.abs(a.astype(np.float64)), np.abs(w.astype(np.float64)))
    cpu_bound = epilogue_bound(cpu_e, product, bias, gelu, residual) + 2e-7 * np.abs(exact)  # ORT's own erf
    return exact, bound, cpu_bound


FUSED_CASES = [
    # (A shape, K, N, steps, opset); 2-D A with a bias Add is a Gemm by the time the EP sees it (ORT's
    # MatMulAddFusion), so the bias cases are 3-D, as Whisper's are.
    ((2, 37, 70), 70, 45, ["bias"], 17),
    ((2, 37, 70), 70, 45, ["bias", "gelu"], 17),
    ((3, 29, 70), 70, 45, ["bias", "onnx_gelu"], 20),
    ((3, 29, 70), 70, 45, ["bias", "erf_gelu"], 17),
    ((37, 70), 70, 45, ["erf_gelu"], 17),
    ((37, 70), 70, 130, ["biasgelu"], 17),
    ((2, 19, 64), 64, 77, ["bias", "residual"], 17),
    ((37, 70), 70, 45, ["residual"], 17),
    ((5, 3, 96), 96, 300, ["bias", "gelu", "residual"], 17),
    ((1, 1, 512), 512, 512, ["bias", "residual"], 17),  # a decoder step's shape
    ((1, 300, 128), 128, 257, ["biasgelu", "residual"], 17),  # many rows: the blocked kernels' row blocks
]


def check_fused(a_shape, k, n, steps, opset, precision="bf16", seed=0):
    model, feeds, consts, out = _model(a_shape, k, n, steps, seed=seed, opset=opset)
    opts = {"precision": precision} if precision != "bf16" else None
    sess = xdna_session(model, opts)
    # Every node on the EP, whatever ORT renamed or fused before partitioning (2-D MatMul + bias Add -> Gemm).
    on_cpu = xdna.placement(sess).on("CPUExecutionProvider")
    assert not on_cpu and ep_nodes(sess), f"{steps}: on the CPU EP: {on_cpu}"
    y = sess.run(None, feeds)[0]
    exact, bound, cpu_bound = _exact_and_bound(steps, feeds, consts, precision)
    assert_within(y, exact, bound, f"{steps} {precision} vs float64")
    ref = cpu_session(model).run(None, feeds)[0]
    assert_within(ref, exact, cpu_bound, f"{steps}: the CPU EP vs float64")
    assert_within(y, ref, bound + cpu_bound, f"{steps} {precision} vs the CPU EP")


@pytest.mark.parametrize("precision", ["bf16", "int8", "bf16x3"])
@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: "-".join(c[3]) + "-" + "x".join(map(str, c[0])))
def test_epilogue_fused_within_bound(case, precision):
    check_fused(*case, precision=precision)


def test_per_node_policy_with_epilogue():
    """The per-node precision policy still names the MatMul (the epilogue's nodes ride with it)."""
    model, feeds, consts, _ = _model((2, 37, 70), 70, 45, ["bias", "gelu", "residual"])
    sess = xdna_session(model, {"precision": "bf16", "precision_policy": "int8:name=mm"})
    assert {"mm", "bias_add0", "gelu1", "residual_add2"} <= {n for n, _ in ep_nodes(sess)}
    exact, bound, _ = _exact_and_bound(["bias", "gelu", "residual"], feeds, consts, "int8")
    assert_within(sess.run(None, feeds)[0], exact, bound, "policy int8")


REFUSED_CASES = {
    # what stays on the CPU EP -> (steps, model kwargs)
    "runtime bias (not constant, broadcasts)": (["runtime_bias"], {"residual_shape": (45,)}),
    "broadcasting residual": (["bias", "residual"], {"residual_shape": (1, 1, 45)}),
    "constant that is not a per-column bias": (["bias"], {"bias_shape": (1, 37, 45)}),
    "tanh Gelu": (["tanh_gelu"], {"opset": 20}),
}


@pytest.mark.parametrize("name", list(REFUSED_CASES))
def test_refused_steps_stay_on_cpu(name):
    steps, kwargs = REFUSED_CASES[name]
    model, feeds, consts, out = _model((2, 37, 70), 70, 45, steps, **kwargs)
    sess = xdna_session(model)
    on_ep = {n for n, _ in ep_nodes(sess)}
    assert "mm" in on_ep
    last = steps[-1]
    refused = {"runtime_bias": "residual_add0", "residual": f"residual_add{len(steps) - 1}", "bias": "bias_add0",
               "tanh_gelu": "gelu0"}[last]
    assert refused not in on_ep, f"{name}: {refused} should stay on the CPU EP"
    ref = cpu_session(model).run(None, feeds)[0]
    y = sess.run(None, feeds)[0]
    a, w = feeds["A"].astype(np.float64), consts["W"].astype(np.float64)
    e = precision_bound(feeds["A"], consts["W"], "bf16")
    # bf16 product, then the CPU EP's fp32 steps (their roundings and tanh-vs-erf are inside the slack below)
    assert_within(y, ref, 1.13 * e + 2e-6 * (np.abs(ref) + 1), name)


def test_product_read_twice_keeps_its_add_on_cpu():
    """The product is also a graph output: the Add cannot take it over (its intermediate would be lost)."""
    model, feeds, consts, out = _model((2, 37, 70), 70, 45, ["bias"], extra_outputs=("mm",))
    sess = xdna_session(model)
    on_ep = {n for n, _ in ep_nodes(sess)}
    assert "mm" in on_ep and "bias_add0" not in on_ep
    y, mm = sess.run(None, feeds)
    assert_within(y, mm.astype(np.float64) + consts["bias"], 2.0**-23 * np.abs(y) + 1e-30, "bias on the CPU EP")


def test_epilogue_compiled_model_round_trips(tmp_path):
    """EPContext carries the epilogue: a compiled model gives the same numbers, bit for bit."""
    model, feeds, consts, _ = _model((2, 19, 64), 64, 77, ["bias", "gelu", "residual"])
    direct = xdna_session(model).run(None, feeds)[0]
    loaded = compiled_and_reloaded(model, tmp_path / "m_ctx.onnx")
    np.testing.assert_array_equal(loaded.run(None, feeds)[0], direct)


def test_gelu_approximation_bound():
    """The emulator's GELU against float64 over a dense grid: within GELU_APPROX |x| (numerics), i.e. the contract's
    erf bound; run through a 1x1 identity product so the epilogue code path itself is measured."""
    x = np.concatenate([np.linspace(-12, 12, 200001), [0.0, 1e-30, -1e-30, 5.0, -5.0]]).astype(np.float32)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["mm"], name="mm"),
         helper.make_node("Gelu", ["mm"], ["y"], name="gelu", domain=MS)],
        "g", [tensor("A", ["rows", 1])], [tensor("y", ["rows", 1])], [init("W", np.ones((1, 1), np.float32))]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)], ir_version=10).SerializeToString()
    sess = xdna_session(model)
    assert "gelu" in {n for n, _ in ep_nodes(sess)}
    xa = x[:, None]
    y = sess.run(None, {"A": xa})[0]
    # the product rounds x to bf16 (exactly representable inputs aside): compare with GELU of what the product gave
    from numerics import bf16_round
    xb = bf16_round(xa).astype(np.float64)
    err = np.abs(y - gelu64(xb))
    assert np.all(err <= 2.0**-21 * np.abs(xb) + 1e-38), f"worst {np.max(err / np.maximum(np.abs(xb), 1e-38)):.3g}"
    assert np.isnan(sess.run(None, {"A": np.array([[np.nan]], np.float32)})[0]).all()


_ISA_CHECK = textwrap.dedent("""
    import test_gemm_epilogue as t
    for i, case in enumerate(t.FUSED_CASES):
        for precision in ("bf16", "int8", "bf16x3"):
            t.check_fused(*case, precision=precision, seed=20 + i)
    print("ok")
""")


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512", "avx512bf16", "amx"])
def test_each_kernel_set(isa):
    check_with_isa(isa, _ISA_CHECK, timeout=600)


# Kernel level: the kernels apply the epilogue where they store each panel of C (emulator_epilogue.inc, vectorised
# per kernel set); that must give the bits of the separate pass (_native.apply_epilogue: gemm_contract.h's
# apply_epilogue) on every path: one row (GEMV), few rows (direct, tile-paired, few-row tiles), many rows (blocked,
# tile panels, row tails), ragged right edges, and the special values the clamps and NaN rules meet.
KERNEL_SHAPES = [(1, 70, 45), (2, 64, 77), (5, 512, 130), (13, 96, 300), (17, 96, 300), (33, 70, 45),
                 (300, 128, 257), (523, 130, 1030)]
KERNEL_EPILOGUES = [("bias",), ("gelu",), ("residual",), ("bias", "gelu"), ("bias", "residual"),
                    ("bias", "gelu", "residual")]


def check_kernel_epilogue_bits(seed=0):
    from onnxruntime_ep_xdna import _native

    rng = np.random.default_rng(seed)
    for M, K, N in KERNEL_SHAPES:
        a = (rng.standard_normal((M, K)) * 3).astype(np.float32)  # products past the GELU's clamp (|x| > 5.66)
        w = (rng.standard_normal((K, N)) * (2 / np.sqrt(K))).astype(np.float32)
        bias = rng.standard_normal(N).astype(np.float32)
        bias[:3] = [np.inf, -np.inf, np.nan]
        residual = rng.standard_normal((M, N)).astype(np.float32)
        if M > 3:
            a[1, 2] = np.nan  # int8: a NaN row of C
        packed = _native.pack_b(w)
        pairs = _native.emulator_pair_b(packed)
        runs = [("int8", _native.quantize_b_int8(w), _native.emulator_gemm_int8), ("bf16", packed, _native.emulator_gemm)]
        if pairs.size:  # the AMX kernels' few-row path on a weight paired once
            runs.append(("bf16 paired", packed, lambda a_, b_, **kw: _native.emulator_gemm_paired(a_, b_, pairs, **kw)))
        for name, b, gemm in runs:
            product = gemm(a, b)
            for steps in KERNEL_EPILOGUES:
                kw = {"bias": bias if "bias" in steps else None, "gelu": "gelu" in steps,
                      "residual": residual if "residual" in steps else None}
                want = _native.apply_epilogue(product, **kw)
                got = gemm(a, b, **kw)
                where = f"{M}x{K}x{N} {name} {steps}"
                np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=where)
                kept = ~np.isnan(want)  # bit for bit (-0 included); a NaN's payload is not part of the contract
                np.testing.assert_array_equal(got.view(np.uint32)[kept], want.view(np.uint32)[kept], err_msg=where)


def test_kernel_epilogue_bits_default_kernels():
    check_kernel_epilogue_bits()


_ISA_BITS_CHECK = textwrap.dedent("""
    import test_gemm_epilogue as t
    t.check_kernel_epilogue_bits(seed=7)
    print("ok")
""")


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512", "avx512bf16", "amx"])
def test_kernel_epilogue_bits_each_kernel_set(isa):
    check_with_isa(isa, _ISA_BITS_CHECK, timeout=600)


@pytest.mark.parametrize("int8_isa", ["generic", "avx2", "avxvnni", "vnni", "amx"])
def test_kernel_epilogue_bits_each_int8_kernel_set(int8_isa):
    """The int8 sets on their own (XDNA_EMULATOR_INT8_ISA): the one beside a bf16 set is not always the only one
    this CPU runs (avx2 kernels go with AVX-VNNI where the CPU has it)."""
    check_with_int8_isa(int8_isa, _ISA_BITS_CHECK)


def _conv_gelu_model(gelu, cin=24, cout=40, k=3, stride=1, pads=(1, 1), seed=0):
    """Conv1d(X, W, bias) then a GELU as Whisper's encoder has it: `gelu` is "erf_gelu" (the decomposed form PyTorch
    exports), "gelu" (com.microsoft) or "onnx_gelu" (opset 20)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((cout, cin, k)) / np.sqrt(cin * k)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    nodes = [helper.make_node("Conv", ["X", "W", "B"], ["c"], name="conv", kernel_shape=[k], pads=list(pads),
                              strides=[stride])]
    inits = [init("W", w), init("B", bias)]
    if gelu == "erf_gelu":
        inits += [init("sqrt2", np.float32(np.sqrt(2))), init("one", np.float32(1)), init("half", np.float32(0.5))]
        nodes += [helper.make_node("Div", ["c", "sqrt2"], ["d"], name="gelu_div"),
                  helper.make_node("Erf", ["d"], ["e"], name="gelu_erf"),
                  helper.make_node("Add", ["e", "one"], ["p"], name="gelu_add"),
                  helper.make_node("Mul", ["c", "p"], ["m"], name="gelu_mul"),
                  helper.make_node("Mul", ["m", "half"], ["y"], name="gelu")]
    else:
        nodes.append(helper.make_node("Gelu", ["c"], ["y"], name="gelu", **({"domain": MS} if gelu == "gelu" else {})))
    graph = helper.make_graph(nodes, "conv_gelu", [tensor("X", ["batch", cin, "t"])], [tensor("y", ["batch", cout, None])],
                              inits)
    opsets = [helper.make_opsetid("", 20 if gelu == "onnx_gelu" else 17), helper.make_opsetid(MS, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString(), w, bias


@pytest.mark.parametrize("precision", ["bf16", "int8", "bf16x3"])
@pytest.mark.parametrize("gelu,stride", [("erf_gelu", 1), ("gelu", 2), ("onnx_gelu", 1)])
def test_conv_takes_its_gelu(gelu, stride, precision):
    """Conv + GELU (Whisper's encoder front end) as one EP node, the GELU the GEMM epilogue's: within the bound
    against float64 and ORT's CPU EP, nothing left on the CPU EP."""
    model, w, bias = _conv_gelu_model(gelu, stride=stride)
    sess = xdna_session(model, {"precision": precision} if precision != "bf16" else None)
    assert not xdna.placement(sess).on("CPUExecutionProvider") and ep_nodes(sess)
    x = np.random.default_rng(1).standard_normal((2, 24, 53)).astype(np.float32)
    y = sess.run(None, {"X": x})[0]
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1)))
    t_out = (53 + 2 - 3) // stride + 1
    cols = np.stack([xp[:, :, t * stride: t * stride + 3] for t in range(t_out)], axis=1).reshape(2, t_out, -1)
    wt = w.astype(np.float64).reshape(w.shape[0], -1).T
    product = cols @ wt  # [batch, t_out, Cout]
    exact = epilogue_exact(product, bias, True).transpose(0, 2, 1)
    bound = epilogue_bound(precision_bound(cols, wt, precision), product, bias, True).transpose(0, 2, 1)
    assert y.shape == exact.shape
    assert_within(y, exact, bound, f"conv + {gelu} {precision} vs float64")
    cpu_e = fp32_eps(cols.shape[-1]) * (np.abs(cols) @ np.abs(wt))
    cpu_bound = (epilogue_bound(cpu_e, product, bias, True) + 2e-7 * np.abs(epilogue_exact(product, bias, True)))
    ref = cpu_session(model).run(None, {"X": x})[0]
    assert_within(ref, exact, cpu_bound.transpose(0, 2, 1), f"conv + {gelu}: the CPU EP vs float64")
    assert_within(y, ref, bound + cpu_bound.transpose(0, 2, 1), f"conv + {gelu} {precision} vs the CPU EP")


def _conv_time_major_model(t_in, pos_rows, pos_rank=2, symbolic=True, seed=0):
    """Whisper's encoder front end after conv2: Conv1d(X, W, bias, stride 2) -> erf GELU -> Transpose(0, 2, 1) ->
    Add(., P) with P a constant [pos_rows, Cout] (or [1, pos_rows, Cout]: pos_rank 3). X's length symbolic or
    t_in. Returns (model bytes, w, bias, P)."""
    from onnx import ModelProto

    model, w, bias = _conv_gelu_model("erf_gelu", stride=2, seed=seed)
    m = ModelProto.FromString(model)
    cout = w.shape[0]
    pos = np.random.default_rng(seed + 7).standard_normal((pos_rows, cout)).astype(np.float32)
    pos = pos[None] if pos_rank == 3 else pos
    g = m.graph
    g.initializer.append(init("P", pos))
    g.node.extend([helper.make_node("Transpose", ["y"], ["yt"], name="transpose", perm=[0, 2, 1]),
                   helper.make_node("Add", ["yt", "P"], ["out"], name="pos_add")])
    if not symbolic:
        g.input[0].type.tensor_type.shape.dim[2].dim_value = t_in
    del g.output[:]
    g.output.append(tensor("out", ["batch", None, cout]))
    return m.SerializeToString(), w, bias, pos


def _conv_time_major_exact(x, w, bias, pos, precision):
    """The float64 result of _conv_time_major_model (stride 2, pads 1, k 3) and the epilogue's bound on it."""
    t_out = (x.shape[2] + 2 - 3) // 2 + 1
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1)))
    cols = np.stack([xp[:, :, t * 2: t * 2 + 3] for t in range(t_out)], axis=1).reshape(x.shape[0], t_out, -1)
    wt = w.astype(np.float64).reshape(w.shape[0], -1).T
    product = cols @ wt  # [batch, t_out, Cout]: the output's layout now
    residual = pos.reshape(t_out, -1)
    exact = epilogue_exact(product, bias, True, residual)
    bound = epilogue_bound(precision_bound(cols, wt, precision), product, bias, True, residual)
    return cols, wt, product, residual, exact, bound


@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize("symbolic,pos_rank", [(True, 2), (False, 3)])
def test_conv_takes_its_transpose_and_positional_add(symbolic, pos_rank, precision, tmp_path):
    """Conv + GELU + Transpose(0, 2, 1) + Add(constant [T_out, Cout]) as one EP node (OpPlan::conv_time_major: the
    GEMM writes the [T_out, Cout] rows in place, the constant added by the epilogue after the GELU): within the
    bound against float64 and ORT's CPU EP, nothing left on the CPU EP, the same bits after an EPContext round
    trip."""
    t_in = 53
    t_out = (t_in + 2 - 3) // 2 + 1
    model, w, bias, pos = _conv_time_major_model(t_in, t_out, pos_rank, symbolic)
    sess = xdna_session(model, {"precision": precision} if precision != "bf16" else None)
    assert not xdna.placement(sess).on("CPUExecutionProvider") and ep_nodes(sess)
    x = np.random.default_rng(1).standard_normal((2, 24, t_in)).astype(np.float32)
    y = sess.run(None, {"X": x})[0]
    cols, wt, product, residual, exact, bound = _conv_time_major_exact(x, w, bias, pos, precision)
    assert y.shape == exact.shape
    assert_within(y, exact, bound, f"conv time-major {precision} vs float64")
    cpu_e = fp32_eps(cols.shape[-1]) * (np.abs(cols) @ np.abs(wt))
    cpu_bound = epilogue_bound(cpu_e, product, bias, True, residual) + 2e-7 * np.abs(exact)
    ref = cpu_session(model).run(None, {"X": x})[0]
    assert_within(ref, exact, cpu_bound, "conv time-major: the CPU EP vs float64")
    assert_within(y, ref, bound + cpu_bound, f"conv time-major {precision} vs the CPU EP")
    if precision == "bf16":
        loaded = compiled_and_reloaded(model, tmp_path / "conv_ctx.onnx")
        assert np.array_equal(loaded.run(None, {"X": x})[0], y)


def test_conv_positional_add_of_another_length():
    """A constant whose rows are not T_out (ORT refuses such a graph when the length is known): with a symbolic
    length the node is claimed and a run of another length is a clear error, nothing computed."""
    t_in = 53
    t_out = (t_in + 2 - 3) // 2 + 1
    x = np.random.default_rng(1).standard_normal((1, 24, t_in)).astype(np.float32)
    model, *_ = _conv_time_major_model(t_in, t_out + 3, symbolic=True)
    sess = xdna_session(model)
    assert not xdna.placement(sess).on("CPUExecutionProvider")
    with pytest.raises(Exception, match=f"Conv output length {t_out} differs from the {t_out + 3} rows"):
        sess.run(None, {"X": x})


def test_conv_time_major_on_the_fake_npu_device(tmp_path, monkeypatch, capfd):
    """The xrt backend on the fake NPU device runs the conv's product (its own summation order), the epilogue
    (bias, GELU, the constant residual) and the time-major rows: within the bound against float64."""
    import onnxruntime as ort

    from ep_helpers import use_fake_npu
    from test_xrt_backend import write_kernel_dir

    model, w, bias, pos = _conv_time_major_model(53, 27)
    x = np.random.default_rng(2).standard_normal((2, 24, 53)).astype(np.float32)
    *_, exact, bound = _conv_time_major_exact(x, w, bias, pos, "bf16")
    use_fake_npu(monkeypatch)
    kernels = write_kernel_dir(tmp_path / "kernels", [(128, 256, 256)])
    so = ort.SessionOptions()
    so.log_severity_level = 1
    sess = xdna_session(model, {"backend": "xrt", "kernel_dir": str(kernels), "log_level": "info"}, so=so)
    assert not xdna.placement(sess).on("CPUExecutionProvider") and ep_nodes(sess)
    assert_within(sess.run(None, {"X": x})[0], exact, bound, "conv time-major on the fake NPU vs float64")
    del sess
    assert "2 GEMM calls on xrt, 0 on the CPU path" in capfd.readouterr().err
