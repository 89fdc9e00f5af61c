"""The AIE GEMM design (kernels/aie) without the AIE toolchain: its planned data movement, the core kernel's
blocked indexing (compiled for the host against a stand-in of the AIE API), the shape extractor and the build
script's behaviour when mlir-aie/Peano are absent."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxruntime_ep_xdna import _native as nat

AIE = Path(__file__).resolve().parents[1] / "kernels" / "aie"
sys.path.insert(0, str(AIE))

import gemm_design as design  # noqa: E402
from numerics import bf16_round  # noqa: E402
import model_shapes  # noqa: E402


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


@pytest.mark.parametrize("M,K,N", [(256, 64, 256), (512, 128, 512), (256, 200, 300)])
def test_design_data_movement_computes_the_contract(M, K, N):
    """simulate() runs the design's shim transfers, memtile re-layouts, core acquire order and C un-blocking on
    the packed B that pack_b (the EP's code) writes; the result must be the contract's GEMM."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((M, K)).astype(np.float32), rng.standard_normal((K, N)).astype(np.float32)
    packed = nat.pack_b(b)
    Mp, Kp, Np = M, packed.Kpad, packed.Npad
    a16 = np.zeros((Mp, Kp), np.float32)
    a16[:, :K] = bf16_round(a)  # what the host stages into the A buffer
    b16 = bf16_bits_to_f32(np.asarray(packed.data)).astype(np.float64)
    c = design.simulate(a16.reshape(-1).astype(np.float64), b16, Mp, Kp, Np)
    ref = nat.reference_gemm(a, packed)
    np.testing.assert_allclose(c[:M, :N], ref, rtol=0, atol=1e-4 * K)
    assert np.all(c[:, N:] == 0), "padded columns of B are zero, so padded C columns are exact zeros"


def test_design_limits():
    design.check_shape(1536, 2048, 16384)
    for bad in [(100, 64, 256), (256, 60, 256), (256, 64, 200), (256, 64, 16640)]:
        with pytest.raises(ValueError):
            design.check_shape(*bad)
    assert design.L1_BYTES <= 48 * 1024


def host_kernel(tmp_path_factory, source: str, opt: str = "-O1") -> ctypes.CDLL:
    """An AIE core kernel source of kernels/aie compiled by g++ against the AIE API stand-in (host_mock)."""
    cxx = shutil.which("g++")
    if not cxx:
        pytest.skip("g++ not available")
    so = tmp_path_factory.mktemp("aie") / f"{Path(source).stem}_mock.so"
    subprocess.run([cxx, "-std=c++17", opt, "-shared", "-fPIC", f"-I{AIE / 'host_mock'}", str(AIE / source),
                    "-o", str(so)], check=True)
    return ctypes.CDLL(str(so))


@pytest.fixture(scope="module")
def core_kernel(tmp_path_factory):
    return host_kernel(tmp_path_factory, "gemm_bf16.cc")


def test_core_kernel_blocked_indexing(core_kernel):
    """gemm_bf16.cc on the host (AIE API stand-in): C += A.B on the blocked layouts, twice (accumulates)."""
    rng = np.random.default_rng(1)
    a = (rng.integers(-8, 8, 64 * 64).astype(np.float32))  # small integers: exact in bf16 and fp32
    b = (rng.integers(-8, 8, 64 * 64).astype(np.float32))
    a16 = (a.view(np.uint32) >> 16).astype(np.uint16)
    b16 = (b.view(np.uint32) >> 16).astype(np.uint16)
    c = np.zeros(64 * 64, np.float32)
    ptr = lambda x: x.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    core_kernel.zero_f32(ptr(c))
    core_kernel.matmul_bf16_f32(ptr(a16), ptr(b16), ptr(c))
    core_kernel.matmul_bf16_f32(ptr(a16), ptr(b16), ptr(c))
    ref = np.zeros(64 * 64)
    design.core_matmul_blocked(a.astype(np.float64), b.astype(np.float64), ref)
    design.core_matmul_blocked(a.astype(np.float64), b.astype(np.float64), ref)
    np.testing.assert_array_equal(c, ref)
    c[:] = 7
    core_kernel.zero_f32(ptr(c))
    assert not c.any()


def _model(path: Path):
    w1 = numpy_helper.from_array(np.zeros((512, 2048), np.float32), "w1")
    w2 = numpy_helper.from_array(np.zeros((2048, 512), np.float32), "w2")  # Gemm transB: (K, N) = (512, 2048)
    w3 = numpy_helper.from_array(np.zeros((80, 300), np.float32), "w3")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Gemm", ["x2", "w2"], ["g"], transB=1),
             helper.make_node("MatMul", ["y", "w3"], ["z"]),
             helper.make_node("MatMul", ["h", "h2"], ["act"])]  # activation x activation: no kernel
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                                           for n in ("x", "x2", "y", "h2")],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("g", "z", "act")],
                              [w1, w2, w3])
    onnx.save(helper.make_model(graph), path)


def test_model_shapes_count_conv1d_as_its_gemm(tmp_path):
    w = numpy_helper.from_array(np.zeros((512, 80, 3), np.float32), "w")
    g = numpy_helper.from_array(np.zeros((8, 2, 3), np.float32), "g")
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1]),
             helper.make_node("Conv", ["x2", "g"], ["z"], group=4)]  # grouped: not a GEMM the EP runs
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("x", "x2")],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "z")], [w, g])
    onnx.save(helper.make_model(graph), tmp_path / "c.onnx")
    assert model_shapes.weight_shapes(str(tmp_path / "c.onnx")) == {(240, 512): 1}


def test_model_shapes(tmp_path):
    _model(tmp_path / "m.onnx")
    shapes = model_shapes.weight_shapes(str(tmp_path / "m.onnx"))
    assert shapes == {(512, 2048): 2, (80, 300): 1}
    assert {model_shapes.padded(k, n) for k, n in shapes} == {(512, 2048), (128, 512)}


def test_build_script_without_toolchain(tmp_path):
    _model(tmp_path / "m.onnx")
    script = str(AIE / "build_kernels.py")
    dry = subprocess.run([sys.executable, script, "--model", str(tmp_path / "m.onnx"), "--dtype", "bf16_f32",
                          "--dry-run"], capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert "4 kernel(s) for 2 shape(s); 2 xclbin(s)" in dry.stdout and "K=  128 N=  512 m_rows= 1536" in dry.stdout
    try:
        import aie  # noqa: F401

        pytest.skip("mlir-aie is installed here")
    except ImportError:
        pass
    r = subprocess.run([sys.executable, script, "--shape", "512x512", "--out", str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 3
    assert "toolchain is not installed" in r.stderr and "Peano" in r.stderr and "xclbinutil" in r.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def _whisper_like(path: Path):
    """Whisper's encoder front in miniature: [batch, 80, 3000] -> conv k3 -> conv k3 stride 2 -> [batch, 1500, C]
    -> MatMul. Same heights as whisper-base (3000, 1500), fewer channels."""
    w1 = numpy_helper.from_array(np.zeros((16, 80, 3), np.float32), "w1")
    w2 = numpy_helper.from_array(np.zeros((16, 16, 3), np.float32), "w2")
    w3 = numpy_helper.from_array(np.zeros((16, 32), np.float32), "w3")
    nodes = [helper.make_node("Conv", ["input_features", "w1"], ["h1"], pads=[1, 1]),
             helper.make_node("Conv", ["h1", "w2"], ["h2"], pads=[1, 1], strides=[2]),
             helper.make_node("Transpose", ["h2"], ["t"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["t", "w3"], ["y"])]
    graph = helper.make_graph(nodes, "enc", [helper.make_tensor_value_info("input_features", TensorProto.FLOAT,
                                                                           ["batch_size", 80, 3000])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w1, w2, w3])
    onnx.save(helper.make_model(graph), path)


def test_model_heights_and_f32_build_plan(tmp_path):
    _whisper_like(tmp_path / "enc.onnx")
    work = model_shapes.gemm_work(str(tmp_path / "enc.onnx"), {"batch_size": 1})
    assert work == {(256, 256, 3000): 1, (64, 256, 1500): 2}  # conv1 (K 240), conv2 (K 48), MatMul (K 16)
    # batch 2: the MatMul folds the batch into M (3000 rows); a Conv runs one GEMM per batch item (still 1500)
    assert model_shapes.gemm_work(str(tmp_path / "enc.onnx"), {"batch_size": 2}) == \
        {(256, 256, 3000): 1, (64, 256, 1500): 1, (64, 256, 3000): 1}
    r = subprocess.run([sys.executable, str(AIE / "model_shapes.py"), str(tmp_path / "enc.onnx"), "--dim",
                        "batch_size=1", "--heights"], capture_output=True, text=True)
    assert r.returncode == 0 and "exact heights: 1500, 3000" in r.stderr, r.stderr
    script = str(AIE / "build_kernels.py")
    dry = subprocess.run([sys.executable, script, "--model", str(tmp_path / "enc.onnx"), "--dim", "batch_size=1",
                          "--dry-run"], capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert lines[0].startswith("4 kernel(s) for 2 shape(s); 2 xclbin(s)"), lines[0]
    assert [ln.split(":")[0].split() for ln in lines[1:]] == [
        ["K=", "64", "N=", "256", "m_rows=", "256", "f32_f32"], ["K=", "64", "N=", "256", "m_rows=", "1500", "f32_f32"],
        ["K=", "256", "N=", "256", "m_rows=", "256", "f32_f32"],
        ["K=", "256", "N=", "256", "m_rows=", "3000", "f32_f32"]]
    assert "6 block(s) (last overlaps 36 rows)" in lines[2] and "A slab resident" in lines[2]
    bad = subprocess.run([sys.executable, script, "--shape", "512x512", "--m-rows", "100", "--dry-run"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and ">= 256" in bad.stderr


def test_whisper_base_encoder_heights_are_the_issues_gemm_list():
    """The real whisper-base encoder (one 30 s window): the GEMMs issue 15 lists, with the exact heights the f32_f32
    kernels are built for (shape inference must see through the attention's Shape -> Reshape chains)."""
    if os.environ.get("XDNA_SKIP_REAL_MODEL"):
        pytest.skip("XDNA_SKIP_REAL_MODEL is set")
    from onnxruntime_ep_xdna.whisper.model import ensure_model

    enc = ensure_model("base", log=lambda m: print(m, file=sys.stderr)) / "encoder_model.onnx"
    assert model_shapes.gemm_work(str(enc), {"batch_size": 1}) == {
        (512, 512, 1500): 24, (512, 2048, 1500): 6, (2048, 512, 1500): 6, (256, 512, 3000): 1, (1536, 512, 1500): 1}


def test_f32_manifest_from_the_build_runs_on_the_fake_device(tmp_path):
    """The manifest build_kernels.py writes for f32_f32 kernels (its entries; a fake device's instruction streams
    in place of aiecc's) is accepted by the backend's loader and runs 1500 rows in place in one run."""
    import build_kernels

    variants, skipped = build_kernels.plan({(512, 512)}, [256], "f32_f32", {(512, 512): {1500}})
    assert not skipped and [v["m_rows"] for v in variants] == [256, 1500]
    entries = []
    for v in variants:
        insts = f"gemm_f32_f32_k512_n512_m{v['m_rows']}.insts.bin"
        nat.npu_fake_insts(v["m_rows"], 512, 512, True).astype("<u4").tofile(tmp_path / insts)
        entries.append({**v, "xclbin": "gemm_f32_f32_k512_x.xclbin", "insts": insts, "kernel": "MLIR_AIE"})
    (tmp_path / "gemm_f32_f32_k512_x.xclbin").write_bytes(b"fake xclbin")
    (tmp_path / "manifest.json").write_text(json.dumps(build_kernels.manifest(entries)))
    assert all(e["dtype"] == "f32_f32" for e in json.loads((tmp_path / "manifest.json").read_text())["kernels"])
    be = nat.npu_fake_backend(str(tmp_path))
    rng = np.random.default_rng(9)
    a, b = rng.standard_normal((1500, 512)).astype(np.float32), rng.standard_normal((512, 512)).astype(np.float32)
    packed = nat.pack_b(b)
    c = be.gemm(a, be.upload(packed))
    s = be.fake_stats()
    assert s["runs"] == 1 and s["imports"] == 2, s
    np.testing.assert_array_equal(c, nat.emulator_gemm(a, packed))


def _recorded_mlir(M, K, N, stream_a=False):
    """A stand-in for the MLIR text of iron_module_f32, made from the recorded program: the fifos, links, kernels
    and workers (the static part) and the runtime transfers inside an aiex.runtime_sequence block."""
    rec = iron_layer.Recorder()
    design.iron_program_f32(design.plan_f32(M, K, N, stream_a), rec)
    static = [f"fifo {f.name} {f.obj_type} {f.depth} {f.dims_to_stream} {f.repeat_count} "
              f"{[(c.depth, c.dims_from_stream) for c in f.consumers]}" for f in rec.fifos.values()]
    static += [f"link {ln.kind} {ln.placement} {ln.offsets}" for ln in rec.links]
    static += [f"kernel {k.name} {k.bin_name} {k.arg_types}" for k in rec.kernels]
    static += [f"core {w.placement} {w.trace}" for w in rec.workers]
    seq = [f"{t.kind} {t.fifo} {t.tap} {t.task_group}" for t in rec.runtimes[0].transfers]
    return "module {\n" + "\n".join(static) + f"\naiex.runtime_sequence({M}) {{\n" + "\n".join(seq) + "\n}\n}"


def test_f32_build_shares_xclbins_by_program_and_writes_a_loadable_manifest(tmp_path, monkeypatch):
    """build() with the toolchain's commands stubbed (aiecc writes a fake device's instruction stream): heights of a
    shape share one xclbin because the recorded static program does not depend on M, distinct programs get their
    own, and the manifest it returns runs on the fake device in place."""
    import build_kernels

    def fake_run(cmd, cwd, log):
        if "-o" in cmd:  # Peano
            Path(cmd[cmd.index("-o") + 1]).write_bytes(b"obj")
            return
        name = Path(cwd).name  # gemm_f32_f32_k{K}_n{N}_m{M}
        k, n, m = (int(x[1:]) for x in name.split("_")[-3:])
        assert Path(cwd, "design.mlir").read_text() == _recorded_mlir(m, k, n)
        nat.npu_fake_insts(m, k, n, True).astype("<u4").tofile(Path(cwd) / "insts.bin")
        if "--aie-generate-xclbin" in cmd:
            Path(cwd, "final.xclbin").write_bytes(b"fake xclbin " + name.encode())

    monkeypatch.setattr(build_kernels, "run", fake_run)
    monkeypatch.setattr(build_kernels.design, "iron_module_f32", _recorded_mlir)
    monkeypatch.setenv("AIE_XCLBINUTIL_PATH", "/nonexistent/xclbinutil")
    variants, skipped = build_kernels.plan({(512, 512), (2048, 512)}, [256, 1500], "f32_f32")
    assert not skipped
    tools = {"peano": "/p", "aie_api_include": "/i", "aiecc": "aiecc.py", "xclbinutil": "/x"}
    result = build_kernels.build(variants, tmp_path / "out", tools, tmp_path / "work")
    entries = result["kernels"]
    assert len(entries) == 4 and all(e["dtype"] == "f32_f32" for e in entries)
    by_shape = {}
    for e in entries:
        by_shape.setdefault((e["K"], e["N"]), set()).add(e["xclbin"])
    assert all(len(x) == 1 for x in by_shape.values()) and len(set.union(*by_shape.values())) == 2
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(result))
    be = nat.npu_fake_backend(str(tmp_path / "out"))
    rng = np.random.default_rng(10)
    for K in (512, 2048):
        a, b = rng.standard_normal((1500, K)).astype(np.float32), rng.standard_normal((K, 512)).astype(np.float32)
        packed = nat.pack_b(b)
        np.testing.assert_array_equal(be.gemm(a, be.upload(packed)), nat.emulator_gemm(a, packed))
    assert be.fake_stats()["imports"] == 4, "A and C of both calls in place"
    # a design whose static part depended on the height would need one context per height: the build refuses it
    monkeypatch.setattr(build_kernels.design, "iron_module_f32",
                        lambda M, K, N, stream_a=False: f"rows {M}\n" + _recorded_mlir(M, K, N))
    monkeypatch.setattr(build_kernels, "run", lambda cmd, cwd, log: fake_run(cmd, cwd, log) if "-o" in cmd else (
        Path(cwd, "insts.bin").write_bytes(b"i"), Path(cwd, "final.xclbin").write_bytes(b"x")))
    with pytest.raises(RuntimeError, match="differs from the other heights"):
        build_kernels.build(variants, tmp_path / "out2", tools, tmp_path / "work2")


def test_core_kernel_converts_fp32_a_with_round_to_nearest_even(core_kernel):
    """matmul_f32a_bf16_f32 (f32_f32 kernels): fp32 A half-tile rounded in the core. The host stand-in models the
    AIE's conversion modes (default floor); the kernel must set RNE, so C equals the contract's host rounding bit for
    bit. A holds ties and near-ties, where floor and RNE differ."""
    rng = np.random.default_rng(2)
    hi = rng.integers(0x3F00, 0x4100, (64, 32)).astype(np.uint32) << 16
    low = rng.choice(np.array([0x8000, 0x7FFF, 0x8001, 0x0001, 0xFFFF], np.uint32), (64, 32))
    sign = rng.choice(np.array([0, 0x80000000], np.uint32), (64, 32))
    a = (hi | low | sign).view(np.float32)
    b = np.zeros((32, 64), np.float32)
    b[np.arange(32), np.arange(32)] = 1.0  # C[:, :32] = bf16(A), one exact product per sum
    b[np.arange(32), 32 + np.arange(32)] = -2.0
    a_blk = np.ascontiguousarray(a.reshape(16, 4, 4, 8).transpose(0, 2, 1, 3)).reshape(-1)
    b16 = (b.view(np.uint32) >> 16).astype(np.uint16)
    b_blk = np.ascontiguousarray(b16.reshape(4, 8, 16, 4).transpose(0, 2, 1, 3)).reshape(-1)
    c = np.zeros(64 * 64, np.float32)
    ptr = lambda x: x.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    core_kernel.matmul_f32a_bf16_f32(ptr(a_blk), ptr(b_blk), ptr(c))
    c = c.reshape(16, 16, 4, 4).transpose(0, 2, 1, 3).reshape(64, 64)
    rne = bf16_round(a)
    np.testing.assert_array_equal(c[:, :32], rne)
    np.testing.assert_array_equal(c[:, 32:], -2 * rne)
    np.testing.assert_array_equal(c[:, :32], nat.emulator_gemm(a, nat.pack_b(np.eye(32, 64, dtype=np.float32)))[:, :32])
    floor_ = np.where(sign != 0, a.view(np.uint32).astype(np.uint64) + 0xFFFF, a.view(np.uint32)) >> 16 << 16
    assert np.any(floor_.astype(np.uint32).view(np.float32) != rne), "data must tell floor from RNE"



@pytest.mark.parametrize("flags", [1, 2, 3, 4, 5, 7])
def test_core_kernel_epilogue_is_the_contracts(core_kernel, flags):
    """epilogue_f32 (the GEMM epilogue on a finished C tile in L1, gemm_contract.h "Epilogue") on the host
    stand-in: bit for bit the emulator's apply_epilogue on the blocked layout (same operations, same order), and
    within numerics.epilogue_bound of float64. Unbuilt for the AIE here (no Peano)."""
    from numerics import epilogue_bound, epilogue_exact

    rng = np.random.default_rng(flags)
    c = (rng.standard_normal((64, 64)) * 3).astype(np.float32)
    c[0, :8] = [0.0, -0.0, 6.0, -6.0, 40.0, -40.0, 1e-30, np.sqrt(2)]  # clamp region, zeros, a tiny value
    bias = rng.standard_normal(64).astype(np.float32)
    res = rng.standard_normal((64, 64)).astype(np.float32)
    blocked = lambda x: np.ascontiguousarray(x.reshape(16, 4, 16, 4).transpose(0, 2, 1, 3)).reshape(-1)  # noqa: E731
    tile, res_blk = blocked(c), blocked(res)
    ptr = lambda x: x.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    core_kernel.epilogue_f32(ptr(tile), ptr(bias), ptr(res_blk), ctypes.c_int32(flags))
    out = tile.reshape(16, 16, 4, 4).transpose(0, 2, 1, 3).reshape(64, 64)
    use_bias, gelu, use_res = bool(flags & 1), bool(flags & 2), bool(flags & 4)
    ref = nat.apply_epilogue(c, bias if use_bias else None, gelu, res if use_res else None)
    np.testing.assert_array_equal(out, ref)
    exact = epilogue_exact(c, bias if use_bias else None, gelu, res if use_res else None)
    bound = epilogue_bound(np.zeros((64, 64)), c, bias if use_bias else None, gelu, res if use_res else None)
    assert np.all(np.abs(out - exact) <= bound)

# ---- the f32_f32 design (dataflow v2): plan, simulation, recorded IRON program, build script ----

import iron_layer  # noqa: E402

WHISPER_F32 = [(256, 512, 3000), (512, 512, 1500), (512, 2048, 1500), (2048, 512, 1500), (1536, 512, 1500)]


def _coverage(idx: np.ndarray, n: int) -> np.ndarray:
    """How often each of n elements was touched; raises if an index is outside [0, n)."""
    assert idx.min() >= 0 and idx.max() < n
    return np.bincount(idx, minlength=n)


@pytest.mark.parametrize("M,K,N,stream_a", [(1500, 512, 512, False), (300, 2048, 256, False), (257, 64, 512, False),
                                            (3000, 256, 512, False), (600, 128, 512, True)])
def test_f32_design_computes_the_contract_in_place(M, K, N, stream_a):
    """simulate_f32 runs the f32_f32 plan (shim transfers checked encodable and inside A/B/C, memtile re-layouts,
    the slab replayed per column block or A streamed, the core's acquire order, RNE rounding of A in the core, C
    un-blocking) on fp32 A of an exact height. Against float64 on the RNE-rounded operands it can differ only by
    the order of float64 sums: |c - ref| <= 2 K 2^-53 (|A|.|B|); against the contract's fp32 reference by fp32
    summation order (2 K 2^-23 |A|.|B|). A, the packed B and C are each covered exactly: nothing outside, nothing
    missed; C rows written twice (the overlapping last block) got the same bits (checked inside simulate_f32)."""
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((M, K)).astype(np.float32), rng.standard_normal((K, N)).astype(np.float32)
    packed = nat.pack_b(b)
    b16 = bf16_bits_to_f32(np.asarray(packed.data)).astype(np.float64)
    trace = {}
    c = design.simulate_f32(a.reshape(-1), b16, M, packed.Kpad, packed.Npad, stream_a, trace)
    a16, bb = bf16_round(a).astype(np.float64), bf16_round(b).astype(np.float64)
    mag = np.abs(a16) @ np.abs(bb)
    assert np.all(np.abs(c - a16 @ bb) <= 2 * K * 2.0**-53 * mag + 1e-300)
    assert np.all(np.abs(c - nat.reference_gemm(a, packed)) <= 2 * K * 2.0**-23 * mag * 1.01 + 1e-30)
    plan = design.plan_f32(M, K, N, stream_a)
    reads_a = _coverage(trace["a"], M * K)
    assert reads_a.min() >= 1, "every element of A is read"
    assert _coverage(trace["b"], K * N).min() == len(plan.blocks), "B read once per 256-row block"
    writes = _coverage(trace["c"], M * N).reshape(M, N)
    overlap = len(plan.blocks) * 256 - M
    assert writes.min() == 1 and writes.sum() == len(plan.blocks) * 256 * N
    assert np.all(writes[M - 256:M - 256 + overlap] == 2) and np.all(writes[:M - 256] == 1)
    a_passes = 1 if plan.resident else N // 256
    assert reads_a.max() == 2 * a_passes if overlap else reads_a.max() == a_passes


@pytest.mark.parametrize("K,N,M", WHISPER_F32)
@pytest.mark.parametrize("stream_a", [False, True])
def test_f32_transfers_are_encodable_for_whisper(K, N, M, stream_a):
    """Every shim BD of the Whisper encoder's kernels (and the 256-row kernel) fits the AIE-ML limits and stays in
    its tensor; the memtile re-layouts fit their buffers; L1 and memtile budgets hold."""
    for rows in (M, 256):
        plan = design.plan_f32(rows, K, N, stream_a)
        design.check_plan_f32(plan)
        assert plan.blocks[-1] + 256 == rows and plan.blocks[0] == 0
        assert plan.l1_bytes() == 2 * 8192 + 2 * 4096 + 16384 <= design.L1_LIMIT
        assert plan.memtile_bytes() <= design.MEMTILE_BYTES
    assert plan.resident == (K <= 1024 and not stream_a)


def test_f32_limits_and_what_the_shim_cannot_encode():
    assert design.block_starts(1500) == [0, 256, 512, 768, 1024, 1244]
    assert design.block_starts(256) == [0] and design.block_starts(257) == [0, 1]
    assert design.a_resident(1024) and not design.a_resident(1536)
    assert design.a_slab_depth(512) == 2 and design.a_slab_depth(1024) == 1
    for bad in [(255, 64, 256), (1500, 60, 256), (1500, 64, 300), (1500, 64, 16640)]:
        with pytest.raises(ValueError):
            design.plan_f32(*bad)
    # The old tail plan replicated row M-1 with a stride-0 row dimension: only the repeat dimension may do that.
    with pytest.raises(ValueError, match="stride 0"):
        design.check_shim_tap(design.Tap(1499 * 512, (1, 1, 36, 512), (0, 0, 0, 1)), 4, 1500 * 512)
    with pytest.raises(ValueError, match="10-bit"):  # a 1024-wide fp32 row is 1024 words: over the d0 wrap
        design.check_shim_tap(design.Tap(0, (1, 1, 64, 1024), (0, 0, 1024, 1)), 4, 64 * 1024)
    with pytest.raises(ValueError, match="outside"):
        design.check_shim_tap(design.Tap(1245 * 512, (1, 1, 256, 512), (0, 0, 512, 1)), 4, 1500 * 512)
    design.check_shim_tap(design.Tap(0, (64, 1, 1, 32), (0, 0, 0, 1)), 4, 32)  # repeat with stride 0: fine


@pytest.mark.parametrize("M,K,N", [(1500, 512, 512), (1500, 2048, 512), (3000, 256, 512), (1500, 512, 2048)])
def test_f32_iron_program_as_recorded(M, K, N):
    """iron_program_f32 through the recording stand-in of IRON: the program a real build hands to mlir-aie."""
    plan = design.plan_f32(M, K, N)
    rec = iron_layer.Recorder()
    assert design.iron_program_f32(plan, rec) is rec and rec.resolved and rec.device == "npu1_4col"
    f32, bf16 = rec.tensor_type(1, np.float32).dtype, "bfloat16"
    # kernels: the object file build_kernels.py compiles, with the C signatures gemm_bf16.cc defines
    kernels = {k.name: k for k in rec.kernels}
    assert {k.bin_name for k in rec.kernels} == {design.KERNEL_OBJECT}
    a_l1, b_l1, c_l1 = (iron_layer.TensorTy(64 * 32, f32), iron_layer.TensorTy(32 * 64, bf16),
                        iron_layer.TensorTy(64 * 64, f32))
    assert kernels["matmul_f32a_bf16_f32"].arg_types == [a_l1, b_l1, c_l1]
    assert kernels["zero_f32"].arg_types == [c_l1]
    src = (AIE / "gemm_bf16.cc").read_text()
    assert "void matmul_f32a_bf16_f32(const float* __restrict a, const bfloat16* __restrict b, float* __restrict c)" \
        in src and "void zero_f32(float* __restrict c)" in src
    # workers: 16 cores, each one C tile per pass, K/32 (A half, B half) steps, acquires balanced
    assert sorted((w.placement.col, w.placement.row) for w in rec.workers) == \
        [(c, r) for c in range(4) for r in range(2, 6)]
    rt = rec.runtimes[0]
    assert rt.started == rec.workers and all(w.while_true for w in rec.workers)
    for w in rec.workers:
        col, row = w.placement.col, w.placement.row - 2
        a_h, b_h, c_h = w.fn_args[:3]
        A, B, C = a_h.fifo.name, b_h.fifo.name, c_h.fifo.name
        assert (A, B, C) == (f"A_L2L1_{row}", f"B_L2L1_{col}", f"C_L1L2_{col}_{row}")
        assert w.trace == [("acquire", C, 1), ("call", "zero_f32", (C,)),
                           ("loop", K // 32, [("acquire", A, 1), ("acquire", B, 1),
                                              ("call", "matmul_f32a_bf16_f32", (A, B, C)),
                                              ("release", A, 1), ("release", B, 1)]),
                           ("release", C, 1)]
        l1 = sum(h.depth * h.fifo.obj_type.nbytes for h in (a_h, b_h, c_h))
        assert l1 == plan.l1_bytes() <= design.L1_LIMIT
    # fifos and memtile links
    for i in range(4):
        a_in, a_out = rec.fifos[f"A_L3L2_{i}"], rec.fifos[f"A_L2L1_{i}"]
        assert a_in.obj_type == iron_layer.TensorTy(plan.a_l2_len, f32) and a_in.depth == plan.a_depth
        (mem,) = a_in.consumers
        assert [tuple(d) for d in mem.dims_from_stream or []] == list(plan.a_l2_from_stream)
        assert [tuple(d) for d in a_out.dims_to_stream] == list(plan.a_l1_dims)
        assert a_out.repeat_count == (N // 256 if plan.resident and N > 256 else None)
        assert sorted(h.endpoint.placement.col for h in a_out.consumers) == [0, 1, 2, 3]
        assert {h.endpoint.placement.row for h in a_out.consumers} == {2 + i}, "A of core row i"
        b_out = rec.fifos[f"B_L2L1_{i}"]
        assert [tuple(d) for d in b_out.dims_to_stream] == list(plan.b_l1_dims)
        assert {(h.endpoint.placement.col, h.endpoint.placement.row) for h in b_out.consumers} == \
            {(i, r) for r in range(2, 6)}, "B of core column i"
        c_out = rec.fifos[f"C_L2L3_{i}"]
        assert [tuple(d) for d in c_out.dims_to_stream] == list(plan.c_l2_dims)
        links = [ln for ln in rec.links if ln.placement == iron_layer.Tile(i, 1)]
        assert sorted(ln.kind for ln in links) == ["join", "split", "split"]
        join = next(ln for ln in links if ln.kind == "join")
        assert join.offsets == [0, 4096, 8192, 12288]
        # DMA channels: a memtile has 6 S2MM and 6 MM2S, a shim 2 of each
        assert sum(len(ln.srcs) for ln in links) == 6 and sum(len(ln.dsts) for ln in links) == 3
        shim = [t for t in rec.runtimes[0].transfers if t.placement == iron_layer.Tile(i, 0)]
        assert len({t.fifo for t in shim if t.kind == "fill"}) == 2 and len({t.fifo for t in shim
                                                                          if t.kind == "drain"}) == 1
        memtile = (mem.depth * a_in.obj_type.nbytes + rec.fifos[f"B_L3L2_{i}"].depth * 4096 +
                   c_out.depth * c_out.obj_type.nbytes)
        assert memtile == plan.memtile_bytes() <= design.MEMTILE_BYTES
    # the runtime sequence: arguments A, B, C; each shim moves its own column's fifos; every task group finished
    assert rt.arg_types == [rec.tensor_type(M * K, np.float32), rec.tensor_type(K * N, bf16),
                            rec.tensor_type(M * N, np.float32)]
    assert not rt.groups_open and rt.groups_finished
    for t in rt.transfers:
        col = t.placement.col
        assert t.placement.row == 0 and t.fifo.endswith(f"_{col}")
        assert (t.kind, t.tensor) in {("fill", "A"), ("fill", "B"), ("drain", "C")}
        assert t.wait == (t.kind == "drain")
    for g in rt.groups_finished:
        for col in range(4):
            assert sum(t.task_group == g and t.placement.col == col for t in rt.transfers) <= 16, "shim BDs"
    # the recorded transfers are the plan's, and cover A, B and C exactly
    want = {"A": [], "B": [], "C": []}
    for start in plan.blocks:
        for i in range(4):
            want["A"] += [(i, t) for t in plan.a_taps(start, i)]
            want["B"] += [(i, t) for t in plan.b_taps(start, i)]
            want["C"] += [(i, t) for t in plan.c_taps(start, i)]
    size = {"A": M * K, "B": K * N, "C": M * N}
    for tensor in "ABC":
        got = [(t.placement.col, design.Tap(t.tap.offset, t.tap.sizes, t.tap.strides))
               for t in rt.transfers if t.tensor == tensor]
        assert got == want[tensor]
        assert all(t.tap.tensor_dims == (1, size[tensor]) for t in rt.transfers if t.tensor == tensor)
        cover = _coverage(np.concatenate([design.tap_indices(tap) for _, tap in got]), size[tensor])
        assert cover.min() >= 1


# ---- designed, not wired: a head's Q rows and K^T read in place (issue 15 item 2) ----

@pytest.mark.parametrize("T,H,h", [(300, 2, 1), (512, 3, 2)])
def test_head_qkt_read_in_place_design(T, H, h):
    """S_h = Q_h K_h^T with Q and K the projections' [T, H*64] outputs read in place (row stride H*64, base at the
    head's columns) and S_h [T, T] written in place, N = T by an overlapping last column block. Against float64 on
    the RNE-rounded operands: only float64 summation order differs (2 K 2^-53 |Q|.|K|^T). Exactly the head's 64
    columns of Q and K are read; S is covered exactly, overlapped rows/columns twice with the same bits."""
    D, ld = 64, H * 64
    rng = np.random.default_rng(11)
    q, k = rng.standard_normal((T, ld)).astype(np.float32), rng.standard_normal((T, ld)).astype(np.float32)
    plan = design.plan_f32(T, D, T, b_kind="kt", lda=ld, ldb=ld, ldc=T)
    base = h * D  # the backend would import the sub-buffers at the head's first column
    a, b = q.reshape(-1)[base:base + plan.a_len], k.reshape(-1)[base:base + plan.b_len]
    trace = {}
    s = design.simulate_f32(a, b, T, D, T, trace=trace, plan=plan)
    qh, kh = bf16_round(q[:, base:base + D]).astype(np.float64), bf16_round(k[:, base:base + D]).astype(np.float64)
    assert np.all(np.abs(s - qh @ kh.T) <= 2 * D * 2.0**-53 * (np.abs(qh) @ np.abs(kh).T) + 1e-300)
    head_cols = (np.arange(T)[:, None] * ld + np.arange(D)[None, :]).reshape(-1)
    for name in ("a", "b"):
        assert set(np.unique(trace[name])) == set(head_cols), f"{name}: exactly the head's columns"
    writes = _coverage(trace["c"], T * T).reshape(T, T)
    rows_twice = np.zeros(T, bool)
    rows_twice[T - 256:(len(plan.blocks) - 1) * 256] = True
    cols_twice = np.zeros(T, bool)
    cols_twice[T - 256:(len(plan.col_blocks) - 1) * 256] = True
    assert np.array_equal(writes, (1 + rows_twice[:, None]) * (1 + cols_twice[None, :]))
    assert (T % 256 != 0) == rows_twice.any(), "the case has an overlap exactly when T is not whole blocks"


def test_head_qkt_whisper_encodable_and_recorded():
    """Whisper's heads (T 1500, 8 heads of 64): every transfer encodable and inside Q, K and S; the recorded program
    uses the fp32-B kernel and its own xclbin (static key differs from the weights' kernels)."""
    plan = design.plan_f32(1500, 64, 1500, b_kind="kt", lda=512, ldb=512, ldc=1500)
    design.check_plan_f32(plan)
    assert plan.l1_bytes() == design.L1_LIMIT and plan.col_blocks[-1] == 1244
    assert plan.static_key != design.plan_f32(1500, 64, 1536).static_key
    rec = iron_layer.Recorder()
    design.iron_program_f32(plan, rec)
    f32 = rec.tensor_type(1, np.float32).dtype
    (mm,) = [k for k in rec.kernels if k.name.startswith("matmul")]
    assert mm.name == "matmul_f32a_f32b_f32" and mm.arg_types[1] == iron_layer.TensorTy(32 * 64, f32)
    assert rec.runtimes[0].arg_types == [rec.tensor_type(n, np.float32) for n in (plan.a_len, plan.b_len, 1500 * 1500)]
    assert "void matmul_f32a_f32b_f32(const float* __restrict a, const float* __restrict b, float* __restrict c)" \
        in (AIE / "gemm_bf16.cc").read_text()
    for g in rec.runtimes[0].groups_finished:
        for col in range(4):
            assert sum(t.task_group == g and t.placement.col == col for t in rec.runtimes[0].transfers) <= 16


def test_core_kernel_rounds_fp32_b_with_round_to_nearest_even(core_kernel):
    """matmul_f32a_f32b_f32: A = [I 0] (exact), B fp32 with ties and near-ties: C's first 32 rows are RNE(B) bit
    for bit, which the AIE's default (floor) would not give."""
    rng = np.random.default_rng(12)
    hi = rng.integers(0x3F00, 0x4100, (32, 64)).astype(np.uint32) << 16
    low = rng.choice(np.array([0x8000, 0x7FFF, 0x8001, 0x0001, 0xFFFF], np.uint32), (32, 64))
    sign = rng.choice(np.array([0, 0x80000000], np.uint32), (32, 64))
    b = (hi | low | sign).view(np.float32)
    a = np.zeros((64, 32), np.float32)
    a[np.arange(32), np.arange(32)] = 1.0
    a_blk = np.ascontiguousarray(a.reshape(16, 4, 4, 8).transpose(0, 2, 1, 3)).reshape(-1)
    b_blk = np.ascontiguousarray(b.reshape(4, 8, 16, 4).transpose(0, 2, 1, 3)).reshape(-1)
    c = np.zeros(64 * 64, np.float32)
    ptr = lambda x: x.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    core_kernel.matmul_f32a_f32b_f32(ptr(a_blk), ptr(b_blk), ptr(c))
    c = c.reshape(16, 16, 4, 4).transpose(0, 2, 1, 3).reshape(64, 64)
    np.testing.assert_array_equal(c[:32], bf16_round(b))
    assert not c[32:].any()
    floor_ = np.where(sign != 0, b.view(np.uint32).astype(np.uint64) + 0xFFFF, b.view(np.uint32)) >> 16 << 16
    assert np.any(floor_.astype(np.uint32).view(np.float32) != bf16_round(b)), "data must tell floor from RNE"


def test_core_kernel_on_the_plans_layouts(core_kernel):
    """The host-compiled matmul_f32a_bf16_f32 fed with the objects the plan's memtile re-layouts produce (A slab
    re-laid half-major then blocked 4x8, B halves blocked 8x4) and un-blocked by the C join dims: C = A.B exactly
    (small integers: every product and sum exact in bf16/fp32)."""
    K, N = 128, 256
    plan = design.plan_f32(256, K, N)
    rng = np.random.default_rng(5)
    a = rng.integers(-8, 8, (64, K)).astype(np.float32)  # core row 0's slab
    b = rng.integers(-8, 8, (K, N)).astype(np.float32)
    b_packed = bf16_bits_to_f32(np.asarray(nat.pack_b(b).data))
    slab = np.empty(64 * K, np.float32)
    slab[design._indices(0, plan.a_l2_from_stream)] = a.reshape(-1)  # memtile S2MM
    a_objs = slab[design._indices(0, plan.a_l1_dims)].reshape(-1, 64 * 32)  # memtile MM2S, one column block
    tap = plan.b_taps(0, 0)[0]  # column 0: n-tile 0 first
    b_stream = b_packed[design.tap_indices(tap)][:K * 64].reshape(-1, 32 * 64)
    b_l1 = design._indices(0, plan.b_l1_dims)
    ptr = lambda x: x.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    c = np.zeros(64 * 64, np.float32)
    core_kernel.zero_f32(ptr(c))
    for h in range(K // 32):
        a_h = np.ascontiguousarray(a_objs[h])
        b_h = np.ascontiguousarray((b_stream[h][b_l1].view(np.uint32) >> 16).astype(np.uint16))
        core_kernel.matmul_f32a_bf16_f32(ptr(a_h), ptr(b_h), ptr(c))
    c = c.reshape(16, 16, 4, 4).transpose(0, 2, 1, 3).reshape(64, 64)
    np.testing.assert_array_equal(c, a @ b[:, :64])


import attention_design as attn  # noqa: E402


def test_attention_design_fits_l1_and_covers_every_query_tile():
    assert sum(attn.l1_bytes().values()) <= attn.L1_LIMIT
    assert attn.memtile_bytes() <= design.MEMTILE_BYTES // 2
    items = attn.work_items(8, 1500)
    assert len(items) == attn.CORES and len({len(core) for core in items}) == 1, "every core runs the same loop"
    assert set(x for core in items for x in core) == {(h, s) for h in range(8) for s in attn.q_tile_starts(1500)}
    assert attn.q_tile_starts(1500)[-1] == 1468 and attn.passes(1500) == 3
    assert attn.key_tiles(1500)[-1] == (1468, 4), "the last key tile ends at T; the core skips its 4 counted keys"


@pytest.mark.parametrize("T,H", [(1500, 8), (1500, 6), (97, 3), (32, 1)])
def test_attention_design_transfers_encodable(T, H):
    """Every shim transfer of the plan is a valid BD inside its tensor (whisper-base: T 1500, 8 heads), the
    memtile's un-blocking of O is encodable, the L1 budget holds; T < 32 is refused."""
    attn.check_plan(attn.plan(T, H))
    with pytest.raises(ValueError):
        attn.plan(31, 8)


def test_attention_iron_program_recorded():
    """The IRON program, recorded: 16 workers, K and V broadcast from shims 0 and 1 to all of them, Q split and O
    joined per column with O un-blocked by the memtile, every core's loop as the core kernel expects (per item:
    acquire O and Q, the key tiles, the overlapped tail with its skip, finish), each fill/drain encodable and
    covering each head's tiles once per pass."""
    import iron_layer

    T, H, scale = 1500, 8, 0.125
    rec = attn.iron_program(T, H, scale, iron_layer.Recorder())
    assert rec.resolved and len(rec.workers) == 16
    assert {(w.placement.col, w.placement.row) for w in rec.workers} == {(c, r) for c in range(4) for r in range(2, 6)}
    assert len(rec.fifos["K"].consumers) == 16 and len(rec.fifos["V"].consumers) == 16
    assert rec.fifos["K"].depth == 2 and rec.fifos["V"].depth == 1
    assert rec.fifos["O_L2L3_0"].dims_to_stream == attn.o_l2_dims()
    l1 = rec.fifos["K"].obj_type.nbytes * 2 + rec.fifos["V"].obj_type.nbytes + \
        rec.fifos["Q_L2L1_0_0"].obj_type.nbytes + rec.fifos["O_L1L2_0_0"].obj_type.nbytes
    static = sum(v for k, v in attn.l1_bytes().items() if "static" in k)
    assert l1 + static == sum(attn.l1_bytes().values()) <= attn.L1_LIMIT
    trace = rec.workers[5].trace
    assert trace[0][0] == "loop" and trace[0][1] == H * attn.passes(T)
    body = trace[0][2]
    assert body[:4] == [("acquire", "O_L1L2_1_1", 1), ("acquire", "Q_L2L1_1_1", 1),
                        ("call", "attention_q_tile", ("Q_L2L1_1_1", "O_L1L2_1_1")), ("release", "Q_L2L1_1_1", 1)]
    assert body[4][0] == "loop" and body[4][1] == T // 32
    assert ("call", "attention_scores", ("K", scale, 0)) in body[4][2]
    assert ("call", "attention_scores", ("K", scale, 32 - T % 32)) in body[5:]
    assert body[-2:] == [("call", "attention_finish", ("O_L1L2_1_1",)), ("release", "O_L1L2_1_1", 1)]
    rt = rec.runtimes[0]
    assert not rt.groups_open and len(rt.groups_finished) == H * attn.passes(T)
    pl = attn.plan(T, H)
    for t in rt.transfers:
        tap = design.Tap(t.tap.offset, t.tap.sizes, t.tap.strides)
        design.check_shim_tap(tap, 4, pl.o_len if t.tensor == "D" else pl.tensor_len)
        assert (t.placement.col, t.placement.row)[1] == 0
    k_fills = [t for t in rt.transfers if t.fifo == "K"]
    assert {t.placement.col for t in k_fills} == {0} and {t.placement.col for t in rt.transfers if t.fifo == "V"} == {1}
    assert len(k_fills) == H * attn.passes(T) * 2  # the whole tiles in one BD, the overlapped tail in another
    drains = [t for t in rt.transfers if t.kind == "drain"]
    assert len(drains) == H * attn.passes(T) * 16 and all(t.wait for t in drains)
    assert {t.tensor for t in drains} == {"D"} and {t.tensor for t in rt.transfers if t.fifo == "V"} == {"C"}
    written = np.zeros(pl.o_len, np.int64)
    for t in drains:
        written[design.tap_indices(design.Tap(t.tap.offset, t.tap.sizes, t.tap.strides))] += 1
    assert (written > 0).all(), "every element of O is written"


@pytest.mark.parametrize("T,H", [(300, 2), (97, 3)])
def test_attention_design_computes_softmax_attention(T, H):
    """The fused design (online softmax over 32-key tiles, bf16 Q/K/V/P, head columns read through strides) against
    float64 attention, within the fused attention contract's bound (numerics.attention_bound, derived there: the
    design's float64 sums and exact exp are inside the contract's fp32 allowances)."""
    from numerics import attention_bound, attention_exact

    rng = np.random.default_rng(4)
    q, k, v = (0.5 * rng.standard_normal((T, H * attn.D))).astype(np.float32), \
        (0.5 * rng.standard_normal((T, H * attn.D))).astype(np.float32), \
        rng.standard_normal((T, H * attn.D)).astype(np.float32)
    scale = attn.D ** -0.5
    o = attn.simulate(q.reshape(-1), k.reshape(-1), v.reshape(-1), T, H, scale, ldo=H * attn.D,
                      o_head=attn.D).reshape(T, H * attn.D)
    for h in range(H):
        cols = slice(h * attn.D, (h + 1) * attn.D)
        qh, kh, vh = (x[:, cols] for x in (q, k, v))
        err = np.abs(o[:, cols] - attention_exact(qh, kh.T, vh, scale))
        bound = attention_bound(qh, kh.T, vh, scale)
        assert np.all(err <= bound), f"head {h}: max error/bound {np.max(err / bound)}"


# ---- int8 (A8W8) core kernel (issue 13 item 3): kernels/aie/gemm_int8.cc on the host stand-in ----

@pytest.fixture(scope="module")
def int8_kernel(tmp_path_factory):
    return host_kernel(tmp_path_factory, "gemm_int8.cc")


def _blocked(x: np.ndarray, r: int, s: int) -> np.ndarray:
    """A 64x64 tile as the memtile hands it to the core: r x s blocks, each row-major, blocks row-major."""
    m, k = x.shape
    return np.ascontiguousarray(x.reshape(m // r, r, k // s, s).transpose(0, 2, 1, 3).reshape(-1))


def _unblocked(x: np.ndarray, r: int, t: int) -> np.ndarray:
    return x.reshape(64 // r, 64 // t, r, t).transpose(0, 2, 1, 3).reshape(64, 64)


def _quantize_rows(a: np.ndarray):
    """The contract's per-row dynamic quantisation of A, in fp32 as the host does it (emulator quantize_run)."""
    amax = np.abs(a).max(axis=1).astype(np.float32)
    scale = (amax / np.float32(127)).astype(np.float32)
    inv = np.where(scale > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    return np.clip(np.rint(a * inv[:, None]), -127, 127).astype(np.int8), scale


@pytest.mark.parametrize("K", [64, 192])
def test_int8_core_kernel_matches_the_emulator_bit_for_bit(int8_kernel, K):
    """gemm_int8.cc: acc += qA.qB over K/64 calls (aie::mmul<4,8,8> int8 blocks) equals the exact integer product,
    and its dequantising epilogue gives emulator_gemm_int8's fp32 results bit for bit."""
    rng = np.random.default_rng(K)
    a = rng.standard_normal((64, K)).astype(np.float32)
    b = rng.standard_normal((K, 64)).astype(np.float32)
    b[:, 5] *= 1e-3  # columns and rows of very different magnitude: the scales must be per column / per row
    a[7] *= 300
    qb_native = nat.quantize_b_int8(b)
    qb = np.ascontiguousarray(qb_native.q[:, :K].T)  # [K, N] int8
    sb = np.ascontiguousarray(qb_native.scale, np.float32)
    qa, sa = _quantize_rows(a)
    ptr = lambda x: x.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    acc = np.empty(64 * 64, np.int32)
    int8_kernel.zero_i32(ptr(acc))
    for kt in range(0, K, 64):
        a_blk = _blocked(qa[:, kt:kt + 64], 4, 8)
        b_blk = _blocked(qb[kt:kt + 64], 8, 8)
        int8_kernel.matmul_i8_i32(ptr(a_blk), ptr(b_blk), ptr(acc))
    np.testing.assert_array_equal(_unblocked(acc, 4, 8), qa.astype(np.int64) @ qb.astype(np.int64))
    c = np.empty(64 * 64, np.float32)
    int8_kernel.dequant_i32_f32(ptr(acc), ptr(sa), ptr(sb), ptr(c))
    np.testing.assert_array_equal(_unblocked(c, 4, 8), nat.emulator_gemm_int8(a, qb_native))


# ---- the i8_f32 design (issue 13 item 3): gemm_int8_design.py with gemm_int8.cc's entry points ----

import gemm_int8_design as design_i8  # noqa: E402


def _int8_case(m, k, n, seed):
    """A, B and their quantisation as the contract (and emulator) defines it; padded device shapes."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    a[min(7, m - 1)] *= 300  # rows and columns of very different magnitude: per-row / per-column scales
    b[:, min(5, n - 1)] *= 1e-3
    qb_native = nat.quantize_b_int8(b)
    qb = np.ascontiguousarray(qb_native.q[:, :k].T)
    sb = np.ascontiguousarray(qb_native.scale, np.float32)[:n]
    qa, sa = _quantize_rows(a)
    M, K, N = (-(-m // 256) * 256), (-(-k // 64) * 64), (-(-n // 256) * 256)
    return a, qb_native, design_i8.pack_a(qa, sa, M, K), design_i8.pack_b(qb, sb, K, N), (M, K, N)


@pytest.mark.parametrize("m,k,n", [(256, 64, 256), (300, 200, 300), (512, 128, 512)])
def test_int8_design_computes_the_emulators_int8_bit_for_bit(int8_kernel, m, k, n):
    """The i8_f32 data movement (shim taps, memtile forwards and join, the 4x8 un-blocking of C) with the host-compiled
    core entry points of gemm_int8.cc (and with their numpy stand-ins) gives emulator_gemm_int8's bits."""
    a, qb_native, a_dev, b_dev, (M, K, N) = _int8_case(m, k, n, m + k + n)
    want = nat.emulator_gemm_int8(a, qb_native)
    ptr = lambda x: x.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    cpp = design_i8.CoreKernels(zero=lambda c: int8_kernel.zero_acc_i8(ptr(c)),
                                matmul=lambda a_, b_, c: int8_kernel.matmul_obj_i8(ptr(a_), ptr(b_), ptr(c)),
                                matmul_dequant=lambda a_, b_, c: int8_kernel.matmul_obj_i8_dequant(ptr(a_), ptr(b_),
                                                                                                  ptr(c)))
    for core in (cpp, design_i8.numpy_core()):
        c = design_i8.simulate(a_dev, b_dev, M, K, N, core)
        np.testing.assert_array_equal(c[:m, :n], want)
        assert np.all(c[m:] == 0) and np.all(c[:, n:] == 0), "padding: zero rows and scale-0 columns"


@pytest.mark.parametrize("M,K,N", [(1536, 512, 512), (1536, 512, 2048), (1536, 2048, 512), (256, 512, 16384),
                                   (256, 1536, 512)])
def test_int8_transfers_are_encodable_for_whisper(M, K, N):
    """Whisper-base shapes (encoder, decoder): every shim transfer fits the BD limits and stays in its tensor."""
    design_i8.check_transfers(M, K, N)
    assert design_i8.L1_BYTES <= design.L1_LIMIT and design_i8.memtile_bytes() <= design.MEMTILE_BYTES
    with pytest.raises(ValueError):
        design_i8.check_transfers(300, K, N)  # heights are multiples of 256: the host stages A
    with pytest.raises(ValueError, match="column blocks"):  # the logits (N 51865): over the shim's repeat count,
        design_i8.check_transfers(256, 512, 51968)         # as in the bf16 design (that GEMM stays on the CPU)


@pytest.mark.parametrize("M,K,N", [(256, 64, 256), (1536, 512, 2048)])
def test_int8_iron_program_as_recorded(M, K, N):
    """iron_program through the recording stand-in: kernels with gemm_int8.cc's signatures, 16 workers whose last
    K step runs the epilogue, memtiles that forward A and B unchanged, and the runtime sequence's transfers."""
    rec = iron_layer.Recorder()
    assert design_i8.iron_program(M, K, N, rec) is rec and rec.resolved and rec.device == "npu1_4col"
    obj, c_l1 = iron_layer.TensorTy(4352, "int8"), iron_layer.TensorTy(64 * 64, "float32")
    kernels = {k.name: k for k in rec.kernels}
    assert {k.bin_name for k in rec.kernels} == {"gemm_int8.o"}
    assert kernels["matmul_obj_i8"].arg_types == kernels["matmul_obj_i8_dequant"].arg_types == [obj, obj, c_l1]
    assert kernels["zero_acc_i8"].arg_types == [c_l1]
    src = (AIE / "gemm_int8.cc").read_text()
    for sig in ("void zero_acc_i8(float* c)",
                "void matmul_obj_i8(const int8* __restrict a_obj, const int8* __restrict b_obj, float* __restrict c)",
                "void matmul_obj_i8_dequant(const int8* __restrict a_obj, const int8* __restrict b_obj, float* c)"):
        assert sig in src
    steps = K // 64
    for w in rec.workers:
        col, row = w.placement.col, w.placement.row - 2
        A, B, C = (h.fifo.name for h in w.fn_args[:3])
        assert (A, B, C) == (f"A_L2L1_{row}", f"B_L2L1_{col}", f"C_L1L2_{col}_{row}")
        body = [("acquire", A, 1), ("acquire", B, 1), ("call", "matmul_obj_i8", (A, B, C)), ("release", A, 1),
                ("release", B, 1)]
        last = [("acquire", A, 1), ("acquire", B, 1), ("call", "matmul_obj_i8_dequant", (A, B, C)),
                ("release", A, 1), ("release", B, 1)]
        assert w.trace == [("acquire", C, 1), ("call", "zero_acc_i8", (C,))] + \
            ([("loop", steps - 1, body)] if steps > 1 else []) + last + [("release", C, 1)]
        assert sum(h.depth * h.fifo.obj_type.nbytes for h in w.fn_args[:3]) == design_i8.L1_BYTES
    assert len(rec.workers) == 16
    for i in range(4):
        assert not rec.fifos[f"A_L2L1_{i}"].dims_to_stream and not rec.fifos[f"B_L2L1_{i}"].dims_to_stream
        assert [tuple(d) for d in rec.fifos[f"C_L2L3_{i}"].dims_to_stream] == \
            [tuple(d) for d in design_i8.c_l2_dims()]
    rt = rec.runtimes[0]
    assert rt.arg_types == [rec.tensor_type(design_i8.a_len(M, K), np.int8),
                            rec.tensor_type(design_i8.b_len(K, N), np.int8), rec.tensor_type(M * N, np.float32)]
    assert not rt.groups_open and len(rt.groups_finished) == M // 256
    want = [(bm, i) for bm in range(M // 256) for i in range(4)]
    for tensor, tap in (("A", design_i8.a_tap), ("B", design_i8.b_tap), ("C", design_i8.c_tap)):
        got = [(t.placement.col, design.Tap(t.tap.offset, t.tap.sizes, t.tap.strides))
               for t in rt.transfers if t.tensor == tensor]
        assert got == [(i, tap(M, K, N, bm, i)) for bm, i in want]


def test_int8_build_plan_and_dry_run():
    import build_kernels

    variants, skipped = build_kernels.plan({(512, 512), (2048, 512)}, [256, 1536], "i8_f32")
    assert not skipped and {v["dtype"] for v in variants} == {"i8_f32"} and len(variants) == 4
    assert len({build_kernels.program_key(v) for v in variants}) == 2, "one xclbin per K"
    with pytest.raises(ValueError, match="multiples of 256"):
        build_kernels.plan({(512, 512)}, [300], "i8_f32")
    dry = subprocess.run([sys.executable, str(AIE / "build_kernels.py"), "--shape", "512x512", "--shape", "2048x512",
                          "--dtype", "i8_f32", "--dry-run"], capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert "4 kernel(s) for 2 shape(s); 2 xclbin(s)" in dry.stdout and "m_rows= 1536 i8_f32" in dry.stdout


def test_int8_build_writes_a_manifest_whose_kernels_run_int8_on_the_fake_device(tmp_path, monkeypatch):
    """build() for i8_f32 with the toolchain stubbed: gemm_int8.cc is the Peano source, one xclbin per K, entries of
    dtype i8_f32; the manifest loads and the xrt backend runs int8 weights on them (fake device) with the emulator's
    int8 bits."""
    import build_kernels

    compiled = []

    def fake_run(cmd, cwd, log):
        if "-o" in cmd:  # Peano
            compiled.append(Path(cmd[cmd.index("-o") - 1]).name)
            Path(cmd[cmd.index("-o") + 1]).write_bytes(b"obj")
            return
        k, n, m = (int(x[1:]) for x in Path(cwd).name.split("_")[-3:])  # gemm_i8_f32_k{K}_n{N}_m{M}
        assert (Path(cwd) / "gemm_int8.o").exists()
        nat.npu_fake_insts_i8(m, k, n).astype("<u4").tofile(Path(cwd) / "insts.bin")
        if "--aie-generate-xclbin" in cmd:
            Path(cwd, "final.xclbin").write_bytes(b"fake xclbin")

    def recorded(M, K, N):
        rec = iron_layer.Recorder()
        design_i8.iron_program(M, K, N, rec)
        return f"program K={K} kernels={[k.name for k in rec.kernels]}\naiex.runtime_sequence {{ M={M} N={N} }}"

    monkeypatch.setattr(build_kernels, "run", fake_run)
    monkeypatch.setattr(build_kernels.design_i8, "iron_module", recorded)
    variants, skipped = build_kernels.plan({(512, 512), (128, 512)}, [256, 512], "i8_f32")
    assert not skipped
    tools = {"peano": "/p", "aie_api_include": "/i", "aiecc": "aiecc.py", "xclbinutil": "/x"}
    result = build_kernels.build(variants, tmp_path / "out", tools, tmp_path / "work")
    assert compiled == ["gemm_int8.cc"]
    entries = result["kernels"]
    assert len(entries) == 4 and {e["dtype"] for e in entries} == {"i8_f32"}
    assert len({e["xclbin"] for e in entries}) == 2, "one xclbin per K"
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(result))
    monkeypatch.setenv("XDNA_XRT_COST_MODEL", "0")
    be = nat.npu_fake_backend(str(tmp_path / "out"))
    assert be.supports("int8")[0] and not be.supports("bf16x3")[0]
    rng = np.random.default_rng(12)
    for M, K in ((700, 512), (3, 100)):
        a, b = rng.standard_normal((M, K)).astype(np.float32), rng.standard_normal((K, 500)).astype(np.float32)
        c = be.gemm(a, be.upload(nat.pack_b_in(b, "int8")))
        np.testing.assert_array_equal(c, nat.emulator_gemm_int8(a, nat.quantize_b_int8(b)))
    assert be.fake_stats()["runs"] >= 3
    with pytest.raises(ValueError, match="one build per dtype family"):
        build_kernels.build(variants + build_kernels.plan({(512, 512)}, [256], "bf16_f32")[0], tmp_path / "o2", tools,
                            tmp_path / "w2")


# ---- fused attention core kernel (issue 15 step 3): kernels/aie/attention_bf16.cc on the host stand-in ----

@pytest.fixture(scope="module")
def attention_kernel(tmp_path_factory):
    lib = host_kernel(tmp_path_factory, "attention_bf16.cc", "-O2")
    lib.attention_scores.argtypes = [ctypes.c_void_p, ctypes.c_float, ctypes.c_int32]
    return lib


class CompiledAttentionCore:
    """attention_design.simulate's core interface over the g++-compiled attention_bf16.cc entry points."""

    def __init__(self, lib):
        self.lib = lib

    @staticmethod
    def _ptr(x):
        assert x.dtype == np.float32 and x.flags.c_contiguous
        return x.ctypes.data_as(ctypes.c_void_p)

    def q_tile(self, q, o):
        self.lib.attention_q_tile(self._ptr(q), self._ptr(o))

    def scores(self, k, scale, skip):
        self.lib.attention_scores(self._ptr(k), scale, skip)

    def values(self, v, o):
        self.lib.attention_values(self._ptr(v), self._ptr(o))

    def finish(self, o):
        self.lib.attention_finish(self._ptr(o))


def _attention_operands(T, H, seed, ld=0):
    rng = np.random.default_rng(seed)
    ld = ld or H * attn.D
    q, k = (1.5 * rng.standard_normal((T, ld))).astype(np.float32), (1.5 * rng.standard_normal((T, ld))).astype(np.float32)
    v = rng.standard_normal((T, ld)).astype(np.float32)
    return q, k, v


@pytest.mark.parametrize("T,H,ld,o_cols", [
    (1500, 1, 0, False),   # whisper-base encoder self-attention, one head (the host stand-in is scalar): 47 tiles
    (1500, 3, 0, False),   # three heads read in place from one [1500, 192] tensor, O as [H, T, 64]
    (97, 2, 160, True),    # tails (97 = 3 x 32 + 1), a row stride wider than the heads, O as [T, H * 64]
    (64, 1, 0, False),     # whole tiles, one pass with 14 spare slots
    (32, 1, 0, False),     # a single key tile
])
def test_attention_core_kernel_within_bound_of_emulator(attention_kernel, T, H, ld, o_cols):
    """attention_bf16.cc run through the design's transfers (simulate: strided head reads, overlapped last query
    and key tiles, the memtile's un-blocking of O) against float64 attention within the contract's bound
    (numerics.attention_bound), and against the emulator's fused attention (the reference) within the same bound.
    Every row of every head is written."""
    from numerics import attention_bound, attention_exact

    q, k, v = _attention_operands(T, H, seed=T + H, ld=ld)
    scale = attn.D ** -0.5
    ldo, o_head = (H * attn.D, attn.D) if o_cols else (0, -1)
    pl = attn.plan(T, H, ld, ldo, o_head)
    flat = lambda x: np.ascontiguousarray(x.reshape(-1)[:pl.tensor_len])  # noqa: E731
    o_flat = attn.simulate(flat(q), flat(k), flat(v), T, H, scale, CompiledAttentionCore(attention_kernel), ld,
                           ldo, o_head)
    for h in range(H):
        cols = slice(h * attn.D, (h + 1) * attn.D)
        qh, kh, vh = q[:, cols], k[:, cols], v[:, cols]
        o_h = o_flat[h * pl.o_head + np.arange(T)[:, None] * pl.ldo + np.arange(attn.D)[None, :]]
        assert np.isfinite(o_h).all(), "a row of the head was not written"
        bound = attention_bound(qh, kh.T, vh, scale)
        err = np.abs(o_h - attention_exact(qh, kh.T, vh, scale))
        assert np.all(err <= bound), f"head {h}: max error/bound vs exact {np.max(err / bound)}"
        emu = nat.emulator_attention(np.ascontiguousarray(qh), np.ascontiguousarray(kh), np.ascontiguousarray(vh),
                                     scale)
        diff = np.abs(o_h - emu)
        assert np.all(diff <= bound), f"head {h}: max difference/bound vs emulator {np.max(diff / bound)}"
    assert np.isfinite(o_flat).sum() == T * H * attn.D, "nothing outside the heads' outputs is written"


def test_attention_core_kernel_nan_rows(attention_kernel):
    """A query row whose scores hold NaN or +Inf gives NaN in that row only, as the emulator (ORT's Softmax) does."""
    q, k, v = _attention_operands(70, 1, seed=9)
    q[3, 5] = np.nan
    q[35, 0] = np.inf  # that row's scores are +-Inf: +Inf makes it NaN
    o = attn.simulate(q.reshape(-1), k.reshape(-1), v.reshape(-1), 70, 1, 0.125,
                      CompiledAttentionCore(attention_kernel)).reshape(70, 64)
    emu = nat.emulator_attention(q, k, v, 0.125)
    for row in (3, 35):
        assert np.isnan(o[row]).all() and np.isnan(emu[row]).all()
    ok = np.ones(70, bool)
    ok[[3, 35]] = False
    assert np.isfinite(o[ok]).all()


def test_attention_core_kernel_rounds_to_nearest_even(attention_kernel):
    """The core sets round-to-nearest-even before converting (the AIE-ML default rounds toward minus infinity):
    with equal scores the output is exactly bf16(V), and V = 1 + 2^-8 + 2^-20 rounds up to 1 + 2^-7."""
    q = np.zeros((32, 64), np.float32)
    k = np.zeros((32, 64), np.float32)
    v = np.zeros((32, 64), np.float32)
    v[:, 0] = np.float32(1 + 2.0**-8 + 2.0**-20)  # RNE: 1 + 2^-7; floor would give 1
    o = attn.simulate(q.reshape(-1), k.reshape(-1), v.reshape(-1), 32, 1, 1.0,
                      CompiledAttentionCore(attention_kernel)).reshape(32, 64)
    np.testing.assert_array_equal(o[:, 0], np.float32(1 + 2.0**-7))


def test_attention_build_dry_run_and_manifest_entries(tmp_path, monkeypatch):
    """build_kernels.py --dtype attn_f32: the dry run describes the recorded program; shapes the design cannot take
    are refused; build_attention (toolchain commands stubbed) compiles attention_bf16.cc once, one xclbin per
    (T, H, scale), and writes attn_f32 manifest entries with the program's constants."""
    import build_kernels

    script = str(AIE / "build_kernels.py")
    dry = subprocess.run([sys.executable, script, "--dtype", "attn_f32", "--attention", "1500x8", "--dry-run"],
                         capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert "T= 1500 H=  8 scale=1 attn_f32: 3 pass(es) per head, 47 key tiles" in dry.stdout
    for bad in (["--dtype", "attn_f32", "--attention", "20x8"], ["--attention", "1500x8"],
                ["--dtype", "attn_f32"]):
        r = subprocess.run([sys.executable, script, *bad, "--dry-run"], capture_output=True, text=True)
        assert r.returncode == 2, bad

    sources = []

    def fake_run(cmd, cwd, log):
        if "-o" in cmd:  # Peano
            sources.append(Path(cmd[cmd.index("-c") + 1]).name)
            Path(cmd[cmd.index("-o") + 1]).write_bytes(b"obj")
            return
        assert "attention_q_tile" in Path(cwd, "design.mlir").read_text()
        Path(cwd, "insts.bin").write_bytes(b"insts")
        Path(cwd, "final.xclbin").write_bytes(b"xclbin")

    monkeypatch.setattr(build_kernels, "run", fake_run)
    monkeypatch.setattr(build_kernels.design_attn, "iron_module", lambda *args: "attention_q_tile ...")
    monkeypatch.setenv("AIE_XCLBINUTIL_PATH", "/nonexistent/xclbinutil")
    tools = {"peano": "/p", "aie_api_include": "/i", "aiecc": "aiecc.py", "xclbinutil": "/x"}
    variants = [build_kernels.parse_attention("1500x8"), build_kernels.parse_attention("1500x6:0.2")]
    result = build_kernels.build_attention(variants, tmp_path / "out", tools, tmp_path / "work")
    assert sources == ["attention_bf16.cc"]
    entries = result["kernels"]
    assert [(e["dtype"], e["T"], e["H"], e["ld"], e["ldo"], e["o_head"], e["scale"]) for e in entries] == \
        [("attn_f32", 1500, 8, 512, 64, 96000, 1.0), ("attn_f32", 1500, 6, 384, 64, 96000, float(np.float32(0.2)))]
    assert len({e["xclbin"] for e in entries}) == 2
    assert all((tmp_path / "out" / e["xclbin"]).is_file() and (tmp_path / "out" / e["insts"]).is_file()
               for e in entries)
