"""Attention claimed as one node (ops/attention.cc): MatMul(Q, K^T) -> [scale] -> Softmax -> MatMul(., V) runs as the
fused attention contract (kernels/attention_contract.h) through the dispatcher: on the emulator; on the xrt backend
(fake device) where the manifest has an attn_f32 kernel for the node, else declined with a logged reason. Numbers
against float64 numpy and ORT's CPU EP within numerics.attention_bound; placement proves the Softmax runs on our
EP."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from ep_helpers import EP, cpu_session, ep_nodes, init, make_model, tensor, use_fake_npu, xdna_session
from numerics import assert_within, attention_bound, attention_exact

import onnxruntime_ep_xdna as xdna

D = 64


def sdpa_model(B, H, M, T, scale_on="inputs", extra_softmax_reader=False, D=D):
    """torch's scaled_dot_product_attention as optimum exports Whisper: Q [B, M, H, D] and K, V [B, T, H, D] split
    into heads by Transposes, the scale as sqrt(scale) on Q and on K^T (scale_on="inputs"), or one Mul/Div on the
    scores ("mul", "div")."""
    s = D ** -0.5
    nodes = [helper.make_node("Transpose", ["q"], ["qh"], perm=[0, 2, 1, 3], name="tq"),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 3, 1], name="tk"),
             helper.make_node("Transpose", ["v"], ["vh"], perm=[0, 2, 1, 3], name="tv")]
    inits = []
    qk_in = ["qh", "kt"]
    if scale_on == "inputs":
        nodes += [helper.make_node("Mul", ["qh", "sqrt_s"], ["qs"], name="mq"),
                  helper.make_node("Mul", ["sqrt_s", "kt"], ["ks"], name="mk")]
        inits.append(init("sqrt_s", np.array(s ** 0.5, np.float32)))
        qk_in = ["qs", "ks"]
    nodes.append(helper.make_node("MatMul", qk_in, ["scores"], name="qk"))
    sm_in = "scores"
    if scale_on == "mul":
        nodes.append(helper.make_node("Mul", ["scores", "s"], ["scaled"], name="ms"))
        inits.append(init("s", np.array([s], np.float32)))
        sm_in = "scaled"
    elif scale_on == "div":
        nodes.append(helper.make_node("Div", ["scores", "d"], ["scaled"], name="ds"))
        inits.append(init("d", np.array(1 / s, np.float32)))
        sm_in = "scaled"
    nodes += [helper.make_node("Softmax", [sm_in], ["p"], axis=-1, name="sm"),
              helper.make_node("MatMul", ["p", "vh"], ["o"], name="pv")]
    outputs = [tensor("o", [B, H, M, D])]
    if extra_softmax_reader:  # the attention weights are also a model output (word timestamps need them)
        outputs.append(tensor("p", [B, H, M, T]))
    return make_model(nodes, [tensor("q", [B, M, H, D]), tensor("k", [B, T, H, D]), tensor("v", [B, T, H, D])],
                      outputs, inits)


def feeds(B, H, M, T, seed, D=D):
    r = np.random.default_rng(seed)
    return {"q": r.standard_normal((B, M, H, D)).astype(np.float32),
            "k": r.standard_normal((B, T, H, D)).astype(np.float32),
            "v": r.standard_normal((B, T, H, D)).astype(np.float32)}


def check_against_exact_and_cpu(out, cpu, f):
    q = f["q"].transpose(0, 2, 1, 3)
    kt = f["k"].transpose(0, 2, 3, 1)
    v = f["v"].transpose(0, 2, 1, 3)
    scale = q.shape[-1] ** -0.5
    bound = attention_bound(q, kt, v, scale)
    exact = attention_exact(q, kt, v, scale)
    assert_within(out, exact, bound, "EP vs float64")
    assert_within(cpu, exact, bound, "CPU EP vs float64 (the bound also holds for ORT's fp32)")
    assert_within(out, cpu, 2 * bound, "EP vs ORT's CPU EP")


@pytest.mark.parametrize("scale_on", ["inputs", "mul", "div"])
@pytest.mark.parametrize("B,H,M,T", [(1, 3, 300, 300), (2, 2, 200, 130)])
def test_attention_is_one_node_on_the_ep(B, H, M, T, scale_on):
    model = sdpa_model(B, H, M, T, scale_on)
    sess = xdna_session(model, {"backend": "emulator"})
    placed = ep_nodes(sess)
    assert ("sm", "Softmax") in placed and ("qk", "MatMul") in placed and ("pv", "MatMul") in placed
    f = feeds(B, H, M, T, 1)
    check_against_exact_and_cpu(sess.run(None, f)[0], cpu_session(model).run(None, f)[0], f)


@pytest.mark.parametrize("M", [1, 2, 3, 5])
def test_decoder_shaped_attention(M):
    """Decoder steps: few query rows (beams x tokens) against a 1500-key cross-attention: computed by the fused path
    (K and V read as they lie, all heads in one job)."""
    B, H, T = 2, 8, 1500
    model = sdpa_model(B, H, M, T)
    sess = xdna_session(model, {"backend": "emulator"})
    assert ("sm", "Softmax") in ep_nodes(sess)
    f = feeds(B, H, M, T, 2 + M)
    check_against_exact_and_cpu(sess.run(None, f)[0], cpu_session(model).run(None, f)[0], f)


def test_attention_of_unnamed_nodes():
    """Node names are optional in ONNX: an attention whose nodes have none is fused and compiled like a named one
    (the covered QK^T MatMul was once told apart by its coverer's name, and Compile refused the session)."""
    B, H, M, T = 1, 2, 3, 40
    named = onnx.load_from_string(sdpa_model(B, H, M, T, "mul"))
    for node in named.graph.node:
        node.name = ""
    model = named.SerializeToString()
    sess = xdna_session(model, {"backend": "emulator"})
    assert sorted(op for _, op in ep_nodes(sess)) == ["MatMul", "MatMul", "Mul", "Softmax", "Transpose",
                                                       "Transpose", "Transpose"]
    f = feeds(B, H, M, T, 9)
    check_against_exact_and_cpu(sess.run(None, f)[0], cpu_session(model).run(None, f)[0], f)


def test_partition_report_tells_unnamed_nodes_apart(tmp_path):
    """`xdna partition` once keyed its decisions by node name: the two unnamed MatMuls of an attention came out as
    one line. Each now has its own, named by its position in the graph, and its placement."""
    named = onnx.load_from_string(sdpa_model(1, 2, 3, 40, "mul"))
    for node in named.graph.node:
        node.name = ""
    onnx.save(named, str(tmp_path / "unnamed.onnx"))
    report = xdna.partition(tmp_path / "unnamed.onnx", {"backend": "emulator"})
    matmuls = [d for d in report.decisions if d.op_type == "MatMul"]
    assert len(matmuls) == 2 and len({d.index for d in matmuls}) == 2
    assert all(d.placed_on == xdna.EP_NAME for d in matmuls), report.table()
    table = report.table()
    for d in matmuls:
        assert f"<unnamed MatMul #{d.index}>" in table


def check_on_one_and_two_threads(model, f):
    """The attention of `model` fused on the EP (emulator) with 1 and 2 threads: the same bits, within the bound of
    float64 and against ORT's CPU EP."""
    outs = []
    for threads in ("1", "2"):
        sess = xdna_session(model, {"backend": "emulator", "threads": threads})
        assert ("sm", "Softmax") in ep_nodes(sess)
        outs.append(sess.run(None, f)[0])
    np.testing.assert_array_equal(outs[0], outs[1])
    check_against_exact_and_cpu(outs[0], cpu_session(model).run(None, f)[0], f)


@pytest.mark.parametrize("B,H,M,T,d", [(5, 8, 1, 1500, 64), (2, 3, 4, 77, 64), (1, 2, 16, 33, 64), (1, 1, 1, 1, 64),
                                        (2, 2, 3, 100, 40), (1, 2, 2, 50, 8)])
def test_few_rows_one_task_per_head(B, H, M, T, d):
    """The few-row path (one task per batch row and head, K and V read as rows): beams as batch rows, T and the head
    dims off the 16-lane blocks, M at kUnpackedMaxM; 1 and 2 threads give the same bits."""
    check_on_one_and_two_threads(sdpa_model(B, H, M, T, D=d), feeds(B, H, M, T, 10 + M, D=d))


def test_few_rows_with_k_transposed_in_the_graph_input():
    """K^T given as it lies ([B, H, D, T], t contiguous): not rows, so the per-product path computes it."""
    B, H, M, T = 2, 4, 3, 200
    nodes = [helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
             helper.make_node("Mul", ["scores", "s"], ["scaled"], name="ms"),
             helper.make_node("Softmax", ["scaled"], ["p"], axis=-1, name="sm"),
             helper.make_node("MatMul", ["p", "v"], ["o"], name="pv")]
    model = make_model(nodes, [tensor("q", [B, H, M, D]), tensor("kt", [B, H, D, T]), tensor("v", [B, H, T, D])],
                       [tensor("o", [B, H, M, D])], [init("s", np.array([D ** -0.5], np.float32))])
    sess = xdna_session(model, {"backend": "emulator"})
    assert ("sm", "Softmax") in ep_nodes(sess)
    r = np.random.default_rng(7)
    f = {"q": r.standard_normal((B, H, M, D)).astype(np.float32),
         "kt": r.standard_normal((B, H, D, T)).astype(np.float32),
         "v": r.standard_normal((B, H, T, D)).astype(np.float32)}
    out, cpu = sess.run(None, f)[0], cpu_session(model).run(None, f)[0]
    bound = attention_bound(f["q"], f["kt"], f["v"], D ** -0.5)
    exact = attention_exact(f["q"], f["kt"], f["v"], D ** -0.5)
    assert_within(out, exact, bound, "EP vs float64")
    assert_within(out, cpu, 2 * bound, "EP vs ORT's CPU EP")


def test_nan_in_v_gives_nan_columns_as_the_cpu_ep():
    """A NaN in V (and in Q) on the few-row path: the same NaN pattern as ORT's CPU EP, nothing else disturbed."""
    B, H, M, T = 2, 3, 2, 90
    model = sdpa_model(B, H, M, T)
    f = feeds(B, H, M, T, 5)
    f["v"][0, 7, 1, 5] = np.nan  # column 5 of head 1 in batch row 0
    f["q"][1, 0, 2, 60] = np.nan  # row 0 of head 2 in batch row 1
    out = xdna_session(model, {"backend": "emulator"}).run(None, f)[0]
    cpu = cpu_session(model).run(None, f)[0]
    np.testing.assert_array_equal(np.isnan(out), np.isnan(cpu))
    assert np.isnan(out[0, 1, :, 5]).all() and np.isnan(out[1, 2, 0]).all()
    assert np.isnan(out).sum() == M + D


def test_softmax_read_elsewhere_stays_separate():
    """A Softmax whose weights another node reads is not fused: it runs on the CPU EP, both MatMuls on ours."""
    B, H, M, T = 1, 2, 40, 50
    model = sdpa_model(B, H, M, T, extra_softmax_reader=True)
    sess = xdna_session(model, {"backend": "emulator"})
    placed = ep_nodes(sess)
    assert ("sm", "Softmax") not in placed and ("qk", "MatMul") in placed and ("pv", "MatMul") in placed
    f = feeds(B, H, M, T, 3)
    out, p = sess.run(None, f)
    cpu_out, cpu_p = cpu_session(model).run(None, f)
    assert np.allclose(p, cpu_p, atol=0.05)
    check_against_exact_and_cpu(out, cpu_out, f)


@pytest.mark.parametrize("options", [{"precision": "bf16x3"}, {"precision_policy": "bf16x3:op=MatMul;bf16:*"}])
def test_bf16x3_policy_unfuses_attention(options):
    """The fused attention contract is bf16: a policy that puts its node in bf16x3 gets the two MatMuls as separate
    bf16x3 products (the Softmax on the CPU EP) instead, so the policy's precision is what runs."""
    B, H, M, T = 1, 2, 40, 50
    model = sdpa_model(B, H, M, T)
    sess = xdna_session(model, {"backend": "emulator", **options})
    placed = ep_nodes(sess)
    assert ("sm", "Softmax") not in placed and ("pv", "MatMul") in placed
    f = feeds(B, H, M, T, 6)
    out = sess.run(None, f)[0]
    fused = xdna_session(model, {"backend": "emulator"}).run(None, f)[0]
    cpu = cpu_session(model).run(None, f)[0]
    # bf16x3 products: far closer to ORT's fp32 than the fused bf16 contract
    assert np.abs(out - cpu).max() < np.abs(fused - cpu).max() / 10


def test_non_finite_scores_give_nan_rows_as_the_cpu_ep():
    B, H, M, T = 1, 1, 4, 70
    model = sdpa_model(B, H, M, T, scale_on="mul")
    f = feeds(B, H, M, T, 4)
    f["q"][0, 1, 0, 3] = np.nan
    f["k"][0, 5, 0, 0] = np.inf  # +-Inf scores in every row: ORT's Softmax gives NaN there too
    out = xdna_session(model, {"backend": "emulator"}).run(None, f)[0]
    cpu = cpu_session(model).run(None, f)[0]
    np.testing.assert_array_equal(np.isnan(out), np.isnan(cpu))


def test_partition_report_names_the_fused_attention(tmp_path):
    B, H, M, T = 1, 2, 64, 96
    (tmp_path / "m.onnx").write_bytes(sdpa_model(B, H, M, T))
    report = xdna.partition(tmp_path / "m.onnx", run=True)
    by_node = {d.node: d for d in report.decisions}
    assert by_node["qk"].placed_on == EP and "in the fused attention of 'pv'" in by_node["qk"].reason
    assert by_node["pv"].executed["attention"] == [B * H, M, T, D]
    assert by_node["pv"].mflop == pytest.approx(2 * B * H * M * T * 2 * D / 1e6)


def test_fake_device_declines_attention_with_a_logged_reason(tmp_path, monkeypatch, capfd):
    """The xrt backend (fake device) has no fused attention kernel: the node runs on the CPU path, said in the log,
    with the same numbers; a GEMM with a kernel in the same session still runs on the device."""
    from test_xrt_dataflow import kernel_dir

    use_fake_npu(monkeypatch)
    kdir = kernel_dir(tmp_path / "k", [(512, 512, 256, "f32_f32")])
    B, H, M, T = 1, 2, 100, 120
    model = sdpa_model(B, H, M, T)
    so = ort.SessionOptions()
    so.log_severity_level = 1
    sess = xdna_session(model, {"backend": "xrt", "kernel_dir": str(kdir), "log_level": "info"}, so=so)
    assert ("sm", "Softmax") in ep_nodes(sess)
    f = feeds(B, H, M, T, 5)
    check_against_exact_and_cpu(sess.run(None, f)[0], cpu_session(model).run(None, f)[0], f)
    del sess
    err = capfd.readouterr().err
    assert "no fused attention kernel built" in err
    assert f"node 'pv': 0 GEMM calls on xrt, {B * H} on the CPU path ({B * H} not for the device" in err


def test_emulator_fault_in_attention_falls_back(monkeypatch, capfd):
    """A fault of the primary backend in the fused attention: logged, every head recomputed on the CPU."""
    B, H, M, T = 1, 2, 30, 40
    model = sdpa_model(B, H, M, T)
    so = ort.SessionOptions()
    so.log_severity_level = 1
    sess = xdna_session(model, {"backend": "emulator", "fault_inject": "run", "log_level": "info"}, so=so)
    f = feeds(B, H, M, T, 6)
    check_against_exact_and_cpu(sess.run(None, f)[0], cpu_session(model).run(None, f)[0], f)
    del sess
    err = capfd.readouterr().err
    assert "fault" in err and f"{B * H} after a fault" in err


def attention_kernel_dir(root, T, H, scale, gemm=True):
    """A kernel directory for the fake device with one attn_f32 kernel: self-attention over T rows, H heads of 64,
    Q/K/V [.., T, H, 64] (ld = H * 64) and O [.., H, T, 64] as the EP's fused node has them; plus a GEMM kernel."""
    from test_xrt_dataflow import kernel_dir

    from onnxruntime_ep_xdna import _native as nat

    root = kernel_dir(root, [(512, 512, 256, "f32_f32")] if gemm else [])
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "attn.xclbin").write_bytes(b"fake xclbin")
    nat.npu_fake_insts_attention(T, H, H * D, D, T * D, scale).astype("<u4").tofile(root / "attn.insts.bin")
    manifest["kernels"].append({"dtype": "attn_f32", "T": T, "H": H, "ld": H * D, "ldo": D, "o_head": T * D,
                                "scale": scale, "xclbin": "attn.xclbin", "insts": "attn.insts.bin"})
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture
def fake_xrt(monkeypatch):
    use_fake_npu(monkeypatch)


def run_on_fake(model, kdir, f):
    so = ort.SessionOptions()
    so.log_severity_level = 1
    sess = xdna_session(model, {"backend": "xrt", "kernel_dir": str(kdir), "log_level": "info"}, so=so)
    assert ("sm", "Softmax") in ep_nodes(sess)
    out = sess.run(None, f)[0]
    del sess
    return out


@pytest.mark.parametrize("B,H,T", [(2, 2, 100), (1, 3, 64)])
def test_fake_device_runs_fused_attention(tmp_path, fake_xrt, capfd, B, H, T):
    """Where the manifest has an attn_f32 kernel for the node's T, H, scale and layout, the xrt backend runs the
    fused attention on the device (one command per batch item: Q, K, V and O imported in place); the fake device
    computes it with its own loop (online softmax over 32-key tiles), within the contract's bound of float64 and
    of the emulator."""
    model = sdpa_model(B, H, T, T, scale_on="mul")  # the scale exactly 1/8
    kdir = attention_kernel_dir(tmp_path / "k", T, H, D ** -0.5)
    f = feeds(B, H, T, T, 7)
    out = run_on_fake(model, kdir, f)
    check_against_exact_and_cpu(out, cpu_session(model).run(None, f)[0], f)
    emu = xdna_session(model, {"backend": "emulator"}).run(None, f)[0]
    q, kt, v = f["q"].transpose(0, 2, 1, 3), f["k"].transpose(0, 2, 3, 1), f["v"].transpose(0, 2, 1, 3)
    assert_within(out, emu, attention_bound(q, kt, v, D ** -0.5), "fake device vs emulator")
    err = capfd.readouterr().err
    assert f"node 'pv': {B * H} GEMM calls on xrt, 0 on the CPU path" in err, err[-2000:]


def test_fake_device_declines_attention_it_has_no_kernel_for(tmp_path, fake_xrt, capfd):
    """An attn_f32 kernel of another scale (torch's split sqrt scale multiplies back to 0.12499999 in fp32) or
    another T: declined with the reason logged, the node computed on the CPU path with the same contract."""
    B, H, T = 1, 2, 100
    f = feeds(B, H, T, T, 8)
    for model, kdir, why in [
            (sdpa_model(B, H, T, T, scale_on="inputs"), attention_kernel_dir(tmp_path / "s", T, H, D ** -0.5),
             "no fused attention kernel for M=100 T=100 D=64 Dv=64 scale=0.124999993"),
            (sdpa_model(B, H, T, T, scale_on="mul"), attention_kernel_dir(tmp_path / "t", 96, H, D ** -0.5),
             "attn_f32 built (self-attention, D 64): T=96")]:
        out = run_on_fake(model, kdir, f)
        check_against_exact_and_cpu(out, cpu_session(model).run(None, f)[0], f)
        err = capfd.readouterr().err
        assert why in err, err[-2000:]
        assert f"node 'pv': 0 GEMM calls on xrt, {B * H} on the CPU path ({B * H} not for the device" in err


@pytest.mark.parametrize("fault", ["run", "run_state", "result", "load"])
def test_fake_device_attention_fault_falls_back(tmp_path, fake_xrt, monkeypatch, capfd, fault):
    """A device fault in the fused attention (start, command state, a result never written, the context): logged,
    every head recomputed on the CPU path, the numbers right."""
    monkeypatch.setenv("XDNA_XRT_FAKE_FAULT", fault)
    B, H, T = 1, 2, 70
    model = sdpa_model(B, H, T, T, scale_on="mul")
    f = feeds(B, H, T, T, 9)
    out = run_on_fake(model, attention_kernel_dir(tmp_path / "k", T, H, D ** -0.5, gemm=False), f)
    check_against_exact_and_cpu(out, cpu_session(model).run(None, f)[0], f)
    err = capfd.readouterr().err
    assert "fault" in err and f"{B * H} after a fault" in err, err[-2000:]


def test_fake_device_attention_staged_when_import_refused(tmp_path, fake_xrt, monkeypatch, capfd):
    """A device that refuses user-pointer buffers: Q, K, V staged in, O staged out (only the heads' rows), same
    numbers, still on the device."""
    monkeypatch.setenv("XDNA_XRT_FAKE_FAULT", "import")
    B, H, T = 2, 2, 50
    model = sdpa_model(B, H, T, T, scale_on="mul")
    f = feeds(B, H, T, T, 10)
    out = run_on_fake(model, attention_kernel_dir(tmp_path / "k", T, H, D ** -0.5), f)
    check_against_exact_and_cpu(out, cpu_session(model).run(None, f)[0], f)
    assert f"node 'pv': {B * H} GEMM calls on xrt, 0 on the CPU path" in capfd.readouterr().err


def test_manifest_refuses_bad_attention_entries(tmp_path):
    """attn_f32 entries are data from disk: out-of-range T, H, strides or a missing scale are skipped with the
    reason (here the only entries, so the directory has no usable kernels); a good one loads."""
    from onnxruntime_ep_xdna import _native as nat

    good = attention_kernel_dir(tmp_path / "good", 64, 2, 0.125, gemm=False)
    nat.npu_fake_backend(str(good))
    manifest = json.loads((good / "manifest.json").read_text())
    entry = manifest["kernels"][0]
    for bad in ({"T": 16}, {"H": 0}, {"ld": 64}, {"ldo": 8}, {"scale": "x"}, {"scale": None}, {"xclbin": "../x"}):
        manifest["kernels"] = [{**entry, **bad}]
        (good / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(RuntimeError, match="no usable kernels"):
            nat.npu_fake_backend(str(good))
