"""EPContext (issue 12): compiled models. Generation (ep.context_enable=1 and onnxruntime.ModelCompiler), in embed
mode and with side files; loading gives the very numbers of the uncompiled session (same plans, same packed
weights, same contract); a payload for another EP version, backend or precision, a corrupt or truncated payload, a
missing side file and a side file outside the model's directory are clear errors naming the EP, never a crash."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

import onnxruntime_ep_xdna as xdna
from ep_helpers import EP, assert_within, bf16_bound, ep_nodes, init, make_model, rng, tensor, xdna_session

W = rng(1).standard_normal((64, 32)).astype(np.float32)
X = rng(2).standard_normal((8, 64)).astype(np.float32)


def matmul_model() -> bytes:
    return make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [tensor("x", [8, 64])],
                      [tensor("y", [8, 32])], [init("w", W)])


def mixed_model() -> bytes:
    """Every op the EP claims, with every plan field in use, and an op it leaves to the CPU EP (Relu)."""
    r = rng(3)
    w3 = r.standard_normal((2, 64, 32)).astype(np.float32)
    wg = r.standard_normal((32, 64)).astype(np.float32)
    cg = r.standard_normal((32,)).astype(np.float32)
    wc = r.standard_normal((16, 8, 3)).astype(np.float32)
    bc = r.standard_normal((16,)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y0"], name="mm"),
        helper.make_node("Relu", ["y0"], ["y"], name="relu"),
        helper.make_node("MatMul", ["x3", "w3"], ["y3"], name="mm_batched"),
        helper.make_node("Gemm", ["x", "wg", "cg"], ["yg"], name="gemm", transB=1, alpha=0.5, beta=2.0),
        helper.make_node("Transpose", ["xt"], ["xt_t"], name="tr", perm=[1, 0]),
        helper.make_node("MatMul", ["xt_t", "w"], ["yt"], name="mm_transposed"),
        helper.make_node("Conv", ["xc", "wc", "bc"], ["yc"], name="conv", strides=[2], pads=[1, 1]),
    ]
    return make_model(nodes,
                      [tensor("x", [8, 64]), tensor("x3", [2, 8, 64]), tensor("xt", [64, 8]), tensor("xc", [1, 8, 20])],
                      [tensor("y", [8, 32]), tensor("y3", [2, 8, 32]), tensor("yg", [8, 32]), tensor("yt", [8, 32]),
                       tensor("yc", [1, 16, 10])],
                      [init("w", W), init("w3", w3), init("wg", wg), init("cg", cg), init("wc", wc), init("bc", bc)])


def mixed_feeds() -> dict:
    r = rng(4)
    return {"x": X, "x3": r.standard_normal((2, 8, 64)).astype(np.float32),
            "xt": r.standard_normal((64, 8)).astype(np.float32), "xc": r.standard_normal((1, 8, 20)).astype(np.float32)}


def generate(model: bytes, out: Path, embed: bool, options: dict | None = None) -> ort.InferenceSession:
    """A session with ep.context_enable=1: ORT writes the compiled model to `out` as the session is created."""
    so = ort.SessionOptions()
    so.add_session_config_entry("ep.context_enable", "1")
    so.add_session_config_entry("ep.context_embed_mode", "1" if embed else "0")
    so.add_session_config_entry("ep.context_file_path", str(out))
    return xdna_session(model, options, so=so)


def context_nodes(path: Path) -> list[onnx.NodeProto]:
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == "EPContext"]


def attr(node: onnx.NodeProto, name: str):
    return helper.get_attribute_value(next(a for a in node.attribute if a.name == name))


def side_file(compiled: Path) -> Path:
    (node,) = context_nodes(compiled)
    assert attr(node, "embed_mode") == 0
    return compiled.parent / attr(node, "ep_cache_context").decode()


def load_error(model, so=None, options: dict | None = None) -> str:
    with pytest.raises(Exception) as e:
        xdna_session(str(model) if isinstance(model, Path) else model, options, so=so)
    msg = str(e.value)
    assert EP in msg, msg
    return msg


def test_plan_serialiser_round_trips_every_field():
    from onnxruntime_ep_xdna import _native

    assert _native.ep_context_plan_roundtrip_problem() == ""


@pytest.mark.parametrize("embed", [False, True], ids=["side_file", "embedded"])
def test_context_enable_generates_a_model_that_loads_and_gives_the_same_numbers(tmp_path, embed):
    model = mixed_model()
    feeds = mixed_feeds()
    reference = xdna_session(model).run(None, feeds)
    out = tmp_path / "m_ctx.onnx"
    generating = generate(model, out, embed)
    for a, b in zip(generating.run(None, feeds), reference):
        assert np.array_equal(a, b)  # the generating session itself runs as usual

    nodes = context_nodes(out)
    assert len(nodes) >= 1
    for n in nodes:
        assert n.domain == "com.microsoft"
        assert attr(n, "source").decode() == EP and attr(n, "main_context") == 1
        assert attr(n, "embed_mode") == int(embed)
        assert attr(n, "ep_sdk_version").decode() == xdna.__version__
        assert attr(n, "partition_name")
    compiled = onnx.load(str(out))
    assert not compiled.graph.initializer  # every weight went into the payload: nothing left for the CPU EP
    if embed:
        assert not list(tmp_path.glob("*.xdnactx"))
    else:
        assert side_file(out).is_file()

    sess = xdna_session(str(out))
    placed = ep_nodes(sess)
    assert {op for _, op in placed} == {"EPContext"} and len(placed) == len(nodes)
    assert ("relu", "Relu") in xdna.placement(sess).on("CPUExecutionProvider")
    for a, b in zip(sess.run(None, feeds), reference):
        assert np.array_equal(a, b)  # bit-identical: same contract, same packed weights
    exact = X.astype(np.float64) @ W.astype(np.float64)
    assert_within(sess.run(["y"], feeds)[0], np.maximum(exact, 0), bf16_bound(X, W, 64))


@pytest.mark.parametrize("embed", [False, True], ids=["side_file", "embedded"])
def test_model_compiler_output_runs_on_the_ep_with_the_same_numbers(tmp_path, embed):
    if not hasattr(ort, "ModelCompiler"):
        pytest.skip("this onnxruntime has no ModelCompiler")
    src = tmp_path / "m.onnx"
    src.write_bytes(mixed_model())
    feeds = mixed_feeds()
    reference = xdna_session(src.read_bytes()).run(None, feeds)
    out = xdna.compile_model(src, tmp_path / "m_compiled.onnx", embed=embed)
    assert context_nodes(out)
    assert bool(list(tmp_path.glob("*.xdnactx"))) != embed
    sess = xdna_session(str(out))
    assert {op for _, op in ep_nodes(sess)} == {"EPContext"}
    for a, b in zip(sess.run(None, feeds), reference):
        assert np.array_equal(a, b)


def test_compile_from_bytes_and_load_from_bytes_needs_the_model_path(tmp_path):
    out = xdna.compile_model(matmul_model(), tmp_path / "c.onnx")
    msg = load_error(out.read_bytes())  # the side file cannot be found without knowing where the model lies
    assert "ep.context_file_path" in msg
    so = ort.SessionOptions()
    so.add_session_config_entry("ep.context_file_path", str(out))
    sess = xdna_session(out.read_bytes(), so=so)
    assert np.array_equal(sess.run(None, {"x": X})[0], xdna_session(matmul_model()).run(None, {"x": X})[0])


def test_without_context_enable_the_session_runs_on_the_ep(tmp_path):
    sess = xdna_session(matmul_model())
    assert ("mm", "MatMul") in ep_nodes(sess)
    assert_within(sess.run(None, {"x": X})[0], X.astype(np.float64) @ W, bf16_bound(X, W, 64))
    assert not list(tmp_path.iterdir())


# ---- precision modes and fused attention in a compiled model ----

# mm in int8, gemm and conv in bf16x3, the rest in bf16: every weight form in one payload
MIXED_POLICY = {"precision_policy": "int8:name=mm;bf16x3:name=gemm;bf16x3:op=Conv"}


@pytest.mark.parametrize("embed", [False, True], ids=["side_file", "embedded"])
def test_int8_and_bf16x3_nodes_compile_and_load_bit_identically(tmp_path, embed):
    model = mixed_model()
    feeds = mixed_feeds()
    reference = xdna_session(model, MIXED_POLICY).run(None, feeds)
    bf16 = xdna_session(model).run(None, feeds)
    names = ["y", "y3", "yg", "yt", "yc"]
    # the policy is in force: int8 and bf16x3 give other numbers than bf16 where they apply, the same elsewhere
    for name, a, b in zip(names, reference, bf16):
        assert np.array_equal(a, b) == (name in ("y3", "yt")), name
    out = tmp_path / "p_ctx.onnx"
    generate(model, out, embed, MIXED_POLICY)
    sess = xdna_session(str(out), MIXED_POLICY)
    assert {op for _, op in ep_nodes(sess)} == {"EPContext"}
    for name, a, b in zip(names, sess.run(None, feeds), reference):
        assert np.array_equal(a, b), name  # the stored int8 / bf16x3 forms are the packed ones, bit for bit


def test_context_of_another_precision_policy_is_refused_naming_both(tmp_path):
    model = mixed_model()
    out = tmp_path / "p_ctx.onnx"
    generate(model, out, False, MIXED_POLICY)
    msg = load_error(out)  # the session's default: bf16
    assert "precision 'bf16, rules: int8:name=mm; bf16x3:name=gemm; bf16x3:op=Conv'" in msg, msg
    assert "this session: 'bf16'" in msg, msg
    msg = load_error(out, options={"precision": "int8"})
    assert "this session: 'int8'" in msg, msg


def test_fused_attention_compiles_and_loads_bit_identically(tmp_path):
    from test_attention_fusion import feeds as attention_feeds
    from test_attention_fusion import sdpa_model

    model = sdpa_model(1, 2, 40, 50, "mul")
    f = attention_feeds(1, 2, 40, 50, 7)
    uncompiled = xdna_session(model)
    assert ("sm", "Softmax") in ep_nodes(uncompiled)  # the pattern is one fused attention node on the EP
    reference = uncompiled.run(None, f)
    out = tmp_path / "att_ctx.onnx"
    generate(model, out, True)
    sess = xdna_session(str(out))
    placed = ep_nodes(sess)
    assert {op for _, op in placed} == {"EPContext"}
    assert not any(op == "Softmax" for _, op in xdna.placement(sess).on("CPUExecutionProvider"))
    assert np.array_equal(sess.run(None, f)[0], reference[0])


# ---- what a compiled model must not get away with ----


def compiled(tmp_path: Path, embed=False) -> Path:
    out = tmp_path / "c.onnx"
    generate(matmul_model(), out, embed)
    return out


def patch(path: Path, old: bytes, new: bytes):
    data = path.read_bytes()
    assert len(old) == len(new) and data.count(old) >= 1
    path.write_bytes(data.replace(old, new, 1))


def field(s: str) -> bytes:
    return struct.pack("<Q", len(s)) + s.encode()  # how the payload stores a string


@pytest.mark.parametrize("what,old,new", [
    ("EP version", xdna.__version__, "9" * len(xdna.__version__)),
    ("backend", "emulator", "npu-fake"),
    ("precision", "bf16", "int8"),
])
def test_payload_for_another_configuration_is_refused_naming_what_differs(tmp_path, what, old, new):
    out = compiled(tmp_path)
    patch(side_file(out), field(old), field(new))
    msg = load_error(out)
    assert f"{what} '{new}'" in msg and f"this session: '{old}'" in msg and "compile" in msg.lower()


def test_other_format_version_is_refused(tmp_path):
    out = compiled(tmp_path)
    f = side_file(out)
    data = bytearray(f.read_bytes())
    data[8:12] = struct.pack("<I", 99)
    f.write_bytes(bytes(data))
    assert "format version 99" in load_error(out)


def test_corrupt_weights_metadata_and_truncation_are_clear_errors(tmp_path):
    out = compiled(tmp_path)
    f = side_file(out)
    good = f.read_bytes()
    data_offset = struct.unpack_from("<Q", good, 20)[0]

    bad = bytearray(good)
    bad[-100] ^= 0x40  # a weight bit
    f.write_bytes(bytes(bad))
    assert "weight data checksum" in load_error(out)

    bad = bytearray(good)
    bad[data_offset - 1] ^= 0x01  # metadata
    f.write_bytes(bytes(bad))
    assert "metadata checksum" in load_error(out)

    for size in (len(good) // 2, 40, 3, 0):
        f.write_bytes(good[:size])
        msg = load_error(out)
        assert "truncated" in msg or "bad magic" in msg or "empty" in msg, msg

    f.write_bytes(b"not a payload at all" * 10)
    assert "bad magic" in load_error(out)
    f.write_bytes(good)
    xdna_session(str(out))  # and the good one still loads


def test_corrupt_embedded_payload_is_a_clear_error(tmp_path):
    out = compiled(tmp_path, embed=True)
    m = onnx.load(str(out))
    (node,) = [n for n in m.graph.node if n.op_type == "EPContext"]
    a = next(a for a in node.attribute if a.name == "ep_cache_context")
    payload = bytearray(a.s)
    payload[len(payload) // 2] ^= 0x10
    a.s = bytes(payload)
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    assert "checksum" in load_error(bad)
    a.s = bytes(payload[:1000])
    onnx.save(m, str(bad))
    assert "truncated" in load_error(bad)


def test_missing_or_escaping_side_file_is_a_clear_error(tmp_path):
    out = compiled(tmp_path)
    f = side_file(out)
    name = f.name
    moved = tmp_path.parent / (tmp_path.name + "_outside.xdnactx")
    f.rename(moved)
    msg = load_error(out)
    assert "missing" in msg and name in msg

    def with_path(p: str) -> Path:
        m = onnx.load(str(out))
        (node,) = [n for n in m.graph.node if n.op_type == "EPContext"]
        next(a for a in node.attribute if a.name == "ep_cache_context").s = p.encode()
        path = tmp_path / "edited.onnx"
        onnx.save(m, str(path))
        return path

    assert "leaves the model's directory" in load_error(with_path("../" + moved.name))
    assert "absolute path" in load_error(with_path(str(moved)))
    (tmp_path / "link.xdnactx").symlink_to(moved)  # inside by name, outside in fact
    assert "outside the model's directory" in load_error(with_path("link.xdnactx"))
    moved.rename(f)
    xdna_session(str(out))


def test_epcontext_of_another_ep_is_left_alone(tmp_path):
    """A model with our EPContext node and another EP's: ours is claimed, the other is not (and, with no EP for it,
    ORT reports that node, not us)."""
    out = compiled(tmp_path, embed=True)
    m = onnx.load(str(out))
    other = helper.make_node("EPContext", ["x"], ["other_y"], name="other_ctx", domain="com.microsoft",
                             source="SomeOtherExecutionProvider", embed_mode=1, ep_cache_context=b"opaque",
                             main_context=1)
    m.graph.node.append(other)
    m.graph.output.append(helper.make_tensor_value_info("other_y", onnx.TensorProto.FLOAT, [8, 64]))
    path = tmp_path / "two.onnx"
    onnx.save(m, str(path))
    with pytest.raises(Exception) as e:
        xdna_session(str(path))
    msg = str(e.value)
    assert "other_ctx" in msg or "EPContext" in msg
    assert "corrupt EPContext payload" not in msg and "bad magic" not in msg  # we never read its payload
    # ours alone still loads and runs
    m.graph.node.pop()
    m.graph.output.pop()
    onnx.save(m, str(path))
    assert [op for _, op in ep_nodes(xdna_session(str(path)))] == ["EPContext"]
