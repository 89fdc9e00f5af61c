"""EPContext (issue 12), first step: the XDNA EP does not generate EPContext nodes yet, so a session asking for them
(ep.context_enable=1, or onnxruntime.ModelCompiler) fails with a clear message naming the EP and the option, not
ORT's "OrtEp::Compile() returned a NULL EPContext node". Sessions without it are unaffected."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper

import onnxruntime_ep_xdna as xdna
from ep_helpers import EP, assert_within, bf16_bound, ep_nodes, init, make_model, rng, tensor, xdna_session

W = rng(1).standard_normal((64, 32)).astype(np.float32)


def matmul_model() -> bytes:
    w = W
    return make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [tensor("x", [8, 64])],
                      [tensor("y", [8, 32])], [init("w", w)])


def test_context_enable_is_a_clear_error(tmp_path):
    so = ort.SessionOptions()
    so.add_session_config_entry("ep.context_enable", "1")
    so.add_session_config_entry("ep.context_file_path", str(tmp_path / "out_ctx.onnx"))
    with pytest.raises(Exception) as e:
        xdna_session(matmul_model(), so=so)
    msg = str(e.value)
    assert EP in msg and "EPContext" in msg and "ep.context_enable" in msg and "issue 12" in msg
    assert "NULL EPContext" not in msg


def test_model_compiler_is_a_clear_error(tmp_path):
    if not hasattr(ort, "ModelCompiler"):
        pytest.skip("this onnxruntime has no ModelCompiler")
    src = tmp_path / "m.onnx"
    src.write_bytes(matmul_model())
    xdna.register()
    so = xdna.session_options()
    so.add_provider_for_devices([d for d in ort.get_ep_devices() if d.ep_name == EP], {})
    compiler = ort.ModelCompiler(so, str(src))
    with pytest.raises(Exception) as e:
        compiler.compile_to_file(str(tmp_path / "m_ctx.onnx"))
    msg = str(e.value)
    assert EP in msg and "EPContext" in msg and "NULL EPContext" not in msg


def test_without_context_enable_the_session_runs_on_the_ep():
    model = matmul_model()
    sess = xdna_session(model)
    assert ("mm", "MatMul") in ep_nodes(sess)
    x = rng(2).standard_normal((8, 64)).astype(np.float32)
    assert_within(sess.run(None, {"x": x})[0], x.astype(np.float64) @ W, bf16_bound(x, W, 4))
