"""Shared helpers for the EP tests: tiny ONNX models, sessions on both EPs (numerics: tests/numerics.py)."""

from __future__ import annotations

import ctypes
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import onnxruntime_ep_xdna as xdna
from numerics import assert_within, bf16_bound, bf16_round  # noqa: F401  (re-exported for the tests)

EP = xdna.EP_NAME
# tools/sanitize.sh (ThreadSanitizer) sets this: ORT's uninstrumented thread pool synchronises where TSan cannot see
# it, so ORT gets this many intra-op threads; the EP's own threads and the tests' threads still run concurrently.
ORT_THREADS = int(os.environ.get("XDNA_TEST_ORT_THREADS", "0"))
IR_VERSION = 10  # onnx 1.23 defaults to IR 14, which ORT 1.31 refuses
OPSET = 17


def bits_of(v: ort.OrtValue) -> np.ndarray:
    """An fp32 or bfloat16 OrtValue's bits (uint32 / uint16; numpy has no bfloat16: read from the value's buffer)."""
    if v.data_type() == "tensor(float)":
        return v.numpy().view(np.uint32)
    assert v.data_type() == "tensor(bfloat16)", v.data_type()
    shape = v.shape()
    n = int(np.prod(shape))
    bits = np.ctypeslib.as_array((ctypes.c_uint16 * n).from_address(v.data_ptr())) if n else np.zeros(0, np.uint16)
    return bits.copy().reshape(shape)


def make_model(nodes, inputs, outputs, initializers=(), opset=OPSET) -> bytes:
    graph = helper.make_graph(nodes, "test", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def tensor(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def bf16_round_trip(*names) -> tuple[list, list[str]]:
    """Casts of each input to bfloat16 and back to float (the bf16 K/V caches of the Whisper decoder copies, made
    here from fp32 inputs by the CPU EP's Cast): (the four nodes per pair, the float values to read instead)."""
    to16 = [helper.make_node("Cast", [n], [f"{n}16"], to=TensorProto.BFLOAT16, name=f"{n}_to_bf16") for n in names]
    back = [helper.make_node("Cast", [f"{n}16"], [f"{n}f"], to=TensorProto.FLOAT, name=f"{n}_to_fp32") for n in names]
    return to16 + back, [f"{n}f" for n in names]


def xdna_session(model: bytes, options: dict | None = None, level=None, so=None):
    xdna.register()
    so = xdna.session_options(so)
    if ORT_THREADS:
        so.intra_op_num_threads = ORT_THREADS
    if level is not None:
        so.graph_optimization_level = level
    providers = [(EP, options) if options else EP, "CPUExecutionProvider"]
    return ort.InferenceSession(model, so, providers=providers)


def compiled_and_reloaded(model: bytes, ctx_path):
    """`model` compiled for the EP (ep.context_enable=1: ORT writes it to `ctx_path` as the session is created), then
    loaded from there in a new session."""
    so = ort.SessionOptions()
    so.add_session_config_entry("ep.context_enable", "1")
    so.add_session_config_entry("ep.context_file_path", str(ctx_path))
    xdna_session(model, so=so)
    assert ctx_path.exists()
    return ort.InferenceSession(str(ctx_path), xdna.session_options(), providers=[EP, "CPUExecutionProvider"])


def cpu_session(model: bytes, level=None):
    so = ort.SessionOptions()
    if ORT_THREADS:
        so.intra_op_num_threads = ORT_THREADS
    if level is not None:
        so.graph_optimization_level = level
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def ep_nodes(session) -> list[tuple[str, str]]:
    return xdna.placement(session).on(EP)


def use_fake_npu(monkeypatch) -> None:
    """The xrt backend on the fake NPU device (kernels/xrt/fake_device.h), with no injected fault and no cost model
    (which would keep tiny test shapes on the CPU path)."""
    monkeypatch.setenv("XDNA_XRT_SHIM", "fake")
    monkeypatch.setenv("XDNA_XRT_COST_MODEL", "0")
    monkeypatch.delenv("XDNA_XRT_FAKE_FAULT", raising=False)


def executed(report):
    """The run-time lines of a partition report (one per claimed node, written when its session is released)."""
    return [d for d in map(json.loads, report.read_text().splitlines()) if d.get("runtime")]


def rng(seed=0):
    return np.random.default_rng(seed)


def claim_reasons(model: bytes, tmp_path) -> dict:
    """Each node's claim decision reason from xdna.partition (the model written to tmp_path first)."""
    path = tmp_path / "m.onnx"
    path.write_bytes(model)
    return {d.node: d.reason for d in xdna.partition(path).decisions}


def edited(model: bytes, edit) -> bytes:
    """The model after edit(graph) changed its graph in place."""
    m = onnx.load_from_string(model)
    edit(m.graph)
    return m.SerializeToString()
