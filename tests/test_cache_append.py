"""The decoder step's self-attention cache append taken into its projection's EP node (issues 7 and 13).

whisper/decoder_graph.py (pass 7) keeps the self-attention cache in bfloat16; after ORT's optimiser each layer's new
K and V reach the cache as
    projection [+ bias] -> Reshape [B, S, H, D] -> Transpose(0, 2, 1, 3) and Cast(bfloat16), either order
    -> Concat(past [B, H, T, D] bf16, new, axis 2) = present [B, H, T+S, D] bf16
and the projection's claim takes the chain (ops/matmul.cc, claim_cache_append): the node writes present itself, the
past's bits copied and each new value rounded as ORT's Cast rounds it. So present has the bits of the same EP
projection (fp32) followed by ORT's CPU nodes: checked against that graph (the projection's output also a graph
output, which keeps the chain on the CPU EP), against float64 numpy within the GEMM bound, on every backend path.
"""

from __future__ import annotations


import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import onnxruntime_ep_xdna as xdna
from ep_helpers import (bits_of, claim_reasons, compiled_and_reloaded, edited, ep_nodes, executed, init, make_model,
                        tensor, use_fake_npu, xdna_session)
from numerics import assert_within, bf16_bound, bf16_output_bound

C, H, D = 64, 4, 16  # model width, heads, head depth (H * D = C)
CHAIN = ["split", "move", "round", "append"]  # the chain's node names (the move is the Transpose, round the Cast)


def cache_model(*, bias=True, cast_first=False, width=C, heads=H, depth=D, axis=-2, perm=(0, 2, 1, 3),
                extra_output=None, seed=0) -> tuple[bytes, np.ndarray, np.ndarray | None]:
    """x [b, s, width] -> MatMul(W) [+ bias] -> the cache chain -> present [b, heads, t+s, depth] (bf16).
    `cast_first`: the Cast before the Transpose (as ORT leaves the keys). `extra_output`: a value of the chain also
    made a graph output (the chain then stays on the CPU EP)."""
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
    nodes.append(helper.make_node("Reshape", [value, "shape"], ["heads"], name="split"))
    move = helper.make_node("Transpose", ["?"], ["?"], perm=list(perm), name="move")
    cast = helper.make_node("Cast", ["?"], ["?"], to=TensorProto.BFLOAT16, name="round")
    first, second = (cast, move) if cast_first else (move, cast)
    first.input[0], first.output[0] = "heads", "mid"
    second.input[0], second.output[0] = "mid", "new16"
    nodes += [first, second, helper.make_node("Concat", ["past", "new16"], ["present"], axis=axis, name="append")]
    outputs = [tensor("present", ["b", heads, "t1", depth], TensorProto.BFLOAT16)]
    if extra_output:
        bf16 = extra_output == "mid" and cast_first
        rank = 4 if extra_output == "mid" else 3
        outputs.append(helper.make_tensor_value_info(extra_output, TensorProto.BFLOAT16 if bf16 else TensorProto.FLOAT,
                                                     [None] * rank))
    past = tensor("past", ["b", heads, "t", depth], TensorProto.BFLOAT16)
    model = make_model(nodes, [tensor("x", ["b", "s", width]), past], outputs, inits)
    return model, w, b


def bf16_value(bits: np.ndarray) -> ort.OrtValue:
    """A bfloat16 OrtValue of ORT's own allocation, as the decoder feeds its caches (onnx_model.ortvalue_like): an
    empty one has no data pointer at all."""
    from onnxruntime_ep_xdna.whisper.onnx_model import ortvalue_like

    return ortvalue_like(np.ascontiguousarray(bits, np.uint16), "tensor(bfloat16)")


def present_bits(session, x: np.ndarray, past_bits: np.ndarray) -> np.ndarray:
    feeds = {"x": ort.OrtValue.ortvalue_from_numpy(x), "past": bf16_value(past_bits)}
    v = session.run_with_ort_values(["present"], feeds)[0]
    assert v.data_type() == "tensor(bfloat16)", v.data_type()
    return bits_of(v)


def as_float(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def inputs(B, S, T, seed=1, width=C, heads=H, depth=D):
    r = np.random.default_rng(seed)
    x = r.standard_normal((B, S, width)).astype(np.float32)
    past = r.integers(0, 1 << 16, (B, heads, T, depth), dtype=np.uint16)  # any bits, NaN payloads among them
    return x, past


def unfused_value(bias: bool) -> str:
    """The value the chain starts from: made a graph output, it keeps the chain on the CPU EP."""
    return "yb" if bias else "y"


def check_present(B, S, T, *, bias, cast_first, options=None, seed=1, x=None, against_numpy=True):
    model, w, b = cache_model(bias=bias, cast_first=cast_first)
    fused = xdna_session(model, options)
    on_ep = {name for name, _ in ep_nodes(fused)}
    assert {"proj", *CHAIN} <= on_ep, on_ep
    assert not xdna.placement(fused).on("CPUExecutionProvider"), "a node on the CPU EP"
    x_, past = inputs(B, S, T, seed)
    x = x_ if x is None else x
    got = present_bits(fused, x, past)
    assert got.shape == (B, H, T + S, D)
    np.testing.assert_array_equal(got[:, :, :T], past)  # the past's bits, copied
    # The same EP projection in fp32, then ORT's CPU EP's Reshape / Transpose / Cast / Concat
    reference, _, _ = cache_model(bias=bias, cast_first=cast_first, extra_output=unfused_value(bias))
    unfused = xdna_session(reference, options)
    unfused_on_ep = {name for name, _ in ep_nodes(unfused)}
    assert "proj" in unfused_on_ep and not {"append", "round"} & unfused_on_ep, unfused_on_ep
    np.testing.assert_array_equal(got, present_bits(unfused, x, past))
    # The new rows against float64 numpy: the GEMM's bound and one rounding to bf16
    if against_numpy and (options or {}).get("precision", "bf16") == "bf16":
        exact = x.astype(np.float64) @ w.astype(np.float64) + (b if bias else 0)
        new = as_float(got[:, :, T:]).transpose(0, 2, 1, 3).reshape(B, S, H * D)
        assert_within(new, exact, bf16_output_bound(bf16_bound(x, w, C), exact), "new rows")
    return got


# (5, 1, 448): a past large enough to be copied on the thread pool
@pytest.mark.parametrize("B,S,T", [(1, 1, 0), (1, 1, 1), (1, 1, 128), (5, 1, 0), (5, 1, 1), (5, 1, 128), (2, 3, 7),
                                    (5, 1, 448)])
@pytest.mark.parametrize("bias,cast_first", [(True, False), (False, True)], ids=["value", "key"])
def test_present_has_the_bits_of_the_cpu_chain(B, S, T, bias, cast_first):
    check_present(B, S, T, bias=bias, cast_first=cast_first, seed=B * 1000 + S * 100 + T)


@pytest.mark.parametrize("precision", ["int8", "bf16x3"])
def test_other_precisions(precision):
    check_present(5, 1, 9, bias=True, cast_first=False, options={"precision": precision})


def test_nan_and_inf_in_the_new_rows():
    """A NaN or Inf in x gives NaN / Inf new values: rounded as ORT's Cast writes them (quiet NaN of its sign)."""
    x, _ = inputs(3, 2, 4)
    x[0, 0, 5] = np.nan
    x[1, 1, 0] = np.inf
    x[2, 0, :] = -np.inf
    x[2, 1, :] = 3e38  # overflows the product
    # (fp32 sums of huge terms may overflow to Inf - Inf = NaN where float64 does not: bits against the CPU chain)
    got = check_present(3, 2, 4, bias=True, cast_first=False, x=x, against_numpy=False)
    new = got[:, :, 4:]
    assert ((new & 0x7FFF) > 0x7F80).any() and ((new & 0x7FFF) == 0x7F80).any()
    nan = (new & 0x7FFF) > 0x7F80
    assert set(new[nan].tolist()) <= {0x7FC0, 0xFFC0}


def test_the_claim_says_so(tmp_path):
    model, _, _ = cache_model()
    assert "written into the bf16 cache" in claim_reasons(model, tmp_path)["proj"]


def third_input(g):
    g.input.append(tensor("more", ["b", H, 1, D], TensorProto.BFLOAT16))
    next(n for n in g.node if n.name == "append").input.append("more")
    g.output[0].type.tensor_type.shape.dim[2].dim_param = "t2"


VARIANTS = {
    "read elsewhere": (dict(extra_output="mid"), None, "read elsewhere"),
    "other perm": (dict(perm=(0, 2, 3, 1)), None, "Transpose(0, 2, 1, 3)"),
    "three inputs": ({}, third_input, "Concat(past, new) on axis 2"),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_stay_on_the_cpu_ep(variant, tmp_path):
    kwargs, edit, why = VARIANTS[variant]
    model, _, _ = cache_model(**kwargs)
    if edit:
        model = edited(model, edit)
    assert why in claim_reasons(model, tmp_path)["proj"]
    s = xdna_session(model)
    on_ep = {name for name, _ in ep_nodes(s)}
    assert "proj" in on_ep and "append" not in on_ep, on_ep


def test_other_axis_stays_on_the_cpu_ep(tmp_path):
    """Concat on the heads axis (past [b, t, ...] would be another layout): not a cache append."""
    model, _, _ = cache_model(axis=1)
    m = onnx.load_from_string(model)
    m.graph.input[1].type.tensor_type.shape.dim[1].dim_param = "t"
    m.graph.input[1].type.tensor_type.shape.dim[2].dim_value = 1
    m.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "t1"
    m.graph.output[0].type.tensor_type.shape.dim[2].dim_value = 1
    assert "on axis 2" in claim_reasons(m.SerializeToString(), tmp_path)["proj"]


def test_a_past_of_other_heads_is_a_clear_error():
    """The past's heads not declared: the claim takes it, the run checks it."""
    model, _, _ = cache_model()
    m = onnx.load_from_string(model)
    m.graph.input[1].type.tensor_type.shape.dim[1].dim_param = "h"
    s = xdna_session(m.SerializeToString())
    assert "append" in {name for name, _ in ep_nodes(s)}
    x, _ = inputs(1, 1, 0)
    with pytest.raises(Exception, match=r"past cache 'past' \[1, 5, 3, 16\] is not a bfloat16 \[1, 4, T, 16\]"):
        present_bits(s, x, np.zeros((1, H + 1, 3, D), np.uint16))
    # and the session still works
    x, past = inputs(1, 1, 3)
    assert present_bits(s, x, past).shape == (1, H, 4, D)


def test_compiled_model_round_trips(tmp_path):
    model, _, _ = cache_model(bias=True)
    x, past = inputs(5, 1, 17)
    direct = present_bits(xdna_session(model), x, past)
    loaded = compiled_and_reloaded(model, tmp_path / "m_ctx.onnx")
    np.testing.assert_array_equal(present_bits(loaded, x, past), direct)


def test_xrt_backend_on_the_fake_device(tmp_path, monkeypatch):
    """The projection on the fake NPU (20 rows, K=64, N=256), the split, rounding and copy on the host."""
    from test_xrt_backend import write_kernel_dir

    use_fake_npu(monkeypatch)
    kernels = write_kernel_dir(tmp_path / "kernels", [(64, 256, 256)])
    report = tmp_path / "report.jsonl"
    model, _, _ = cache_model(heads=4, depth=64)
    options = {"backend": "xrt", "kernel_dir": str(kernels), "partition_report": str(report)}
    s = xdna_session(model, options)
    assert {"proj", *CHAIN} <= {name for name, _ in ep_nodes(s)}
    x, past = inputs(5, 4, 6, heads=4, depth=64)
    got = present_bits(s, x, past)
    del s  # its runtime line is reported as it closes
    np.testing.assert_array_equal(got, present_bits(xdna_session(model), x, past))  # the emulator's bits
    nodes = executed(report)
    assert nodes and all(d["device_calls"] == 1 for d in nodes), nodes
