"""The AIE GEMM design (kernels/aie) without the AIE toolchain: its planned data movement, the core kernel's
blocked indexing (compiled for the host against a stand-in of the AIE API), the shape extractor and the build
script's behaviour when mlir-aie/Peano are absent."""

from __future__ import annotations

import ctypes
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
import model_shapes  # noqa: E402


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def bf16_rne(x: np.ndarray) -> np.ndarray:
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint32) << 16).view(np.float32)


@pytest.mark.parametrize("M,K,N", [(256, 64, 256), (512, 128, 512), (256, 200, 300)])
def test_design_data_movement_computes_the_contract(M, K, N):
    """simulate() runs the design's shim transfers, memtile re-layouts, core acquire order and C un-blocking on
    the packed B that pack_b (the EP's code) writes; the result must be the contract's GEMM."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((M, K)).astype(np.float32), rng.standard_normal((K, N)).astype(np.float32)
    packed = nat.pack_b(b)
    Mp, Kp, Np = M, packed.Kpad, packed.Npad
    a16 = np.zeros((Mp, Kp), np.float32)
    a16[:, :K] = bf16_rne(a)  # what the host stages into the A buffer
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


@pytest.fixture(scope="module")
def core_kernel(tmp_path_factory):
    cxx = shutil.which("g++")
    if not cxx:
        pytest.skip("g++ not available")
    so = tmp_path_factory.mktemp("aie") / "gemm_mock.so"
    subprocess.run([cxx, "-std=c++17", "-O1", "-shared", "-fPIC", f"-I{AIE / 'host_mock'}", str(AIE / "gemm_bf16.cc"),
                    "-o", str(so)], check=True)
    return ctypes.CDLL(str(so))


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
    dry = subprocess.run([sys.executable, script, "--model", str(tmp_path / "m.onnx"), "--dry-run"],
                         capture_output=True, text=True)
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
    rne = bf16_rne(a)
    np.testing.assert_array_equal(c[:, :32], rne)
    np.testing.assert_array_equal(c[:, 32:], -2 * rne)
    np.testing.assert_array_equal(c[:, :32], nat.emulator_gemm(a, nat.pack_b(np.eye(32, 64, dtype=np.float32)))[:, :32])
    floor_ = np.where(sign != 0, a.view(np.uint32).astype(np.uint64) + 0xFFFF, a.view(np.uint32)) >> 16 << 16
    assert np.any(floor_.astype(np.uint32).view(np.float32) != rne), "data must tell floor from RNE"


@pytest.mark.parametrize("M,K,N", [(1500, 512, 512), (300, 128, 256), (257, 64, 512), (1300, 256, 256)])
def test_v2_design_in_place_exact_height(M, K, N):
    """Dataflow v2: fp32 A read in place with any height (tail rows replicate row M-1 and are written back onto it,
    never outside A or C), A slab resident in the memtile, conversion in the core; the result is the contract's."""
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((M, K)).astype(np.float32), rng.standard_normal((K, N)).astype(np.float32)
    packed = nat.pack_b(b)
    b16 = bf16_bits_to_f32(np.asarray(packed.data)).astype(np.float64)
    c = design.simulate_v2(a.reshape(-1), b16, M, packed.Kpad, packed.Npad)
    ref = nat.reference_gemm(a, packed)
    np.testing.assert_allclose(c[:, :N], ref, rtol=0, atol=1e-4 * K)
    assert all(len(design.a_slab_taps_v2(M, K, (M - 1) // 256, r)) >= 1 for r in range(4))


def test_v2_design_limits():
    assert design.v2_fits(1024) and not design.v2_fits(2048)  # fc2 (K=2048) streams A as v1 does
    with pytest.raises(ValueError):
        design.simulate_v2(np.zeros(256 * 2048), np.zeros(2048 * 256), 256, 2048, 256)


import attention_design as attn  # noqa: E402


def test_attention_design_fits_l1_and_covers_every_query_tile():
    assert sum(attn.l1_bytes().values()) <= attn.L1_LIMIT
    items = attn.work_items(8, 1500)
    assert sorted(x for core in items for x in core) == sorted((h, r) for h in range(8) for r in range(0, 1500, 32))
    assert max(map(len, items)) - min(map(len, items)) <= 1


@pytest.mark.parametrize("T,H", [(300, 2), (97, 3)])
def test_attention_design_computes_softmax_attention(T, H):
    """The fused design (online softmax over 32-key tiles, bf16 Q/K/V/P, head columns read through strides) against
    float64 attention. Bound from the arithmetic: Q, K rounded to bf16 move each score by at most
    delta = scale (2^-7 + D 2^-23) |q|.|k|, P's rounding by 2^-9 relative; so every softmax weight is within a factor
    eta = e^(2 max delta) (1 + 2^-8)/(1 - 2^-8) - 1 of the exact one, and V's rounding adds 2^-8:
    |O - O*| <= (eta + (1 + eta) 2^-8) sum_j w*_j |v_j|."""
    rng = np.random.default_rng(4)
    q, k, v = (0.5 * rng.standard_normal((T, H * attn.D))).astype(np.float32), \
        (0.5 * rng.standard_normal((T, H * attn.D))).astype(np.float32), \
        rng.standard_normal((T, H * attn.D)).astype(np.float32)
    scale = attn.D ** -0.5
    o = attn.simulate(q.reshape(-1), k.reshape(-1), v.reshape(-1), T, H, scale)
    for h in range(H):
        cols = slice(h * attn.D, (h + 1) * attn.D)
        qh, kh, vh = (x[:, cols].astype(np.float64) for x in (q, k, v))
        s = scale * qh @ kh.T
        w = np.exp(s - s.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        delta = scale * (2.0**-7 + attn.D * 2.0**-23) * (np.abs(qh) @ np.abs(kh).T)
        eta = np.exp(2 * delta.max(axis=1)) * (1 + 2.0**-8) / (1 - 2.0**-8) - 1
        bound = (eta + (1 + eta) * 2.0**-8)[:, None] * (w @ np.abs(vh)) + 1e-12
        err = np.abs(o[:, cols] - w @ vh)
        assert np.all(err <= bound), f"head {h}: max error/bound {np.max(err / bound)}"
