"""Issue 15, step 1: NPU buffers owned by the EP (kernels/ep_buffers.h, ep_plugin/ep_allocator.h).

A tensor in the EP's own memory is imported once per block (pinned once) and each run gets a sub-buffer of it; ORT's
memory is imported (pinned) per call. The fake device keeps host and device copies apart, so the cache maintenance
each run still needs is checked by the numbers. What ORT 1.32 places in the EP's memory is checked by running it
(docs/npu.md, "NPU buffers owned by the EP"). Model figures are a model, not measurements."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from numerics import assert_same_gemm, rand
from onnxruntime_ep_xdna import _native as nat
from test_xrt_dataflow import kernel_dir


@pytest.fixture(autouse=True)
def _no_cost_model(monkeypatch):
    monkeypatch.setenv("XDNA_XRT_COST_MODEL", "0")


@pytest.fixture
def f32_dir(tmp_path):
    return kernel_dir(tmp_path / "k", [(512, 512, 1500, "f32_f32"), (512, 512, 256, "f32_f32")])


def ep_array(values: np.ndarray) -> np.ndarray:
    out = nat.ep_buffer_array(*values.shape)
    out[...] = values
    return out


def test_ep_memory_is_pinned_once_and_synced_every_call(f32_dir):
    be = nat.npu_fake_backend(str(f32_dir))
    b = rand((512, 512), 1)
    packed = nat.pack_b(b)
    w = be.upload(packed)
    a, c = ep_array(rand((1500, 512), 2)), nat.ep_buffer_array(1500, 512)
    start = be.fake_stats()
    for call in range(3):
        a[...] = rand((1500, 512), 10 + call)  # new values each call: a run without cache maintenance reads stale ones
        be.gemm_into(a, w, c)
        assert_same_gemm(c, nat.emulator_gemm(a, packed), a, b)
        np.testing.assert_array_equal(c, nat.emulator_gemm(a, packed))
    s = be.fake_stats()
    assert s["imports"] - start["imports"] == 2, "A's and C's blocks imported once, not per call"
    assert s["sub_buffers"] - start["sub_buffers"] == 6, "each call gets views of the blocks"
    assert s["a_buffers"] == start["a_buffers"] and s["c_buffers"] == start["c_buffers"], "nothing staged"
    assert s["submissions"] - start["submissions"] == 3

    # ORT's own memory (a numpy array here): imported, i.e. pinned, on every call, as before.
    a_host = rand((1500, 512), 3)
    before = be.fake_stats()
    for _ in range(2):
        np.testing.assert_array_equal(be.gemm(a_host, w), nat.emulator_gemm(a_host, packed))
    assert be.fake_stats()["imports"] - before["imports"] == 4


def test_a_tensor_inside_a_block_gets_a_view_at_its_offset(f32_dir):
    """Rows 256.. of a block: the view starts at the tensor, not at the block."""
    be = nat.npu_fake_backend(str(f32_dir))
    b = rand((512, 512), 4)
    packed = nat.pack_b(b)
    w = be.upload(packed)
    whole_a, whole_c = ep_array(rand((1756, 512), 5)), nat.ep_buffer_array(1756, 512)
    whole_c[...] = 7.0
    a, c = whole_a[256:], whole_c[256:]
    be.gemm_into(a, w, c)
    np.testing.assert_array_equal(c, nat.emulator_gemm(np.ascontiguousarray(a), packed))
    assert np.all(whole_c[:256] == 7.0), "nothing outside the tensor written"
    assert be.fake_stats()["sub_buffers"] == 2


def test_pooled_block_keeps_its_import_and_a_released_block_is_imported_again(f32_dir):
    """The registry tells the backend before a block goes back to the system, so a cached import never outlives
    the memory it covers; a block ORT frees stays in the pool (and pinned) for the next run."""
    be = nat.npu_fake_backend(str(f32_dir))
    b = rand((512, 512), 6)
    packed = nat.pack_b(b)
    w = be.upload(packed)
    nat.ep_buffer_trim()
    a, c = ep_array(rand((1500, 512), 7)), nat.ep_buffer_array(1500, 512)
    be.gemm_into(a, w, c)
    imports = be.fake_stats()["imports"]
    fresh = nat.ep_buffer_stats()["fresh_blocks"]
    del a, c  # ORT frees the tensors: the blocks go to the pool
    a, c = ep_array(rand((1500, 512), 8)), nat.ep_buffer_array(1500, 512)
    assert nat.ep_buffer_stats()["fresh_blocks"] == fresh, "the next run's tensors reuse the pooled blocks"
    be.gemm_into(a, w, c)
    np.testing.assert_array_equal(c, nat.emulator_gemm(a, packed))
    assert be.fake_stats()["imports"] == imports, "pooled blocks keep their import"

    del a, c
    released = nat.ep_buffer_stats()["released_blocks"]
    nat.ep_buffer_trim()  # back to the system: the backend drops its buffers over them first
    assert nat.ep_buffer_stats()["released_blocks"] == released + 2
    a, c = ep_array(rand((1500, 512), 9)), nat.ep_buffer_array(1500, 512)
    be.gemm_into(a, w, c)
    np.testing.assert_array_equal(c, nat.emulator_gemm(a, packed))
    assert be.fake_stats()["imports"] == imports + 2, "new blocks (even at a reused address) are imported anew"


def test_ep_memory_faults_and_refusals(f32_dir):
    b = rand((512, 512), 11)
    packed = nat.pack_b(b)
    a, c = ep_array(rand((1500, 512), 12)), nat.ep_buffer_array(1500, 512)
    refusing = nat.npu_fake_backend(str(f32_dir), fail_at="import")  # no user-pointer BOs: staged
    refusing.gemm_into(a, refusing.upload(packed), c)
    np.testing.assert_array_equal(c, nat.emulator_gemm(a, packed))
    assert refusing.fake_stats()["a_buffers"] == 1 and refusing.fake_stats()["sub_buffers"] == 0
    for fail_at, step in [("timeout", "timeout"), ("result", "result"), ("run_state", "run")]:
        be = nat.npu_fake_backend(str(f32_dir), fail_at=fail_at, timeout_ms=50)
        with pytest.raises(nat.BackendFault) as e:
            be.gemm_into(a, be.upload(packed), c)
        assert e.value.step == step, str(e.value)


def test_model_charges_pinning_only_for_ort_memory():
    base = nat.npu_model(1500, 512, 512)
    ep_a = nat.npu_model(1500, 512, 512, a_ep_memory=True)
    ep_both = nat.npu_model(1500, 512, 512, a_ep_memory=True, c_ep_memory=True)
    pin_us = 1500 * 512 * 4 / (40 * 1e3)  # one operand at pin_gbps
    assert base["host_us"] - ep_a["host_us"] == pytest.approx(pin_us)
    assert base["host_us"] - ep_both["host_us"] == pytest.approx(2 * pin_us)
    assert "ORT's memory: pinned per call" in base["dataflow"]
    assert "A in place (fp32, RNE in core) (EP memory: pinned once)" in ep_a["dataflow"]
    att = nat.npu_model_attention(8, 1500, 1500, 64)
    att_ep = nat.npu_model_attention(8, 1500, 1500, 64, io_ep_memory=True)
    assert att_ep["host_us"] < att["host_us"] and "EP memory" in att_ep["dataflow"]


def _chain_model(path):
    """x -> MatMul -> Relu (CPU) -> MatMul -> MatMul -> y: graph input, CPU->EP, EP->EP and EP->CPU edges."""
    r = np.random.default_rng(0)
    w = [numpy_helper.from_array((r.standard_normal((512, 512)) * 0.05).astype(np.float32), f"w{i}") for i in (1, 2, 3)]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm1"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu"),
             helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="mm2"),
             helper.make_node("MatMul", ["h2", "w3"], ["y"], name="mm3")]
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1500, 512])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1500, 512])], w)
    import onnx

    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)


_PROBE = r"""
import json, sys, numpy as np, onnxruntime as ort
from onnxruntime_ep_xdna import partition
rep = partition(sys.argv[1], run=True)
print(json.dumps({d.node: d.executed.get("ep_buffers") for d in rep.decisions if d.executed}))
"""


@pytest.mark.parametrize("mode", ["off", "host", "device"])
def test_what_ort_places_in_the_ep_memory(tmp_path, mode):
    """Run in ORT (a fresh process: the factory reads XDNA_EP_ALLOCATOR once). What it shows, per mode, is what
    docs/npu.md records: off/host: only the EP's own intermediates (mm2 -> mm3 inside one fused node); device: also
    the graph input and every fused-node output, while the copy ORT makes for a CPU -> EP edge (Relu -> mm2) is
    not in the EP's memory."""
    _chain_model(tmp_path / "m.onnx")
    env = dict(os.environ, XDNA_EP_ALLOCATOR=mode)
    out = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path / "m.onnx")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    # [products with A in EP memory, with C in EP memory, products]
    if mode == "device":
        assert got == {"mm1": [1, 1, 1], "mm2": [0, 1, 1], "mm3": [1, 1, 1]}, got
    else:
        assert got == {"mm1": [0, 0, 1], "mm2": [0, 1, 1], "mm3": [1, 0, 1]}, got


@pytest.mark.parametrize("mode", ["off", "device"])
def test_ep_memory_modes_give_the_cpu_ep_numbers(tmp_path, mode):
    _chain_model(tmp_path / "m.onnx")
    script = r"""
import sys, numpy as np, onnxruntime as ort, onnxruntime_ep_xdna as xdna
xdna.register()
x = np.random.default_rng(1).standard_normal((1500, 512)).astype(np.float32)
s = ort.InferenceSession(sys.argv[1], xdna.session_options(), providers=["XDNAExecutionProvider", "CPUExecutionProvider"])
ys = [s.run(None, {"x": x})[0] for _ in range(3)]
ref = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
np.save(sys.argv[2], np.stack(ys + [ref, x]))
print(xdna.placement(s).summary())
"""
    env = dict(os.environ, XDNA_EP_ALLOCATOR=mode)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "m.onnx"), str(tmp_path / "y.npy")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "XDNAExecutionProvider: 3 nodes" in out.stdout, out.stdout
    *ys, ref, x = np.load(tmp_path / "y.npy")
    for y in ys[1:]:
        np.testing.assert_array_equal(y, ys[0])  # pooled blocks reused run after run: same numbers
    # three bf16 GEMMs in a row: compare with the CPU EP loosely here; the per-GEMM bounds are tested elsewhere
    assert np.abs(ys[0] - ref).max() <= 0.05 * np.abs(ref).max()


# ---- step 4: consecutive products of one fused node in one runlist ----

def _qkv_model(path, k=64, n=256, m=256):
    """x -> Relu (CPU) -> three MatMuls (q/k/v-like: one input, one weight shape) -> three Relus (CPU)."""
    import onnx

    r = np.random.default_rng(3)
    ws = [numpy_helper.from_array((r.standard_normal((k, n)) * 0.1).astype(np.float32), f"w{i}") for i in range(3)]
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="ln")]
    outs = []
    for i in range(3):
        nodes += [helper.make_node("MatMul", ["h", f"w{i}"], [f"p{i}"], name=f"proj{i}"),
                  helper.make_node("Relu", [f"p{i}"], [f"y{i}"], name=f"act{i}")]
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [m, n]))
    g = helper.make_graph(nodes, "qkv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])], outs, ws)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)
    return [numpy_helper.to_array(w) for w in ws]


@pytest.mark.parametrize("fault", ["", "run_state"])
def test_fused_node_sends_its_projections_as_one_runlist(tmp_path, monkeypatch, fault):
    """Three MatMuls of one fused node on one weight shape (one xclbin, one hardware context): the first product's
    submission carries the other two (chained_calls), the numbers are the contract's; a device fault recomputes
    all three on the CPU path."""
    import onnxruntime as ort

    from numerics import assert_within, bf16_bound
    from onnxruntime_ep_xdna import partition, register, session_options

    ws = _qkv_model(tmp_path / "m.onnx")
    kdir = kernel_dir(tmp_path / "k", [(64, 256, 256, "f32_f32")])
    monkeypatch.setenv("XDNA_XRT_SHIM", "fake")
    if fault:
        monkeypatch.setenv("XDNA_XRT_FAKE_FAULT", fault)
    else:
        monkeypatch.delenv("XDNA_XRT_FAKE_FAULT", raising=False)
    opts = {"backend": "xrt", "kernel_dir": str(kdir)}
    report = partition(tmp_path / "m.onnx", opts, run=True)
    ex = {d.node: d.executed for d in report.decisions if d.executed}
    assert set(ex) == {"proj0", "proj1", "proj2"}
    if fault:
        assert all(e["device_calls"] == 0 and e["cpu_calls_by_reason"]["fault"] == 1 for e in ex.values()), ex
    else:
        assert sorted(e["chained_calls"] for e in ex.values()) == [0, 1, 1], ex
        assert sorted(e["a_shared_calls"] for e in ex.values()) == [0, 1, 1], ex  # one input: one A import
        assert all(e["device_calls"] == 1 and e["cpu_calls"] == 0 for e in ex.values()), ex

    register()
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), session_options(),
                                providers=[("XDNAExecutionProvider", opts), "CPUExecutionProvider"])
    x = np.random.default_rng(4).standard_normal((256, 64)).astype(np.float32)
    ys = sess.run(None, {"x": x})
    h = np.maximum(x, 0).astype(np.float64)
    for i, (y, w) in enumerate(zip(ys, ws)):
        # Relu is 1-Lipschitz: Relu(C) is within C's bound of Relu(A.B)
        assert_within(y, np.maximum(h @ w, 0), bf16_bound(h.astype(np.float32), w, 64), f"p{i}")


def test_model_charges_a_chained_node_no_submission():
    alone = nat.npu_model(1500, 512, 512)
    chained = nat.npu_model(1500, 512, 512, chained=True)
    assert alone["dispatch_us"] == pytest.approx(160) and chained["dispatch_us"] == pytest.approx(42)
    assert alone["npu_us"] - chained["npu_us"] == pytest.approx(118)
    assert "in an earlier node's runlist" in chained["dataflow"]


def test_runlist_imports_a_shared_a_once(f32_dir):
    """Three products of one A in one submission (the q/k/v projections): A imported and synced once."""
    be = nat.npu_fake_backend(str(f32_dir))
    a = rand((1500, 512), 21)
    bs = [rand((512, 512), 22 + i) for i in range(3)]
    items = [(a, be.upload(nat.pack_b(b))) for b in bs]
    cs = be.gemm_batch(items)
    s = be.fake_stats()
    assert s["submissions"] == 1 and s["runs"] == 3
    assert s["imports"] == 1 + 3, "one A, three C"
    for b, c in zip(bs, cs):
        np.testing.assert_array_equal(c, nat.emulator_gemm(a, nat.pack_b(b)))


def test_model_charges_a_shared_a_once():
    chained = nat.npu_model(1500, 512, 512, chained=True)
    shared = nat.npu_model(1500, 512, 512, chained=True, a_shared=True)
    a_bytes = 1500 * 512 * 4
    assert chained["host_us"] - shared["host_us"] == pytest.approx(a_bytes / 40e3 + a_bytes / 40e3 + 10)
    assert "shared with an earlier command of the runlist" in shared["dataflow"]
