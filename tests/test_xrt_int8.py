"""int8 (A8W8) products on the NPU path (issue 13 item 3): the xrt backend with i8_f32 kernels over the fake device.
The contract's int32 sums are exact, so the "device" (the fake computes the i8_f32 layout independently of the
emulator's kernels) and the emulator must agree bit for bit; without an int8 kernel the backend declines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from onnxruntime_ep_xdna import _native as nat


@pytest.fixture(autouse=True)
def _no_cost_model(monkeypatch):
    """Small protocol shapes: the cost model would keep them on the CPU path."""
    monkeypatch.setenv("XDNA_XRT_COST_MODEL", "0")


def write_kernel_dir(root: Path, bf16=(), int8=()) -> Path:
    """A manifest for the fake device: bf16 / int8 = [(Kpad, Npad, m_rows)]; i8_f32 kernels get their own xclbin."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for dtype, specs in (("bf16_f32", bf16), ("i8_f32", int8)):
        for K, N, m_rows in specs:
            xclbin, insts = f"gemm_{dtype}_k{K}.xclbin", f"gemm_{dtype}_k{K}_n{N}_m{m_rows}.insts.bin"
            (root / xclbin).write_bytes(b"fake xclbin")
            words = nat.npu_fake_insts_i8(m_rows, K, N) if dtype == "i8_f32" else nat.npu_fake_insts(m_rows, K, N)
            words.astype("<u4").tofile(root / insts)
            entries.append({"K": K, "N": N, "m_rows": m_rows, "dtype": dtype, "xclbin": xclbin, "insts": insts,
                            "kernel": "MLIR_AIE"})
    (root / "manifest.json").write_text(json.dumps({
        "format": "onnxruntime-ep-xdna-kernels", "contract_version": 1, "tile": {"m": 64, "k": 64, "n": 64},
        "array": {"rows": 4, "cols": 4}, "device": "npu1", "kernels": entries}))
    return root


def rand(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture
def int8_dir(tmp_path):
    return write_kernel_dir(tmp_path / "k", bf16=[(512, 512, 256)],
                            int8=[(512, 512, 256), (512, 512, 512), (128, 512, 256)])


@pytest.mark.parametrize("M,K,N", [(1, 512, 512), (300, 512, 512), (700, 512, 512), (37, 100, 300)])
def test_int8_runs_on_the_fake_device_bit_identical_to_the_emulator(int8_dir, M, K, N):
    be = nat.npu_fake_backend(str(int8_dir))
    assert be.supports("int8")[0] and be.can_run_in("int8", M, K, N)[0]
    a, b = rand((M, K), M + K), rand((K, N), N)
    a[0, 3] *= 1e4  # rows and columns of very different magnitude
    b[:, N // 2] *= 1e-4
    w = be.upload(nat.pack_b_in(b, "int8"))
    stats = be.fake_stats()
    c = be.gemm(a, w)
    np.testing.assert_array_equal(c, nat.emulator_gemm_int8(a, nat.quantize_b_int8(b)))
    assert be.fake_stats()["runs"] > stats["runs"], "ran on the device"


def test_int8_non_finite_rows_and_columns_are_nan_as_on_the_emulator(int8_dir):
    be = nat.npu_fake_backend(str(int8_dir))
    a, b = rand((5, 512), 1), rand((512, 300), 2)
    a[2, 7], b[9, 4] = np.nan, np.inf
    c = be.gemm(a, be.upload(nat.pack_b_in(b, "int8")))
    assert np.all(np.isnan(c[2])) and np.all(np.isnan(c[:, 4]))
    np.testing.assert_array_equal(c, nat.emulator_gemm_int8(a, nat.quantize_b_int8(b)))


def test_int8_and_bf16_weights_use_their_own_kernels(int8_dir):
    be = nat.npu_fake_backend(str(int8_dir))
    a, b = rand((64, 512), 3), rand((512, 512), 4)
    c8 = be.gemm(a, be.upload(nat.pack_b_in(b, "int8")))
    c16 = be.gemm(a, be.upload(nat.pack_b(b)))
    np.testing.assert_array_equal(c16, nat.emulator_gemm(a, nat.pack_b(b)))
    np.testing.assert_array_equal(c8, nat.emulator_gemm_int8(a, nat.quantize_b_int8(b)))
    assert be.fake_stats()["contexts"] == 2, "the int8 xclbin is a context of its own"
    assert "512x512 int8 (m_rows 512 256)" in be.description
    ok, why = be.can_run_in("int8", 64, 2048, 512)
    assert not ok and "no int8 NPU kernel built for K=2048 N=512" in why
    ok, why = be.can_run_in("bf16", 64, 128, 512)  # only an int8 kernel of that shape
    assert not ok and "no NPU kernel built for K=128 N=512" in why


def test_without_int8_kernels_the_backend_declines_int8(tmp_path):
    be = nat.npu_fake_backend(str(write_kernel_dir(tmp_path / "k", bf16=[(512, 512, 256)])))
    ok, why = be.supports("int8")
    assert not ok and "no int8 (i8_f32) kernels" in why and "--dtype i8_f32" in why
    assert not be.can_run_in("int8", 4, 512, 512)[0]
    with pytest.raises(nat.BackendFault) as e:
        be.upload(nat.pack_b_in(rand((512, 512), 5), "int8"))
    assert e.value.step == "upload" and "declines" in str(e.value)


def test_an_int8_only_kernel_directory_loads(tmp_path):
    be = nat.npu_fake_backend(str(write_kernel_dir(tmp_path / "k", int8=[(512, 512, 256)])))
    assert be.supports("int8")[0] and not be.can_run(4, 512, 512)[0]
    a, b = rand((4, 512), 6), rand((512, 512), 7)
    np.testing.assert_array_equal(be.gemm(a, be.upload(nat.pack_b_in(b, "int8"))),
                                  nat.emulator_gemm_int8(a, nat.quantize_b_int8(b)))


@pytest.mark.parametrize("fail_at,step", [("load", "load"), ("upload", "upload"), ("run", "run"),
                                          ("run_state", "run"), ("timeout", "timeout"), ("result", "result")])
def test_int8_injected_fault_maps_to_step(int8_dir, fail_at, step):
    be = nat.npu_fake_backend(str(int8_dir), fail_at=fail_at, timeout_ms=50)
    with pytest.raises(nat.BackendFault) as e:
        w = be.upload(nat.pack_b_in(rand((512, 512), 8), "int8"))
        be.gemm(rand((300, 512), 9), w)
    assert e.value.step == step, str(e.value)


def test_int8_kernels_of_a_height_the_layout_cannot_hold_are_skipped(tmp_path):
    """i8_f32 heights are whole 256-row blocks (the A layout): a manifest entry of another height is skipped with the
    reason, never run (its A buffer would be smaller than the rows staged into it)."""
    root = write_kernel_dir(tmp_path / "k", bf16=[(512, 512, 256)], int8=[(512, 512, 256)])
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["kernels"][-1]["m_rows"] = 300
    (root / "manifest.json").write_text(json.dumps(manifest))
    be = nat.npu_fake_backend(str(root))
    assert not be.supports("int8")[0]
