"""The EP driving the xrt backend end to end, on the fake NPU device of kernels/xrt/fake_device.h: results within
the bf16 bound, and a fault at every device step ending in correct numbers from the CPU path with a logged reason."""

from __future__ import annotations


import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper

from ep_helpers import (
    assert_within, bf16_bound, ep_nodes, executed, init, make_model, rng, tensor, use_fake_npu, xdna_session
)
from test_xrt_backend import write_kernel_dir

K, N = 64, 256  # one kernel: Kpad=64, Npad=256


@pytest.fixture
def fake_npu(tmp_path, monkeypatch):
    use_fake_npu(monkeypatch)
    return write_kernel_dir(tmp_path / "kernels", [(K, N, 256)])


def model_and_weight(n=N):
    w = rng(11).standard_normal((K, n)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")], [tensor("a", ["m", K])],
                       [tensor("y", ["m", n])], [init("w", w)])
    return model, w


def info_logging():
    so = ort.SessionOptions()
    so.log_severity_level = 1  # ORT filters our INFO lines otherwise
    return so


def test_ep_runs_on_fake_npu(fake_npu, capfd):
    model, w = model_and_weight()
    sess = xdna_session(model, {"backend": "xrt", "kernel_dir": str(fake_npu), "log_level": "info"}, so=info_logging())
    assert ep_nodes(sess) == [("mm", "MatMul")]
    for m in (1, 5, 300):
        a = rng(m).standard_normal((m, K)).astype(np.float32)
        assert_within(sess.run(None, {"a": a})[0], a.astype(np.float64) @ w, bf16_bound(a, w, K), f"M={m}")
    del sess
    err = capfd.readouterr().err
    assert "backend: xrt" in err
    assert "3 GEMM calls on xrt, 0 on the CPU path" in err


def test_shape_without_kernel_runs_on_cpu_path(fake_npu, capfd):
    model, w = model_and_weight(n=300)  # Npad=512: no kernel built
    sess = xdna_session(model, {"backend": "xrt", "kernel_dir": str(fake_npu), "log_level": "info"}, so=info_logging())
    a = rng(2).standard_normal((7, K)).astype(np.float32)
    assert_within(sess.run(None, {"a": a})[0], a.astype(np.float64) @ w, bf16_bound(a, w, K))
    assert "no NPU kernel built for K=64 N=300" in capfd.readouterr().err


@pytest.mark.parametrize("step", ["upload", "run", "run_state", "timeout", "result"])
def test_device_fault_falls_back_with_reason(fake_npu, monkeypatch, capfd, step):
    monkeypatch.setenv("XDNA_XRT_FAKE_FAULT", step)
    model, w = model_and_weight()
    # a kernel_dir of its own per test (tmp_path): backends are shared per configuration within the process
    report = fake_npu.parent / "report.jsonl"
    sess = xdna_session(model, {"backend": "xrt", "kernel_dir": str(fake_npu), "partition_report": str(report)})
    for m in (3, 260):
        a = rng(m).standard_normal((m, K)).astype(np.float32)
        assert_within(sess.run(None, {"a": a})[0], a.astype(np.float64) @ w, bf16_bound(a, w, K), step)
    del sess
    err = capfd.readouterr().err
    assert err.count("backend 'xrt' fault (") == 1 and "now runs on the CPU" in err
    (node,) = executed(report)
    assert node["device_calls"] == 0 and node["cpu_calls_by_reason"]["fault"] == 2  # both runs on the fallback


def test_environment_knobs_are_part_of_the_backend_configuration(fake_npu, monkeypatch, capfd):
    # Same options, another XDNA_XRT_FAKE_FAULT: a backend of its own (before, the first one was reused).
    model, w = model_and_weight()
    options = {"backend": "xrt", "kernel_dir": str(fake_npu)}
    a = rng(4).standard_normal((5, K)).astype(np.float32)
    healthy = xdna_session(model, options)
    assert_within(healthy.run(None, {"a": a})[0], a.astype(np.float64) @ w, bf16_bound(a, w, K))
    monkeypatch.setenv("XDNA_XRT_FAKE_FAULT", "run")
    faulty = xdna_session(model, options)
    for sess in (faulty, healthy):
        assert_within(sess.run(None, {"a": a})[0], a.astype(np.float64) @ w, bf16_bound(a, w, K))
    assert capfd.readouterr().err.count("backend 'xrt' fault (run") == 1  # the new backend only
