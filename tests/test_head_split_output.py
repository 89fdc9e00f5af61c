"""The prompt run's cross K/V head split taken into its projection's EP node (issue 13).

whisper/decoder_graph.py (passes 4, 5 and 8) leaves each cross-attention K/V output of decoder_model as
    projection [+ bias] -> Cast(bfloat16) -> Reshape [B, T, H, D] -> Transpose(0, 2, 1, 3) -> present (bf16)
with the keys' Reshape output also read by their attention (through a Cast to float) and the values' Transpose
output read by theirs. The projection's claim takes the Cast (claim_bf16_output) and then the Reshape and
Transpose (ops/matmul.cc, claim_head_split_output): the node writes present [B, H, T, D] itself, and the Reshape's
output too where something else reads it. So both have the bits of the same EP projection with its bf16 output
followed by ORT's CPU Reshape / Transpose: checked against that graph (the Cast's output also a graph output, which
keeps the chain on the CPU EP), against float64 numpy within the GEMM bound, on every backend path.
"""

from __future__ import annotations


import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import onnxruntime_ep_xdna as xdna
from ep_helpers import (bits_of, claim_reasons, compiled_and_reloaded, edited, ep_nodes, executed, init, make_model,
                        tensor, use_fake_npu, xdna_session)
from numerics import assert_within, bf16_bound, bf16_output_bound

C, H, D = 64, 4, 16  # model width, heads, head depth (H * D = C)
CHAIN = ["round", "split", "move"]  # the Cast, the Reshape, the Transpose


def split_model(*, bias=True, reader="none", width=C, heads=H, depth=D, perm=(0, 2, 1, 3), extra_output=None,
                seed=0) -> tuple[bytes, np.ndarray, np.ndarray | None]:
    """x [b, t, width] -> MatMul(W) [+ bias] -> Cast(bf16) -> Reshape -> Transpose -> present [b, heads, t, depth]
    (bf16). `reader`: "frames" (the keys) a Cast to float of the Reshape's output is also an output, "split" (the
    values) one of the Transpose's. `extra_output`: a value of the chain also made a graph output."""
    r = np.random.default_rng(seed)
    w = (r.standard_normal((width, heads * depth)) / np.sqrt(width)).astype(np.float32)
    b = r.standard_normal(heads * depth).astype(np.float32) if bias else None
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")]
    inits = [init("w", w), init("shape", np.array([0, 0, heads, depth], np.int64))]
    value = "y"
    if bias:
        nodes.append(helper.make_node("Add", ["y", "bias"], ["yb"], name="bias_add"))
        inits.append(init("bias", b))
        value = "yb"
    nodes += [helper.make_node("Cast", [value], ["y16"], to=TensorProto.BFLOAT16, name="round"),
              helper.make_node("Reshape", ["y16", "shape"], ["frames"], name="split"),
              helper.make_node("Transpose", ["frames"], ["present"], perm=list(perm), name="move")]
    outputs = [tensor("present", ["b", heads, "t", depth], TensorProto.BFLOAT16)]
    if reader != "none":
        nodes.append(helper.make_node("Cast", [reader if reader == "frames" else "present"], ["readback"],
                                      to=TensorProto.FLOAT, name="readback"))
        outputs.append(helper.make_tensor_value_info("readback", TensorProto.FLOAT, [None] * 4))
    if extra_output:
        outputs.append(helper.make_tensor_value_info(extra_output, TensorProto.BFLOAT16, [None] * 3))
    model = make_model(nodes, [tensor("x", ["b", "t", width])], outputs, inits)
    return model, w, b


def run(session, x: np.ndarray) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs() if o.name in ("present", "readback")]
    values = session.run_with_ort_values(names, {"x": ort.OrtValue.ortvalue_from_numpy(x)})
    return {n: bits_of(v) for n, v in zip(names, values)}


def as_float(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def check_split(B, T, *, bias, reader, options=None, seed=1, x=None, against_numpy=True):
    model, w, b = split_model(bias=bias, reader=reader)
    fused = xdna_session(model, options)
    on_ep = {name for name, _ in ep_nodes(fused)}
    assert {"proj", *CHAIN} <= on_ep, on_ep
    assert set(xdna.placement(fused).on("CPUExecutionProvider")) <= {("readback", "Cast")}
    if x is None:
        x = np.random.default_rng(seed).standard_normal((B, T, C)).astype(np.float32)
    got = run(fused, x)
    assert got["present"].shape == (B, H, T, D)
    # The same EP projection with its bf16 output, then ORT's CPU EP's Reshape / Transpose
    reference, _, _ = split_model(bias=bias, reader=reader, extra_output="y16")
    unfused = xdna_session(reference, options)
    unfused_on_ep = {name for name, _ in ep_nodes(unfused)}
    assert {"proj", "round"} <= unfused_on_ep and not {"split", "move"} & unfused_on_ep, unfused_on_ep
    want = run(unfused, x)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # present against float64 numpy: the GEMM's bound and one rounding to bf16
    if against_numpy and (options or {}).get("precision", "bf16") == "bf16":
        exact = x.astype(np.float64) @ w.astype(np.float64) + (b if bias else 0)
        split = as_float(got["present"]).transpose(0, 2, 1, 3).reshape(B, T, H * D)
        assert_within(split, exact, bf16_output_bound(bf16_bound(x, w, C), exact), "present")
    return got


@pytest.mark.parametrize("B,T", [(1, 1), (1, 37), (5, 1), (5, 23), (1, 1500)])
@pytest.mark.parametrize("bias,reader", [(False, "frames"), (True, "split"), (True, "none")],
                         ids=["key", "value", "alone"])
def test_present_has_the_bits_of_the_cpu_chain(B, T, bias, reader):
    check_split(B, T, bias=bias, reader=reader, seed=B * 10000 + T)


@pytest.mark.parametrize("precision", ["int8", "bf16x3"])
@pytest.mark.parametrize("reader", ["frames", "split"])
def test_other_precisions(precision, reader):
    check_split(5, 9, bias=reader == "split", reader=reader, options={"precision": precision})


def test_empty_frames():
    got = check_split(2, 0, bias=True, reader="frames", against_numpy=False)
    assert got["present"].shape == (2, H, 0, D)


def test_nan_and_inf():
    """NaN / Inf in x give NaN / Inf values, rounded as ORT's Cast writes them (quiet NaN of its sign)."""
    x = np.random.default_rng(3).standard_normal((3, 5, C)).astype(np.float32)
    x[0, 0, 5] = np.nan
    x[1, 1, 0] = np.inf
    x[2, 1, :] = 3e38  # overflows the product
    got = check_split(3, 5, bias=False, reader="frames", x=x, against_numpy=False)["present"]
    nan = (got & 0x7FFF) > 0x7F80
    assert nan.any() and ((got & 0x7FFF) == 0x7F80).any()
    assert set(got[nan].tolist()) <= {0x7FC0, 0xFFC0}


def test_the_claim_says_so(tmp_path):
    model, _, _ = split_model(reader="frames")
    why = claim_reasons(model, tmp_path)["proj"]
    assert "split into heads [B, H, T, D]" in why and "its [B, T, H, D] written too" in why, why
    model, _, _ = split_model(reader="split")
    why = claim_reasons(model, tmp_path)["proj"]
    assert "split into heads" in why and "written too" not in why, why


def other_shape(g):  # [1, t, H, D] of x [b, t, H*D]: not proven to keep x's dims (b is symbolic)
    next(i for i in g.initializer if i.name == "shape").CopyFrom(init("shape", np.array([1, 0, H, D], np.int64)))


VARIANTS = {
    "other perm": (dict(perm=(0, 2, 3, 1)), None, "not Transpose(0, 2, 1, 3)"),
    "not a head split": ({}, other_shape, "does not split [B, T, H*D] into [B, T, H, D]"),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_stay_on_the_cpu_ep(variant, tmp_path):
    kwargs, edit, why = VARIANTS[variant]
    model, _, _ = split_model(**kwargs)
    if edit:
        model = edited(model, edit)
    assert why in claim_reasons(model, tmp_path)["proj"]
    s = xdna_session(model)
    on_ep = {name for name, _ in ep_nodes(s)}
    assert {"proj", "round"} <= on_ep and "move" not in on_ep, on_ep


def test_cast_output_read_elsewhere_stays(tmp_path):
    """The bf16 product read by something else too: only the Cast is taken (the unfused reference's graph)."""
    model, _, _ = split_model(extra_output="y16")
    assert "split into heads" not in claim_reasons(model, tmp_path)["proj"]


def test_compiled_model_round_trips(tmp_path):
    model, _, _ = split_model(reader="frames")
    x = np.random.default_rng(7).standard_normal((5, 31, C)).astype(np.float32)
    direct = run(xdna_session(model), x)
    loaded = compiled_and_reloaded(model, tmp_path / "m_ctx.onnx")
    got = run(loaded, x)
    for name in direct:
        np.testing.assert_array_equal(got[name], direct[name], err_msg=name)


def test_xrt_backend_on_the_fake_device(tmp_path, monkeypatch):
    """The projection on the fake NPU (20 rows, K=64, N=256), the rounding and the split on the host."""
    from test_xrt_backend import write_kernel_dir

    use_fake_npu(monkeypatch)
    kernels = write_kernel_dir(tmp_path / "kernels", [(64, 256, 256)])
    report = tmp_path / "report.jsonl"
    model, _, _ = split_model(heads=4, depth=64, reader="frames", bias=False)
    options = {"backend": "xrt", "kernel_dir": str(kernels), "partition_report": str(report)}
    s = xdna_session(model, options)
    assert {"proj", *CHAIN} <= {name for name, _ in ep_nodes(s)}
    x = np.random.default_rng(5).standard_normal((5, 4, C)).astype(np.float32)
    got = run(s, x)
    del s  # its runtime line is reported as it closes
    want = run(xdna_session(model), x)  # the emulator's bits
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    nodes = executed(report)
    assert nodes and all(d["device_calls"] == 1 for d in nodes), nodes
