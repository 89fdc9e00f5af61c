"""Issue 15: the redesigned NPU dataflow against the fake device (ORT's buffers imported in place, fp32 A converted
in the core, one submission per call, exact kernel heights) and the dataflow model behind
`xdna partition --npu-model`. Model figures are a model, not measurements; the tests check the model's
arithmetic and decisions, not its accuracy."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from numerics import assert_same_gemm, rand
from onnx import TensorProto, helper, numpy_helper

from onnxruntime_ep_xdna import _native as nat


@pytest.fixture(autouse=True)
def _no_cost_model(monkeypatch):
    monkeypatch.setenv("XDNA_XRT_COST_MODEL", "0")


def kernel_dir(root: Path, kernels) -> Path:
    """kernels = [(Kpad, Npad, m_rows, dtype)]; dtype f32_f32 = fp32 A converted in the core."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for K, N, m_rows, dtype in kernels:
        insts = f"gemm_k{K}_n{N}_m{m_rows}_{dtype}.insts.bin"
        (root / f"gemm_k{K}.xclbin").write_bytes(b"fake xclbin")
        nat.npu_fake_insts(m_rows, K, N, dtype == "f32_f32").astype("<u4").tofile(root / insts)
        entries.append({"K": K, "N": N, "m_rows": m_rows, "dtype": dtype, "xclbin": f"gemm_k{K}.xclbin",
                        "insts": insts, "kernel": "MLIR_AIE"})
    (root / "manifest.json").write_text(json.dumps(
        {"format": "onnxruntime-ep-xdna-kernels", "contract_version": 1, "tile": {"m": 64, "k": 64, "n": 64},
         "array": {"rows": 4, "cols": 4}, "device": "npu1", "kernels": entries}))
    return root


@pytest.fixture
def f32_dir(tmp_path):
    # Whisper-base encoder shapes with an exact-height kernel (1500 rows, one run per 30 s window) and 256 rows.
    return kernel_dir(tmp_path / "k", [(512, 512, 1500, "f32_f32"), (512, 512, 256, "f32_f32"),
                                       (512, 2048, 1500, "f32_f32"), (128, 512, 256, "f32_f32")])


def test_exact_height_plans_one_run():
    assert nat.npu_plan_row_chunks(1500, [1500, 256]) == [1500]
    assert nat.npu_plan_row_chunks(1501, [1500, 256]) == [1500, 256]
    assert nat.npu_plan_row_chunks(3000, [1500]) == [1500, 1500]
    assert nat.npu_plan_row_chunks(100, [1500, 256]) == [256]
    assert nat.npu_plan_row_chunks(1500, [256, 1024]) == [1024, 256, 256]  # block heights: as before


@pytest.mark.parametrize("M,N", [(1500, 512), (1500, 2048), (3000, 512)])
def test_in_place_runs_read_a_and_write_c_without_staging(f32_dir, M, N):
    be = nat.npu_fake_backend(str(f32_dir))
    a, b = rand((M, 512), 1), rand((512, N), 2)
    packed = nat.pack_b(b)
    w = be.upload(packed)
    before = be.fake_stats()
    c = be.gemm(a, w)
    s = be.fake_stats()
    runs = M // 1500
    assert s["runs"] - before["runs"] == runs
    assert s["submissions"] - before["submissions"] == 1, "all runs of a call go in one submission"
    assert s["imports"] - before["imports"] == 2 * runs, "A and C imported, one pair per run"
    assert s["a_buffers"] == before["a_buffers"] and s["c_buffers"] == before["c_buffers"], "nothing staged"
    assert_same_gemm(c, nat.emulator_gemm(a, packed), a, b)


def test_tail_and_refused_import_are_staged(f32_dir, tmp_path):
    be = nat.npu_fake_backend(str(f32_dir))
    a, b = rand((1400, 512), 3), rand((512, 512), 4)
    packed = nat.pack_b(b)
    w = be.upload(packed)
    c = be.gemm(a, w)  # 1400 rows on the 1500-row kernel: rows past M would be read, so this run is staged
    s = be.fake_stats()
    assert s["imports"] == 0 and s["a_buffers"] == 1 and s["submissions"] == 1
    assert_same_gemm(c, nat.emulator_gemm(a, packed), a, b)

    refusing = nat.npu_fake_backend(str(f32_dir), fail_at="import")
    a = rand((1500, 512), 5)
    c = refusing.gemm(a, refusing.upload(packed))
    assert refusing.fake_stats()["imports"] == 0 and refusing.fake_stats()["a_buffers"] == 1
    assert_same_gemm(c, nat.emulator_gemm(a, packed), a, b)


def test_in_core_conversion_matches_host_rne_bit_for_bit(tmp_path):
    """fp32 A straight into the kernel, rounded in the core: the same numbers as the contract's host rounding.
    A is made of values halfway (and just off halfway) between bf16 neighbours, where round-toward-minus-infinity
    (the AIE's default) and truncation give other results than round-to-nearest-even."""
    d = kernel_dir(tmp_path / "k", [(64, 256, 256, "f32_f32")])
    be = nat.npu_fake_backend(str(d))
    rng = np.random.default_rng(6)
    hi = rng.integers(0x3F00, 0x4100, (256, 64)).astype(np.uint32) << 16
    low = rng.choice(np.array([0x8000, 0x7FFF, 0x8001, 0x0001, 0xFFFF], np.uint32), (256, 64))
    sign = rng.choice(np.array([0, 0x80000000], np.uint32), (256, 64))
    a = (hi | low | sign).view(np.float32)
    b = np.eye(64, 256, dtype=np.float32)  # C = bf16(A) padded: every product exact, one term per sum
    c = be.gemm(a, be.upload(nat.pack_b(b)))
    assert be.fake_stats()["imports"] == 2
    u = a.view(np.uint32).astype(np.uint64)
    rne = ((((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32)).view(np.float32)
    np.testing.assert_array_equal(c[:, :64], rne)
    floor = ((np.where(sign != 0, u + 0xFFFF, u) >> 16) << 16).astype(np.uint32).view(np.float32)
    assert np.any(rne != floor), "the data must tell RNE from the AIE's default rounding"
    np.testing.assert_array_equal(c, nat.emulator_gemm(a, nat.pack_b(b)))


@pytest.mark.parametrize("fail_at,step", [("result", "result"), ("timeout", "timeout"), ("run_state", "run"),
                                          ("run", "run")])
def test_in_place_faults_map_to_steps(f32_dir, fail_at, step):
    be = nat.npu_fake_backend(str(f32_dir), fail_at=fail_at, timeout_ms=50)
    w = be.upload(nat.pack_b(rand((512, 512), 7)))
    with pytest.raises(nat.BackendFault) as e:
        be.gemm(rand((1500, 512), 8), w)
    assert e.value.step == step, str(e.value)


def test_manifest_exact_heights_only_for_f32_kernels(tmp_path):
    d = kernel_dir(tmp_path / "k", [(512, 512, 1500, "bf16_f32"), (512, 512, 1500, "f32_f32")])
    probe = nat.xrt_probe(str(d))
    kernels = next(p for p in probe["pieces"] if p["name"] == "kernels")
    assert "1 kernel(s)" in kernels["detail"], kernels["detail"]


# ---- the dataflow model ----

WHISPER_BASE_ENCODER = [  # (count, work) per 30 s window, as the EP executes it
    (24, dict(M=1500, K=512, N=512)), (6, dict(M=1500, K=512, N=2048)), (6, dict(M=1500, K=2048, N=512)),
    (6, dict(M=1500, K=64, N=1500, batches=8, runtime_b=True)),
    (6, dict(M=1500, K=1500, N=64, batches=8, runtime_b=True)),
    (1, dict(M=3000, K=240, N=512, conv=True)), (1, dict(M=1500, K=1536, N=512, conv=True))]


def test_v1_model_reproduces_the_issue_figure():
    """The 'before' column is the old cost model's own prediction: 363 ms per encoder window (issue 15)."""
    total = sum(n * nat.npu_model(**w, dataflow="v1")["npu_us"] for n, w in WHISPER_BASE_ENCODER)
    assert abs(total / 1e3 - 363.1) < 0.5


def test_v2_node_parts_add_up_and_decide():
    r = nat.npu_model(1500, 512, 512)
    assert r["npu_us"] == pytest.approx(r["dispatch_us"] + r["host_us"] + max(r["dma_us"], r["compute_us"]))
    assert r["compute_us"] == pytest.approx(2 * 1536 * 512 * 512 / 2048e3)  # 50% of 16 x 128 MACs x 2 x 1 GHz
    assert r["commands"] == 1 and r["npu"] and "A in place" in r["dataflow"] and "C in place" in r["dataflow"]
    gemv = nat.npu_model(1, 512, 512)
    assert not gemv["npu"] and gemv["cpu_us"] < gemv["dispatch_us"]
    vocab = nat.npu_model(1, 512, 51865)
    assert not vocab["npu"] and "no kernel" in vocab["dataflow"]
    heads = nat.npu_model(1500, 64, 1500, batches=8, runtime_b=True)
    assert heads["commands"] == 8 and "8 cmds in 1 submission" in heads["dataflow"]
    assert "C staged" in heads["dataflow"] and "B packed" in heads["dataflow"], "copies: the model says why"
    conv = nat.npu_model(3000, 240, 512, conv=True)
    assert "im2col" in conv["dataflow"] and "pads A" in conv["dataflow"]


def test_fused_attention_beats_scores_through_ddr():
    fused = nat.npu_model_attention(8, 1500, 1500, 64)
    qk = nat.npu_model(1500, 64, 1500, batches=8, runtime_b=True)
    pv = nat.npu_model(1500, 1500, 64, batches=8, runtime_b=True)
    assert fused["commands"] == 1 and fused["npu"]
    best_unfused = min(qk["npu_us"], qk["cpu_us"]) + min(pv["npu_us"], pv["cpu_us"])
    assert fused["npu_us"] < best_unfused


def test_fused_attention_model_follows_the_design_and_says_where_it_runs():
    """The model charges attention_design.py's geometry (1500: 3 passes of 16 x 32 query rows, 47 key tiles) and
    says where attention runs and why: the encoder's self-attention on the array, a decoder step's cross-attention
    (1..5 query rows against 1500 keys) on the CPU (no kernel: the design is for self-attention; and a 160 us
    submission alone is above the CPU's time)."""
    enc = nat.npu_model_attention(8, 1500, 1500, 64)
    assert enc["npu"] and "3 passes of 16 x 32 query rows" in enc["dataflow"]
    flop = 4.0 * 8 * 1536 * 1504 * 64
    softmax_us = 8 * 1536 * 1504 * 0.5 / (16 * 1e3)
    assert enc["compute_us"] == pytest.approx(flop / (16 * 128 * 2 * 0.5 * 1e3) + softmax_us)
    kv_bytes = 3 * 8 * 2 * 1504 * 64 * 4
    assert enc["dma_us"] == pytest.approx((8 * 2 * 1536 * 64 * 4 + kv_bytes) / (20 * 1e3))
    for rows in (1, 5):
        dec = nat.npu_model_attention(8, rows, 1500, 64)
        assert not dec["npu"] and "cross-attention" in dec["dataflow"]
        assert dec["cpu_us"] < dec["dispatch_us"]
    short = nat.npu_model_attention(8, 20, 20, 64)
    assert not short["npu"] and "T < 32" in short["dataflow"]


def test_model_parameters_and_assumptions():
    slow, fast = nat.npu_model(1500, 512, 2048), nat.npu_model(1500, 512, 2048, params={"aie_ghz": 1.6})
    assert fast["compute_us"] == pytest.approx(slow["compute_us"] / 1.6)
    with pytest.raises(ValueError):
        nat.npu_model(1500, 512, 512, params={"no_such": 1.0})
    names = " ".join(a[0] for a in nat.npu_model_assumptions())
    for needed in ("AIE clock", "bf16 MACs", "submission", "chained command", "NPU DDR bandwidth", "memtile", "L1",
                   "XRT buffer import"):
        assert needed in names
    assert all(source for _, _, source in nat.npu_model_assumptions())


def _attention_model(path: Path):
    T, d = 300, 64
    wq = numpy_helper.from_array(rand((d, d), 9), "wq")
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"]),
             helper.make_node("Transpose", ["q"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["s"], name="qk"),
             helper.make_node("Mul", ["s", "scale"], ["s2"]),
             helper.make_node("Softmax", ["s2"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "q"], ["y"], name="pv")]
    scale = numpy_helper.from_array(np.array(0.125, np.float32), "scale")
    graph = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", d])], [wq, scale])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return T


def test_partition_npu_model_cli(tmp_path):
    T = _attention_model(tmp_path / "attn.onnx")
    r = subprocess.run([sys.executable, "-m", "onnxruntime_ep_xdna.cli", "partition", str(tmp_path / "attn.onnx"),
                        "--npu-model", "--dim", "b=1", "--dim", f"t={T}", "--npu-param", "submit_us=50"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "model assumptions" in out and "submission: 50 us" in out
    assert f"1x{T}x64x{T}" in out and "v2 fused attention" in out and "in the fused attention of 'pv'" in out
    last = out.strip().splitlines()[-1]
    m = re.fullmatch(r"modelled Phoenix time: ([\d.]+) ms \(NPU ([\d.]+) ms, CPU ([\d.]+) ms\)", last)
    assert m, last
    total, npu, cpu = map(float, m.groups())
    assert total == pytest.approx(npu + cpu, abs=0.11)
    assert "before (v1 dataflow" in out


# ---- batches: the heads of a product in one submission ----

def test_batch_is_one_submission_per_context(f32_dir):
    be = nat.npu_fake_backend(str(f32_dir))
    heads = [(rand((1500, 512), 20 + h), rand((512, 512), 30 + h)) for h in range(4)]
    items = [(a, be.upload(nat.pack_b(b))) for a, b in heads]
    before = be.fake_stats()
    cs = be.gemm_batch(items)
    s = be.fake_stats()
    assert s["submissions"] - before["submissions"] == 1 and s["runs"] - before["runs"] == 4
    assert s["imports"] - before["imports"] == 8
    for (a, b), c in zip(heads, cs):
        assert_same_gemm(c, nat.emulator_gemm(a, nat.pack_b(b)), a, b)
    # weights of another K live in another xclbin (hardware context): a second submission
    other = rand((128, 512), 40)
    cs = be.gemm_batch([(heads[0][0], items[0][1]), (rand((10, 128), 41), be.upload(nat.pack_b(other)))])
    assert be.fake_stats()["submissions"] - s["submissions"] == 2
    assert_same_gemm(cs[0], nat.emulator_gemm(heads[0][0], nat.pack_b(heads[0][1])), heads[0][0], heads[0][1])


def _heads_model(h, t, d):
    from ep_helpers import make_model, tensor

    node = helper.make_node("MatMul", ["q", "kt"], ["s"], name="qk")
    return make_model([node], [tensor("q", [h, t, d]), tensor("kt", [h, d, t])], [tensor("s", [h, t, t])])


@pytest.mark.parametrize("fault", ["", "run_state", "result"])
def test_ep_sends_all_heads_as_one_batch(tmp_path, monkeypatch, capfd, fault):
    """The EP's batched MatMul with a run-time B (attention scores) hands every head to the backend in one batch;
    a device fault in the batch recomputes every head on the CPU path."""
    import onnxruntime as ort
    from ep_helpers import assert_within, bf16_bound, xdna_session

    h, t, d = 4, 256, 64
    kdir = kernel_dir(tmp_path / "k", [(d, t, t, "f32_f32")])
    monkeypatch.setenv("XDNA_XRT_SHIM", "fake")
    if fault:
        monkeypatch.setenv("XDNA_XRT_FAKE_FAULT", fault)
    else:
        monkeypatch.delenv("XDNA_XRT_FAKE_FAULT", raising=False)
    so = ort.SessionOptions()
    so.log_severity_level = 1
    sess = xdna_session(_heads_model(h, t, d), {"backend": "xrt", "kernel_dir": str(kdir), "log_level": "info"},
                        so=so)
    rng = np.random.default_rng(50)
    q, kt = rng.standard_normal((h, t, d)).astype(np.float32), rng.standard_normal((h, d, t)).astype(np.float32)
    s = sess.run(None, {"q": q, "kt": kt})[0]
    for i in range(h):
        assert_within(s[i], q[i].astype(np.float64) @ kt[i], bf16_bound(q[i], kt[i], d), f"head {i}")
    del sess
    err = capfd.readouterr().err
    if fault:
        assert "fault" in err and f"0 GEMM calls on xrt, {h} on the CPU path" in err
    else:
        assert f"{h} GEMM calls on xrt, 0 on the CPU path" in err


def test_partition_reports_the_work_of_gemm_and_conv(tmp_path):
    """The EP reports each node's executed work, which the model reads: Gemm with transA (A gathered on the host)
    and a 1-D Conv (im2col rows x Cout)."""
    from onnxruntime_ep_xdna import partition

    w = numpy_helper.from_array(rand((64, 96), 60), "w")
    cw = numpy_helper.from_array(rand((32, 8, 3), 61), "cw")
    nodes = [helper.make_node("Gemm", ["at", "w"], ["y"], name="gemm", transA=1),
             helper.make_node("Conv", ["x", "cw"], ["z"], name="conv", pads=[1, 1], strides=[2])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("at", TensorProto.FLOAT, [64, 40]),
                                           helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 50])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], [w, cw])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    report = partition(tmp_path / "m.onnx", run=True)
    work = {d.node: d.executed["work"] for d in report.decisions if d.executed}
    assert work["gemm"] == [1, 40, 64, 96, 0, 1, 0]
    assert work["conv"] == [2, 25, 24, 32, 0, 0, 1]  # t_out = (50 + 2 - 3) // 2 + 1 = 25, K = 8 * 3


def test_int8_model_doubles_the_mac_rate_and_halves_the_weight():
    """int8 (constant B only): compute at 256 MACs/core/cycle, B int8, A quantised per row on the host (named);
    a run-time B (attention) stays bf16 whatever the flag says."""
    bf, i8 = nat.npu_model(1500, 512, 2048), nat.npu_model(1500, 512, 2048, int8=True)
    assert i8["compute_us"] == pytest.approx(bf["compute_us"] / 2)
    assert "int8" in i8["dataflow"] and "quantises A per row" in i8["dataflow"] and "A in place" not in i8["dataflow"]
    gemv_bf, gemv_i8 = nat.npu_model(1, 512, 51200 // 4), nat.npu_model(1, 512, 51200 // 4, int8=True)
    assert gemv_i8["cpu_us"] < gemv_bf["cpu_us"]  # the CPU alternative streams half the weight bytes too
    heads = nat.npu_model(1500, 64, 1500, batches=8, runtime_b=True)
    assert nat.npu_model(1500, 64, 1500, batches=8, runtime_b=True, int8=True) == heads
    names = " ".join(a[0] for a in nat.npu_model_assumptions())
    assert "int8 MACs" in names and "CPU int8" in names


def test_backend_says_whether_an_int8_kernel_exists(tmp_path):
    """A manifest's i8_f32 entries (kernels/aie/gemm_int8.cc) tell the xrt backend which weight shapes have an int8
    kernel (the EP's per-node precision asks before choosing int8); bf16 kernels are unaffected."""
    root = kernel_dir(tmp_path / "k", [(512, 512, 256, "f32_f32")])
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "gemm_i8_k512.xclbin").write_bytes(b"fake xclbin")
    (root / "gemm_i8.insts.bin").write_bytes(b"\0" * 16)
    manifest["kernels"].append({"K": 512, "N": 2048, "m_rows": 1536, "dtype": "i8_f32",
                                "xclbin": "gemm_i8_k512.xclbin", "insts": "gemm_i8.insts.bin", "kernel": "MLIR_AIE"})
    (root / "manifest.json").write_text(json.dumps(manifest))
    be = nat.npu_fake_backend(str(root))
    assert be.has_int8_kernel(500, 2000) == (True, "")  # padded to 512 x 2048
    ok, why = be.has_int8_kernel(512, 512)
    assert not ok and "no int8 NPU kernel built for K=512 N=512" in why and "512x2048" in why
    assert be.can_run(1500, 512, 512)[0] and not be.can_run(1500, 512, 2048)[0]  # bf16: only its own kernels
