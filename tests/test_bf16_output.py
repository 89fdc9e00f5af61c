"""A MatMul that writes its output in bfloat16 (issue 7: decoder_model's cross-attention K/V, cast to bf16 for the
decoder_with_past steps). The claim takes a Cast to bfloat16 that alone reads the product's (epilogue'd) output;
the fused node's output is then bf16, each fp32 value rounded as ORT's Cast rounds it (kernels/gemm_contract.h,
"Output in bfloat16"). So the bits are those of the same MatMul's fp32 output cast by ORT's CPU EP, on every path:
epilogues, precisions, special values, every kernel set, the xrt backend on the fake device, and a bf16 output the
group reads itself. Where the Cast's input is read elsewhere, the Cast stays on the CPU EP."""

from __future__ import annotations

import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import onnxruntime_ep_xdna as xdna
from cpu_isa import check_with_isa
from ep_helpers import (
    bf16_round_trip, bits_of, compiled_and_reloaded, cpu_session, ep_nodes, executed, init, make_model, tensor,
    use_fake_npu, xdna_session
)
from test_gemm_epilogue import FUSED_CASES, _model

CAST = "to_bf16"


def with_output_cast(model: bytes, value: str) -> bytes:
    """`model` with its output `value` cast to bfloat16 by a Cast named CAST: the graph's output is then bf16."""
    m = onnx.load_from_string(model)
    out = next(o for o in m.graph.output if o.name == value)
    m.graph.node.append(helper.make_node("Cast", [value], [value + "16"], to=TensorProto.BFLOAT16, name=CAST))
    out.name = value + "16"
    out.type.tensor_type.elem_type = TensorProto.BFLOAT16
    return m.SerializeToString()


def bf16_bits(session, feeds, name=None) -> np.ndarray:
    """A bfloat16 output's bits (numpy has no bfloat16: read from the OrtValue's buffer)."""
    values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}
    name = name or session.get_outputs()[0].name
    v = session.run_with_ort_values([name], values)[0]
    assert v.data_type() == "tensor(bfloat16)", v.data_type()
    return bits_of(v)


def cpu_cast_bits(x: np.ndarray) -> np.ndarray:
    """ORT's CPU EP casting fp32 `x` to bfloat16: the reference bits."""
    model = make_model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.BFLOAT16)],
                       [tensor("x", list(x.shape))], [tensor("y", list(x.shape), TensorProto.BFLOAT16)])
    return bf16_bits(cpu_session(model), {"x": x})


def check_bits(model: bytes, value: str, feeds: dict, options=None, cast_on_ep=True):
    """The model's output `value` cast to bf16 on the EP: the bits of ORT's Cast of the EP's fp32 output."""
    with_cast = xdna_session(with_output_cast(model, value), options)
    on_ep = {name for name, _ in ep_nodes(with_cast)}
    assert (CAST in on_ep) == cast_on_ep, on_ep
    got = bf16_bits(with_cast, feeds)
    fp32 = xdna_session(model, options).run([value], feeds)[0]
    want = cpu_cast_bits(fp32)
    np.testing.assert_array_equal(got, want)
    return got, fp32


def check_epilogue_case(a_shape, k, n, steps, opset, precision="bf16", seed=0):
    model, feeds, _, out = _model(a_shape, k, n, steps, seed=seed, opset=opset)
    opts = {"precision": precision} if precision != "bf16" else None
    with_cast = xdna_session(with_output_cast(model, out), opts)
    assert not xdna.placement(with_cast).on("CPUExecutionProvider"), f"{steps}: a node on the CPU EP"
    check_bits(model, out, feeds, opts)


# The epilogue's cases where ORT leaves a MatMul (a 2-D product + Add becomes a Gemm before partitioning: the Gemm
# claim takes no Cast), and products without an epilogue.
CASES = [c for c in FUSED_CASES if not (len(c[0]) == 2 and "residual" in c[3])] + [
    ((37, 70), 70, 45, [], 17), ((2, 300, 64), 64, 130, [], 17)]


@pytest.mark.parametrize("precision", ["bf16", "int8", "bf16x3"])
@pytest.mark.parametrize("case", CASES,
                         ids=lambda c: "-".join(c[3] or ["plain"]) + "-" + "x".join(map(str, c[0])))
def test_bf16_output_has_the_bits_of_the_cpu_cast(case, precision):
    check_epilogue_case(*case, precision=precision)


def runtime_b_model(B, H, M, T, D=64):
    return make_model([helper.make_node("MatMul", ["q", "kt"], ["s"], name="qk")],
                      [tensor("q", [B, H, M, D]), tensor("kt", [B, H, D, T])], [tensor("s", [B, H, M, T])])


@pytest.mark.parametrize("B,H,M,T", [(1, 2, 3, 50), (2, 3, 40, 77), (1, 1, 1, 1500)])
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_bf16_output_with_a_runtime_b(B, H, M, T, precision):
    r = np.random.default_rng(B * 100 + T)
    feeds = {"q": r.standard_normal((B, H, M, 64)).astype(np.float32),
             "kt": r.standard_normal((B, H, 64, T)).astype(np.float32)}
    check_bits(runtime_b_model(B, H, M, T), "s", feeds, {"precision": precision})


def special_values_model():
    """y = A . W with K = 2, W = [[1, 1, -1, 0], [1, 0, 1, 0]] (exact in bf16 and in every product path)."""
    w = np.array([[1, 1, -1, 0], [1, 0, 1, 0]], np.float32)
    return make_model([helper.make_node("MatMul", ["A", "W"], ["y"], name="mm")], [tensor("A", ["m", 2])],
                      [tensor("y", ["m", 4])], [init("W", w)])


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_nan_inf_and_overflow(precision):
    """NaN (either sign) becomes the quiet NaN of its sign as ORT's Cast writes it; +-Inf stay; a finite fp32 value
    past the bf16 maximum becomes Inf; ties round to even."""
    big = np.uint32(0x7F7F0000).view(np.float32)  # the largest bf16
    step = np.uint32(0x7B7F0000).view(np.float32)  # 2^-8 of it: big + step is finite in fp32, Inf in bf16
    a = np.array([[big, step], [np.nan, 1], [-np.inf, 1], [np.inf, 2], [1, 2.0 ** -8], [1, 3 * 2.0 ** -8],
                  [-big, -step], [0, 0], [1e-40, 0]], np.float32)
    a[1, 0] = np.uint32(0xFFC12345).view(np.float32)  # a negative NaN with a payload
    got, fp32 = check_bits(special_values_model(), "y", {"A": a}, {"precision": precision})
    if precision == "bf16":  # the cases really occur (int8 turns a row holding NaN or Inf into NaN)
        assert np.isfinite(fp32[0, 0]) and got[0, 0] == 0x7F80 and got[6, 0] == 0xFF80  # overflow to +-Inf
        assert got[2, 0] == 0xFF80 and got[3, 0] == 0x7F80  # Inf stays
        assert got[4, 0] == 0x3F80 and got[5, 0] == 0x3F82  # 1 + 2^-8 ties to 1; 1 + 3 * 2^-8 to 1 + 2^-6
    nan = (got & 0x7FFF) > 0x7F80
    assert nan[1].any() and set(got[nan].tolist()) <= {0x7FC0, 0xFFC0}


def test_a_product_read_elsewhere_keeps_its_cast_on_the_cpu_ep():
    """The product is also a graph output: the Cast cannot take it over, so it runs on the CPU EP."""
    model, feeds, _, out = _model((2, 37, 70), 70, 45, ["bias"], extra_outputs=("mm",))
    m = onnx.load_from_string(with_output_cast(model, out))
    m.graph.output.append(tensor(out, [None, 37, 45]))  # the epilogue's output read twice too
    s = xdna_session(m.SerializeToString())
    on_ep = {name for name, _ in ep_nodes(s)}
    assert "mm" in on_ep and CAST not in on_ep, on_ep
    fp32 = s.run([out], feeds)[0]
    np.testing.assert_array_equal(bf16_bits(s, feeds, out + "16"), cpu_cast_bits(fp32))


def test_a_cast_to_float16_stays_on_the_cpu_ep(tmp_path):
    model, feeds, _, out = _model((37, 70), 70, 45, [])
    m = onnx.load_from_string(with_output_cast(model, out))
    m.graph.node[-1].attribute[0].i = TensorProto.FLOAT16
    m.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    path = tmp_path / "m.onnx"
    path.write_bytes(m.SerializeToString())
    reasons = {d.node: d.reason for d in xdna.partition(path).decisions if d.claimed}
    assert "bf16" not in reasons["mm"], reasons
    s = xdna_session(m.SerializeToString())
    assert CAST not in {name for name, _ in ep_nodes(s)}
    want = xdna_session(model).run(None, feeds)[0].astype(np.float16)
    np.testing.assert_array_equal(s.run(None, feeds)[0], want)


def test_the_claim_says_it_writes_bf16(tmp_path):
    model, _, _, out = _model((2, 19, 64), 64, 77, ["bias", "gelu"])
    path = tmp_path / "m.onnx"
    path.write_bytes(with_output_cast(model, out))
    reasons = {d.node: d.reason for d in xdna.partition(path).decisions if d.claimed}
    assert "output written as bf16" in reasons["mm"] and "epilogue" in reasons["mm"], reasons


def test_a_bf16_output_the_group_reads_itself():
    """MatMul -> Cast(bf16) -> Cast(float) -> MatMul as B: the bf16 tensor lives inside the fused node (the second
    MatMul reads it through its Cast). bf16 rounds a run-time B to bf16 anyway: the bits of the graph without the
    Casts."""
    r = np.random.default_rng(3)
    w = r.standard_normal((64, 50)).astype(np.float32)

    def model(casts):
        nodes = [helper.make_node("MatMul", ["a", "w"], ["p"], name="mm")]
        b = "p"
        if casts:
            nodes += [helper.make_node("Cast", ["p"], ["p16"], to=TensorProto.BFLOAT16, name=CAST),
                      helper.make_node("Cast", ["p16"], ["pf"], to=TensorProto.FLOAT, name="to_fp32")]
            b = "pf"
        nodes.append(helper.make_node("MatMul", ["x", b], ["y"], name="mm2"))
        return make_model(nodes, [tensor("a", [64, 64]), tensor("x", [30, 64])], [tensor("y", [30, 50])],
                          [init("w", w)])

    feeds = {"a": r.standard_normal((64, 64)).astype(np.float32), "x": r.standard_normal((30, 64)).astype(np.float32)}
    s = xdna_session(model(True))
    assert {"mm", CAST, "to_fp32", "mm2"} <= {name for name, _ in ep_nodes(s)}
    want = xdna_session(model(False)).run(None, feeds)[0]
    np.testing.assert_array_equal(s.run(None, feeds)[0].view(np.uint32), want.view(np.uint32))


def test_compiled_model_round_trips(tmp_path):
    """EPContext carries output_bf16: a compiled model writes the same bf16 bits."""
    model, feeds, _, out = _model((2, 19, 64), 64, 77, ["bias", "gelu", "residual"])
    cast_model = with_output_cast(model, out)
    direct = bf16_bits(xdna_session(cast_model), feeds)
    loaded = compiled_and_reloaded(cast_model, tmp_path / "m_ctx.onnx")
    np.testing.assert_array_equal(bf16_bits(loaded, feeds), direct)


def test_xrt_backend_on_the_fake_device(tmp_path, monkeypatch):
    """More than 16 rows of a constant B on the fake NPU (K=64, N=256): the device returns fp32 C, the host rounds."""
    from test_xrt_backend import write_kernel_dir

    use_fake_npu(monkeypatch)
    kernels = write_kernel_dir(tmp_path / "kernels", [(64, 256, 256)])
    report = tmp_path / "report.jsonl"
    r = np.random.default_rng(17)
    w = r.standard_normal((64, 256)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")], [tensor("a", ["m", 64])],
                       [tensor("y", ["m", 256])], [init("w", w)])
    feeds = {"a": r.standard_normal((100, 64)).astype(np.float32)}
    check_bits(model, "y", feeds, {"backend": "xrt", "kernel_dir": str(kernels), "partition_report": str(report)})
    nodes = executed(report)
    assert len(nodes) == 2 and all(d["device_calls"] == 1 for d in nodes), nodes  # both sessions, on the device


_ISA_CHECK = textwrap.dedent("""
    import test_bf16_output as t
    for i, case in enumerate(t.CASES[:4] + t.CASES[-4:]):
        for precision in ("bf16", "int8"):
            t.check_epilogue_case(*case, precision=precision, seed=40 + i)
    t.test_nan_inf_and_overflow("bf16")
    print("ok")
""")


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512", "avx512bf16", "amx"])
def test_each_kernel_set(isa):
    check_with_isa(isa, _ISA_CHECK, timeout=600)
