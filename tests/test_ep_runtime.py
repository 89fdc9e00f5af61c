"""Registration, provider selection, options, threads, and backend faults falling back to the CPU."""

from __future__ import annotations

import threading

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper

import onnxruntime_ep_xdna as xdna
from ep_helpers import EP, assert_within, bf16_bound, ep_nodes, executed, init, make_model, rng, tensor, xdna_session
from numerics import bf16x3_bound, int8_bound


def linear_model(k=48, n=40, seed=0):
    w = rng(seed).standard_normal((k, n)).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")],
        [tensor("a", ["batch", k])],
        [tensor("y", ["batch", n])],
        [init("w", w)],
    )
    return model, w


def test_import_registers_nothing_and_register_is_idempotent():
    import subprocess
    import sys

    code = (
        "import onnxruntime as ort, onnxruntime_ep_xdna as x\n"
        "assert x.EP_NAME not in ort.get_available_providers()\n"
        "assert x.register() == x.EP_NAME and x.register() == x.EP_NAME\n"
        "print(ort.get_available_providers())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert EP in out


def test_locator():
    assert xdna.get_ep_name() == EP
    assert xdna.get_ep_names() == [EP]
    assert xdna.get_library_path().endswith("libonnxruntime_ep_xdna.so")


def test_selection_by_name_in_providers_list():
    model, w = linear_model()
    xdna.register()
    so = xdna.session_options()
    sess = ort.InferenceSession(model, so, providers=[EP, "CPUExecutionProvider"])
    assert sess.get_providers()[0] == EP
    assert ep_nodes(sess) == [("mm", "MatMul")]


def test_selection_through_ep_devices():
    model, w = linear_model()
    xdna.register()
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP]
    assert len(devices) == 1
    assert devices[0].ep_metadata["backend"] in ("emulator", "xrt")
    so = xdna.session_options()
    so.add_provider_for_devices(devices, {"backend": "emulator"})
    sess = ort.InferenceSession(model, so)
    assert ep_nodes(sess) == [("mm", "MatMul")]


@pytest.mark.parametrize(
    "options,message",
    [
        ({"no_such_option": "1"}, "unknown option 'no_such_option'"),
        ({"backend": "gpu"}, "bad value 'gpu' for option 'backend'"),
        ({"precision": "fp8"}, "bad value 'fp8' for option 'precision' (accepted: bf16, int8, bf16x3)"),
        ({"precision_policy": "int4:op=MatMul"}, "bad rule 'int4:op=MatMul' in precision_policy: unknown mode 'int4'"),
        ({"precision_policy": "bf16:name=*attn*;int8:kind=MatMul"},
         "bad rule 'int8:kind=MatMul' in precision_policy: unknown selector key 'kind'"),
        ({"precision_policy": "int8"}, "bad rule 'int8' in precision_policy: no ':'"),
        ({"precision_policy": "int8:weight=sometimes"}, "weight=sometimes (accepted: constant, runtime)"),
        ({"min_mflop": "lots"}, "bad value 'lots' for option 'min_mflop'"),
        ({"log_level": "loud"}, "bad value 'loud' for option 'log_level'"),
    ],
)
def test_bad_options_fail_at_session_creation(options, message, capfd):
    # The EP refuses to be created. ORT's Python InferenceSession then prints the error and retries with the
    # CPU EP only (its own fallback, not ours): the message must be there and nothing may run on the EP.
    model, _ = linear_model()
    sess = xdna_session(model, options)
    assert message in capfd.readouterr().out
    assert EP not in sess.get_providers()


def test_explicit_xrt_backend_without_npu_is_a_clear_error(capfd):
    import glob

    if glob.glob("/dev/accel/accel*"):
        pytest.skip("this machine has an NPU")
    model, _ = linear_model()
    sess = xdna_session(model, {"backend": "xrt"})
    assert "backend=xrt requested but unavailable" in capfd.readouterr().out
    assert EP not in sess.get_providers()


def test_concurrent_runs_on_one_session():
    model, w = linear_model(k=96, n=130)
    sess = xdna_session(model)
    r = rng(3)
    inputs = [r.standard_normal((int(r.integers(1, 200)), 96)).astype(np.float32) for _ in range(16)]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(i):
        try:
            for _ in range(5):
                results[i] = sess.run(None, {"a": inputs[i]})[0]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, a in enumerate(inputs):
        assert_within(results[i], a.astype(np.float64) @ w, bf16_bound(a, w, 96), f"thread {i}")


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_few_rows_on_one_weight_any_order_of_row_counts(precision):
    # Beam search: 1, then 2..16 rows (bf16 on AMX: the weight's tile-paired copy, made at the first such call;
    # int8: tiles of just those rows), then many, then few again, on one session and weight. Each result within
    # the precision's bound of float64, the same bits on one thread and on two, the node on the EP.
    model, w = linear_model(k=512, n=515, seed=4)
    one, two = ({"threads": str(t), **({"precision": precision} if precision != "bf16" else {})} for t in (1, 2))
    sessions = [xdna_session(model, one), xdna_session(model, two)]
    assert ep_nodes(sessions[1]) == [("mm", "MatMul")]
    r = rng(5)
    for m in [1, 5, 2, 16, 40, 5, 3, 17, 1]:
        a = r.standard_normal((m, 512)).astype(np.float32)
        y1, y2 = (s.run(None, {"a": a})[0] for s in sessions)
        exact = a.astype(np.float64) @ w
        bound = bf16_bound(a, w, 512) if precision == "bf16" else int8_bound(a, w)
        assert_within(y2, exact, bound, f"{precision}, {m} rows")
        np.testing.assert_array_equal(y1, y2, err_msg=f"{precision}, {m} rows: 1 thread vs 2")


@pytest.mark.parametrize("step", ["upload", "run", "timeout", "result"])
def test_backend_fault_falls_back_to_cpu_with_logged_reason(step, capfd, tmp_path):
    model, w = linear_model(k=64, n=72, seed=4)
    report = tmp_path / "report.jsonl"
    sess = xdna_session(model, {"fault_inject": step, "backend": "emulator", "partition_report": str(report)})
    assert ep_nodes(sess) == [("mm", "MatMul")]
    for m in (3, 17):  # the first call faults (or the upload did), later calls stay on the CPU path
        a = rng(m).standard_normal((m, 64)).astype(np.float32)
        assert_within(sess.run(None, {"a": a})[0], a.astype(np.float64) @ w, bf16_bound(a, w, 64), step)
    del sess
    err = capfd.readouterr().err
    assert err.count(f"fault ({step}: injected fault") == 1  # logged once, with its reason
    assert "now runs on the CPU" in err
    (node,) = executed(report)  # the fault fired on the first product and the fallback ran both
    assert node["device_calls"] == 0 and node["cpu_calls_by_reason"] == {"not_for_device": 0, "unpacked": 0,
                                                                          "fault": 2}


def test_fault_in_dynamic_operand_path(tmp_path, capfd):
    b_shape = (1, 2, 16, 20)
    a = rng(8).standard_normal((1, 2, 20, 16)).astype(np.float32)
    b = rng(9).standard_normal(b_shape).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["a", "b"], ["y"], name="qk")],
        [tensor("a", list(a.shape)), tensor("b", list(b_shape))],
        [tensor("y", [1, 2, 20, 20])],
    )
    report = tmp_path / "report.jsonl"
    sess = xdna_session(model, {"fault_inject": "run", "backend": "emulator", "partition_report": str(report)})
    out = sess.run(None, {"a": a, "b": b})[0]
    assert_within(out, np.matmul(a.astype(np.float64), b), bf16_bound(a, b, 16))
    del sess
    assert "fault (run: injected fault" in capfd.readouterr().err
    (node,) = executed(report)  # 20 rows per head: both heads packed, the batch faulted, both ran on the CPU
    assert node["device_calls"] == 0 and node["cpu_calls_by_reason"]["fault"] == 2


def test_each_reason_for_the_cpu_is_logged_on_its_own(tmp_path, capfd):
    # a decoder step: one row against a run-time B is read unpacked, on purpose; never called a fault
    a = rng(1).standard_normal((1, 2, 1, 16)).astype(np.float32)
    b = rng(2).standard_normal((1, 2, 16, 20)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["a", "b"], ["y"], name="step")],
                       [tensor("a", list(a.shape)), tensor("b", list(b.shape))], [tensor("y", [1, 2, 1, 20])])
    report = tmp_path / "report.jsonl"
    so = ort.SessionOptions()
    so.log_severity_level = 1  # ORT filters our INFO lines otherwise
    sess = xdna_session(model, {"backend": "emulator", "log_level": "info", "partition_report": str(report)}, so=so)
    assert_within(sess.run(None, {"a": a, "b": b})[0], np.matmul(a.astype(np.float64), b), bf16_bound(a, b, 16))
    del sess
    err = capfd.readouterr().err
    assert "read unpacked, on purpose" in err and "fault (" not in err and "does not take" not in err
    (node,) = executed(report)
    assert node["cpu_calls_by_reason"] == {"not_for_device": 0, "unpacked": 2, "fault": 0}


def test_one_version_everywhere():
    from importlib import metadata

    from onnxruntime_ep_xdna import _native

    assert xdna.__version__ == metadata.version("onnxruntime-ep-xdna") == _native.VERSION


def test_min_mflop_leaves_small_nodes_on_cpu():
    r = rng(7)
    w_small = r.standard_normal((8, 8)).astype(np.float32)
    w_big = r.standard_normal((8, 512)).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["a", "ws"], ["h"], name="small"),
         helper.make_node("MatMul", ["h", "wb"], ["y"], name="big")],
        [tensor("a", [64, 8])], [tensor("y", [64, 512])], [init("ws", w_small), init("wb", w_big)],
    )
    # small: 2*64*8*8 = 8192 FLOP; big: 2*64*8*512 = 524288 FLOP
    sess = xdna_session(model, {"min_mflop": "0.1"})
    assert ep_nodes(sess) == [("big", "MatMul")]
    a = r.standard_normal((64, 8)).astype(np.float32)
    h = np.matmul(a.astype(np.float64), w_small)
    assert_within(sess.run(None, {"a": a})[0], h @ w_big, bf16_bound(h, w_big, 8) + 1e-5 * np.abs(h) @ np.abs(w_big))


def test_placement_requires_recording():
    model, _ = linear_model()
    xdna.register()
    sess = ort.InferenceSession(model, providers=[EP, "CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match="no placement recorded"):
        xdna.placement(sess)


def test_partition_report_names_reasons_and_flop_share(tmp_path):
    from onnx import TensorProto

    w = rng(1).standard_normal((32, 64)).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["a", "w"], ["h"], name="proj"),
         helper.make_node("Cast", ["h"], ["hd"], to=TensorProto.DOUBLE),
         helper.make_node("MatMul", ["hd", "wd"], ["y"], name="double_mm")],
        [tensor("a", [100, 32])], [tensor("y", [100, 4], TensorProto.DOUBLE)],
        [init("w", w), init("wd", np.ones((64, 4)))],
    )
    path = tmp_path / "m.onnx"
    path.write_bytes(model)
    report = xdna.partition(path)
    by_name = {d.node: d for d in report.decisions}
    assert by_name["proj"].placed_on == EP and by_name["proj"].claimed
    assert by_name["double_mm"].placed_on == "CPUExecutionProvider"
    assert "float64" in by_name["double_mm"].reason
    assert by_name["proj"].mflop == pytest.approx(2 * 100 * 32 * 64 / 1e6)
    assert report.ep_share == pytest.approx(by_name["proj"].mflop / (by_name["proj"].mflop + by_name["double_mm"].mflop))
    table = report.table()
    assert "double_mm" in table and "CPU: A is float64" in table


def test_cli_info_and_partition(tmp_path, capsys):
    from onnxruntime_ep_xdna import cli

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "registered         True" in out
    assert "backend (auto)" in out and "/dev/accel" in out
    model, _ = linear_model()
    path = tmp_path / "m.onnx"
    path.write_bytes(model)
    assert cli.main(["partition", str(path)]) == 0
    assert "1/1 MatMul/Gemm/Conv nodes on XDNAExecutionProvider" in capsys.readouterr().out
    assert cli.main(["partition", str(tmp_path / "missing.onnx")]) == 1
    assert "error" in capsys.readouterr().err


def test_partition_run_counts_executed_flops_for_symbolic_dims(tmp_path):
    model, _ = linear_model(k=48, n=40)  # a: ["batch", 48]
    path = tmp_path / "m.onnx"
    path.write_bytes(model)
    static = xdna.partition(path).decisions[0]
    assert static.mflop_lower_bound and static.mflop == pytest.approx(2 * 48 * 40 / 1e6)
    ran = xdna.partition(path, run=True, dims={"batch": 100}).decisions[0]
    assert not ran.mflop_lower_bound
    assert ran.mflop == pytest.approx(2 * 100 * 48 * 40 / 1e6)
    assert ran.executed["device_calls"] + ran.executed["cpu_calls"] == 1


@pytest.mark.parametrize("spinning,threads_option,limited", [(None, None, True), ("1", None, True),
                                                             ("0", None, False), (None, "2", True)])
def test_spinning_ort_threads_are_named_in_the_log(capfd, spinning, threads_option, limited):
    # ORT's spinning intra-op workers hold cores the emulator could use; the EP log says how to avoid it.
    model, w = linear_model()
    xdna.register()
    so = ort.SessionOptions()
    if spinning is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    options = {"log_level": "info"}
    if threads_option:
        options["threads"] = threads_option
    sess = ort.InferenceSession(model, so, providers=[(EP, options), "CPUExecutionProvider"])
    a = rng(3).standard_normal((5, 48)).astype(np.float32)
    assert_within(sess.run(None, {"a": a})[0], a.astype(np.float64) @ w, bf16_bound(a, w, 48))
    assert ("ORT intra-op spinning is on" in capfd.readouterr().err) == limited


def test_session_options_turn_spinning_off():
    so = xdna.session_options()
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert so.get_session_config_entry("session.record_ep_graph_assignment_info") == "1"
    with pytest.raises(RuntimeError):  # spinning=True leaves ORT's default (no entry at all)
        xdna.session_options(spinning=True).get_session_config_entry("session.intra_op.allow_spinning")


def policy_model():
    """Three products: a constant-weight MatMul, an attention-like MatMul with B at run time, and a Gemm."""
    r = rng(11)
    w1 = r.standard_normal((48, 40)).astype(np.float32)
    w2 = r.standard_normal((40, 24)).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["a", "w1"], ["h"], name="enc/fc1"),
         helper.make_node("MatMul", ["h", "kt"], ["s"], name="enc/attn_qk"),
         helper.make_node("Gemm", ["h", "w2"], ["y"], name="proj_out")],
        [tensor("a", [20, 48]), tensor("kt", [40, 30])], [tensor("s", [20, 30]), tensor("y", [20, 24])],
        [init("w1", w1), init("w2", w2)])
    return model, w1, w2


@pytest.mark.parametrize("options,expected", [
    ({}, {"enc/fc1": "bf16", "enc/attn_qk": "bf16", "proj_out": "bf16"}),
    ({"precision": "int8"}, {"enc/fc1": "int8", "enc/attn_qk": "bf16", "proj_out": "int8"}),
    ({"precision": "bf16x3"}, {"enc/fc1": "bf16x3", "enc/attn_qk": "bf16x3", "proj_out": "bf16x3"}),
    # first matching rule wins; unmatched nodes get `precision`
    ({"precision": "bf16x3", "precision_policy": "bf16:name=proj_*;int8:weight=constant"},
     {"enc/fc1": "int8", "enc/attn_qk": "bf16x3", "proj_out": "bf16"}),
    ({"precision_policy": "bf16x3:op=Gemm ; int8:op=MatMul,name=enc/*"},
     {"enc/fc1": "int8", "enc/attn_qk": "bf16", "proj_out": "bf16x3"}),  # int8 with a run-time B: bf16
])
def test_precision_policy_per_node_numerics_and_report(options, expected, tmp_path):
    model, w1, w2 = policy_model()
    path = tmp_path / "m.onnx"
    path.write_bytes(model)
    report = xdna.partition(path, {"backend": "emulator", **options})
    got = {d.node: d.precision for d in report.decisions}
    assert got == expected
    notes = {d.node: d.precision_note for d in report.decisions}
    if options.get("precision") == "int8" or "int8:op=MatMul" in options.get("precision_policy", ""):
        assert "run time" in notes["enc/attn_qk"] and "bf16" in notes["enc/attn_qk"]
        assert "int8 asked: run-time B stays bf16" in report.table()
    assert "precision of the EP's nodes" in report.table()

    r = rng(12)
    a = r.standard_normal((20, 48)).astype(np.float32)
    kt = r.standard_normal((40, 30)).astype(np.float32)
    sess = xdna_session(model, {"backend": "emulator", **options})
    s, y = sess.run(None, {"a": a, "kt": kt})
    bound = {"bf16": lambda x, b: bf16_bound(x, b, x.shape[-1]), "int8": int8_bound,
             "bf16x3": lambda x, b: bf16x3_bound(x, b, x.shape[-1])}
    # each node within its own mode's bound: h recomputed in fc1's mode by a one-node session, then its consumers
    h_mode = expected["enc/fc1"]
    one = xdna_session(make_model(
        [helper.make_node("MatMul", ["a", "w1"], ["h"], name="enc/fc1")], [tensor("a", [20, 48])],
        [tensor("h", [20, 40])], [init("w1", w1)]), {"backend": "emulator", "precision": h_mode})
    h = one.run(None, {"a": a})[0]
    assert_within(h, a.astype(np.float64) @ w1, bound[h_mode](a, w1), "enc/fc1")
    assert_within(s, h.astype(np.float64) @ kt, bound[expected["enc/attn_qk"]](h, kt), "enc/attn_qk")
    assert_within(y, h.astype(np.float64) @ w2, bound[expected["proj_out"]](h, w2), "proj_out")


def test_device_declines_int8_and_the_cpu_runs_it_in_int8(tmp_path, capfd, monkeypatch):
    """The xrt backend (fake device) has no int8 kernel: the node runs on the CPU fallback in int8 (never silently
    bf16), logged once per node as not for the device; bf16 nodes of the same session still reach the device."""
    from test_xrt_backend import write_kernel_dir

    monkeypatch.setenv("XDNA_XRT_SHIM", "fake")
    monkeypatch.setenv("XDNA_XRT_COST_MODEL", "0")
    kernel_dir = write_kernel_dir(tmp_path / "kernels", [(64, 256, 256)])
    r = rng(13)
    w1 = r.standard_normal((48, 40)).astype(np.float32)
    w2 = r.standard_normal((40, 24)).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["a", "w1"], ["h"], name="q8"), helper.make_node("MatMul", ["h", "w2"], ["y"], name="b16")],
        [tensor("a", [30, 48])], [tensor("y", [30, 24])], [init("w1", w1), init("w2", w2)])
    report = tmp_path / "report.jsonl"
    so = ort.SessionOptions()
    so.log_severity_level = 1
    sess = xdna_session(model, {"backend": "xrt", "kernel_dir": str(kernel_dir), "log_level": "info",
                                "precision_policy": "int8:name=q8", "partition_report": str(report)}, so=so)
    a = r.standard_normal((30, 48)).astype(np.float32)
    for _ in range(2):
        y = sess.run(None, {"a": a})[0]
    h = np.asarray(xdna_session(make_model([helper.make_node("MatMul", ["a", "w1"], ["h"], name="q8")],
                                           [tensor("a", [30, 48])], [tensor("h", [30, 40])], [init("w1", w1)]),
                                {"backend": "emulator", "precision": "int8"}).run(None, {"a": a})[0])
    assert_within(h, a.astype(np.float64) @ w1, int8_bound(a, w1), "q8 in int8")
    assert_within(y, h.astype(np.float64) @ w2, bf16_bound(h, w2, 40), "b16 in bf16 on the device")
    del sess
    err = capfd.readouterr().err
    assert err.count("node 'q8': xrt runs no int8 products (declined: no int8 (i8_f32) kernels in") == 1
    assert "computed on the CPU (same int8 arithmetic)" in err
    nodes = {d["node"]: d for d in executed(report)}
    assert nodes["q8"]["precision"] == "int8" and nodes["q8"]["device_calls"] == 0
    assert nodes["q8"]["cpu_calls_by_reason"] == {"not_for_device": 2, "unpacked": 0, "fault": 0}
    assert nodes["b16"]["precision"] == "bf16" and nodes["b16"]["device_calls"] == 2


@pytest.mark.parametrize("fault", ["", "run"])
def test_device_runs_int8_with_an_int8_kernel_bit_identical_to_the_emulator(tmp_path, capfd, monkeypatch, fault):
    """With an i8_f32 kernel for the node's shape the int8 node runs on the (fake) device, with the emulator's int8
    bits; a device fault puts it on the CPU in int8 (same bits), logged."""
    from test_xrt_int8 import write_kernel_dir

    monkeypatch.setenv("XDNA_XRT_SHIM", "fake")
    monkeypatch.setenv("XDNA_XRT_COST_MODEL", "0")
    monkeypatch.setenv("XDNA_XRT_FAKE_FAULT", fault)
    kernel_dir = write_kernel_dir(tmp_path / "kernels", bf16=[(64, 256, 256)], int8=[(64, 256, 256)])
    r = rng(14)
    w1 = r.standard_normal((48, 40)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["a", "w1"], ["h"], name="q8")], [tensor("a", [30, 48])],
                       [tensor("h", [30, 40])], [init("w1", w1)])
    report = tmp_path / "report.jsonl"
    so = ort.SessionOptions()
    so.log_severity_level = 1
    sess = xdna_session(model, {"backend": "xrt", "kernel_dir": str(kernel_dir), "log_level": "info",
                                "precision": "int8", "partition_report": str(report)}, so=so)
    a = r.standard_normal((30, 48)).astype(np.float32)
    ys = [sess.run(None, {"a": a})[0] for _ in range(2)]
    want = np.asarray(xdna_session(model, {"backend": "emulator", "precision": "int8"}).run(None, {"a": a})[0])
    for y in ys:
        np.testing.assert_array_equal(y, want)
    assert_within(want, a.astype(np.float64) @ w1, int8_bound(a, w1), "q8 in int8")
    del sess
    err = capfd.readouterr().err
    (node,) = [d for d in executed(report) if d["node"] == "q8"]
    assert node["precision"] == "int8"
    if not fault:
        assert node["device_calls"] == 2 and node["cpu_calls_by_reason"]["not_for_device"] == 0
    else:
        assert node["device_calls"] == 0 and node["cpu_calls_by_reason"]["fault"] == 2
        assert "node 'q8': backend 'xrt' fault" in err and "same int8 arithmetic" in err
