"""Shared helpers for the EP tests: tiny ONNX models, sessions on both EPs, the bf16 error bound."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import onnxruntime_ep_xdna as xdna

EP = xdna.EP_NAME
# tools/sanitize.sh (ThreadSanitizer) sets this: ORT's uninstrumented thread pool synchronises where TSan cannot see
# it, so ORT gets this many intra-op threads; the EP's own threads and the tests' threads still run concurrently.
ORT_THREADS = int(os.environ.get("XDNA_TEST_ORT_THREADS", "0"))
IR_VERSION = 10  # onnx 1.23 defaults to IR 14, which ORT 1.31 refuses
OPSET = 17


def make_model(nodes, inputs, outputs, initializers=(), opset=OPSET) -> bytes:
    graph = helper.make_graph(nodes, "test", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def tensor(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def xdna_session(model: bytes, options: dict | None = None, level=None, so=None):
    xdna.register()
    so = xdna.session_options(so)
    if ORT_THREADS:
        so.intra_op_num_threads = ORT_THREADS
    if level is not None:
        so.graph_optimization_level = level
    providers = [(EP, options) if options else EP, "CPUExecutionProvider"]
    return ort.InferenceSession(model, so, providers=providers)


def cpu_session(model: bytes, level=None):
    so = ort.SessionOptions()
    if ORT_THREADS:
        so.intra_op_num_threads = ORT_THREADS
    if level is not None:
        so.graph_optimization_level = level
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def ep_nodes(session) -> list[tuple[str, str]]:
    return xdna.placement(session).on(EP)


def bf16_bound(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Elementwise bound on |C_bf16 - C_exact| from the GEMM contract: (2^-7 + K*2^-23) * (|A|.|B|).

    bf16 keeps 8 significant bits, so each rounded operand is within 2^-8 relative and a product of two within
    2^-7 (+2^-16); K*2^-23 covers the fp32 accumulation (with
    a factor 2 of margin, so the CPU EP's own fp32 error fits inside as well).
    """
    mag = np.matmul(np.abs(a.astype(np.float64)), np.abs(b.astype(np.float64)))
    return (2.0**-7 + 2.0**-16 + k * 2.0**-23) * mag + 1e-30


def assert_within(actual, exact, bound, what=""):
    actual = np.asarray(actual, dtype=np.float64)
    exact = np.asarray(exact, dtype=np.float64)
    assert actual.shape == exact.shape, f"{what}: shape {actual.shape} != {exact.shape}"
    finite = np.isfinite(exact)
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(exact), err_msg=f"{what}: NaN positions differ")
    np.testing.assert_array_equal(actual[~finite & ~np.isnan(exact)], exact[~finite & ~np.isnan(exact)],
                                  err_msg=f"{what}: Inf differs")
    err = np.abs(actual - exact)[finite]
    lim = np.broadcast_to(bound, exact.shape)[finite]
    worst = np.argmax(err - lim) if err.size else 0
    assert np.all(err <= lim), f"{what}: error {err.flat[worst]:.3g} exceeds bf16 bound {lim.flat[worst]:.3g}"


def rng(seed=0):
    return np.random.default_rng(seed)
