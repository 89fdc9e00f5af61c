"""The xrt (real NPU) backend without an NPU: its protocol over the fake device, fault mapping, probing, loading.

The fake device (kernels/xrt/fake_device.cc) keeps separate host and device copies of every buffer and executes a
run with the emulator, so a missing sync, a wrong buffer or a wrong padding shows up as wrong numbers here.
Hardware tests at the end run only with /dev/accel/accel0 and kernels built by kernels/aie/build_kernels.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from numerics import assert_same_gemm, rand

from onnxruntime_ep_xdna import _native as nat


@pytest.fixture(autouse=True)
def _no_cost_model(monkeypatch):
    """These tests exercise the protocol on small shapes, which the cost model would keep on the CPU path."""
    monkeypatch.setenv("XDNA_XRT_COST_MODEL", "0")

PKG_DIR = Path(nat.__file__).parent
HAVE_NPU = Path("/dev/accel/accel0").exists()


def write_kernel_dir(root: Path, kernels, *, version=1, tile=(64, 64, 64), array=(4, 4)) -> Path:
    """A manifest for the fake device: kernels = [(Kpad, Npad, m_rows[, xclbin name])]."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for spec in kernels:
        K, N, m_rows = spec[:3]
        xclbin = spec[3] if len(spec) > 3 else f"gemm_k{K}.xclbin"
        insts = f"gemm_k{K}_n{N}_m{m_rows}.insts.bin"
        (root / xclbin).write_bytes(b"fake xclbin")
        nat.npu_fake_insts(m_rows, K, N).astype("<u4").tofile(root / insts)
        entries.append({"K": K, "N": N, "m_rows": m_rows, "dtype": "bf16_f32", "xclbin": xclbin, "insts": insts,
                        "kernel": "MLIR_AIE"})
    manifest = {"format": "onnxruntime-ep-xdna-kernels", "contract_version": version,
                "tile": dict(zip("mkn", tile)), "array": {"rows": array[0], "cols": array[1]}, "device": "npu1",
                "kernels": entries}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture
def whisper_dir(tmp_path):
    # Whisper-base encoder shapes: 512x512, 512x2048, 2048x512 (kernels share an xclbin per K), two heights.
    return write_kernel_dir(tmp_path / "k", [(512, 512, 256), (512, 2048, 256), (2048, 512, 256),
                                             (512, 512, 1024), (128, 512, 256)])


# ---- results ----

@pytest.mark.parametrize("M,K,N", [(1, 512, 512), (100, 512, 2048), (256, 2048, 512), (300, 80, 300),
                                   (1500, 512, 512), (1, 100, 257)])
def test_fake_device_results_equal_emulator(whisper_dir, M, K, N):
    be = nat.npu_fake_backend(str(whisper_dir))
    a, b = rand((M, K), 1), rand((K, N), 2)
    packed = nat.pack_b(b)
    ok, why = be.can_run(M, K, N)
    assert ok, why
    c = be.gemm(a, be.upload(packed))
    assert c.shape == (M, N)
    assert_same_gemm(c, nat.emulator_gemm(a, packed), a, b)


def test_row_chunks_use_the_largest_kernels_first(whisper_dir):
    # 512x512 has heights 1024 and 256: M=1500 -> Mpad 1536 = 1024 + 256 + 256.
    assert nat.npu_plan_row_chunks(1500, [256, 1024]) == [1024, 256, 256]
    assert nat.npu_plan_row_chunks(1, [256, 1024]) == [256]
    assert nat.npu_plan_row_chunks(300, [1024]) == [1024]  # no height fits: pad up to the smallest
    be = nat.npu_fake_backend(str(whisper_dir))
    a, b = rand((1500, 512), 3), rand((512, 512), 4)
    w = be.upload(nat.pack_b(b))
    before = be.fake_stats()["runs"]
    c = be.gemm(a, w)
    assert be.fake_stats()["runs"] - before == 3
    assert_same_gemm(c, nat.emulator_gemm(a, nat.pack_b(b)), a, b)


def test_buffers_are_pooled_and_contexts_shared(whisper_dir):
    be = nat.npu_fake_backend(str(whisper_dir))
    w1 = be.upload(nat.pack_b(rand((512, 512), 5)))
    w2 = be.upload(nat.pack_b(rand((512, 2048), 6)))
    s = be.fake_stats()
    assert s["contexts"] == 1, "shapes built from one xclbin must share one hardware context"
    assert s["b_buffers"] == 2 and s["instr_buffers"] == 3  # 512x512 (2 heights) + 512x2048
    a = rand((200, 512), 7)
    be.gemm(a, w1)
    after_first = be.fake_stats()
    for _ in range(3):
        be.gemm(a, w1)
        be.gemm(a, w2)
    s = be.fake_stats()
    assert s["a_buffers"] == after_first["a_buffers"] + 1  # one more staging set, for 512x2048; then reused
    assert s["b_buffers"] == 2, "weights are uploaded once, never per call"
    be.upload(nat.pack_b(rand((2048, 512), 8)))
    assert be.fake_stats()["contexts"] == 2


def test_strided_output_and_zero_rows(whisper_dir):
    be = nat.npu_fake_backend(str(whisper_dir))
    b = rand((512, 512), 9)
    w = be.upload(nat.pack_b(b))
    assert be.gemm(np.zeros((0, 512), np.float32), w).shape == (0, 512)
    a = np.asfortranarray(rand((10, 512), 10))  # forcecast makes it C-contiguous; result must not change
    assert_same_gemm(be.gemm(a, w), nat.emulator_gemm(np.ascontiguousarray(a), nat.pack_b(b)), a, b)


# ---- shape coverage, context limit ----

def test_can_run_names_the_missing_kernel(whisper_dir):
    be = nat.npu_fake_backend(str(whisper_dir))
    ok, why = be.can_run(1500, 768, 3072)
    assert not ok and "no NPU kernel built for K=768 N=3072" in why and "512x2048" in why
    assert be.can_run(0, 500, 2000)[0], "K/N are padded per the contract before the lookup (512 x 2048)"
    with pytest.raises(nat.BackendFault) as e:
        be.upload(nat.pack_b(rand((768, 64), 11)))
    assert e.value.step == "load"


def test_context_limit_is_reported_and_enforced(whisper_dir):
    be = nat.npu_fake_backend(str(whisper_dir), max_contexts=1)
    be.upload(nat.pack_b(rand((512, 512), 12)))
    ok, why = be.can_run(1, 2048, 512)
    assert not ok and "context limit" in why
    assert be.can_run(1, 512, 2048)[0], "same xclbin: no new context needed"
    with pytest.raises(nat.BackendFault) as e:
        be.upload(nat.pack_b(rand((2048, 512), 13)))
    assert e.value.step == "load" and "context limit" in str(e.value)


# ---- faults: every step surfaces as BackendFault with the right step ----

@pytest.mark.parametrize("fail_at,step", [("load", "load"), ("upload", "upload"), ("run", "run"),
                                          ("run_state", "run"), ("timeout", "timeout"), ("result", "result")])
def test_injected_fault_maps_to_step(whisper_dir, fail_at, step):
    be = nat.npu_fake_backend(str(whisper_dir), fail_at=fail_at)
    a, b = rand((300, 512), 14), rand((512, 512), 15)
    with pytest.raises(nat.BackendFault) as e:
        w = be.upload(nat.pack_b(b))
        be.gemm(a, w)
    assert e.value.step == step, str(e.value)
    assert isinstance(e.value, RuntimeError)


def test_open_fault_and_timeout_disables_backend(whisper_dir):
    with pytest.raises(nat.BackendFault) as e:
        nat.npu_fake_backend(str(whisper_dir), fail_at="open")
    assert e.value.step == "open" and "Could not open device" in str(e.value)

    be = nat.npu_fake_backend(str(whisper_dir), fail_at="timeout", timeout_ms=50)
    w = be.upload(nat.pack_b(rand((512, 512), 16)))
    with pytest.raises(nat.BackendFault) as e:
        be.gemm(rand((4, 512), 17), w)
    assert e.value.step == "timeout" and "50 ms" in str(e.value)
    ok, why = be.can_run(4, 512, 512)
    assert not ok and "disabled" in why and "timed out" in why
    with pytest.raises(nat.BackendFault) as e:
        be.gemm(rand((4, 512), 17), w)
    assert e.value.step == "run"


# ---- manifest ----

def test_manifest_problems_are_explained(tmp_path):
    with pytest.raises(RuntimeError, match="no kernels built: .*manifest.json not found"):
        nat.npu_fake_backend(str(tmp_path / "none"))
    d = write_kernel_dir(tmp_path / "v2", [(512, 512, 256)], version=2)
    with pytest.raises(RuntimeError, match="contract_version 2, this build implements version 1"):
        nat.npu_fake_backend(str(d))
    d = write_kernel_dir(tmp_path / "tile", [(512, 512, 256)], tile=(32, 64, 64))
    with pytest.raises(RuntimeError, match="built for tile 32x64x64"):
        nat.npu_fake_backend(str(d))
    d = write_kernel_dir(tmp_path / "bad", [(500, 512, 256), (512, 300, 256), (512, 512, 100)])
    with pytest.raises(RuntimeError, match="no usable kernels.*multiple of 64"):
        nat.npu_fake_backend(str(d))
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "manifest.json").write_text("{ not json")
    with pytest.raises(RuntimeError, match="invalid JSON"):
        nat.npu_fake_backend(str(tmp_path / "json"))
    d = write_kernel_dir(tmp_path / "partial", [(512, 512, 256), (128, 256, 256)])
    (d / "gemm_k128_n256_m256.insts.bin").unlink()
    probe = nat.xrt_probe(str(d))
    kernels = next(p for p in probe["pieces"] if p["name"] == "kernels")
    assert kernels["ok"] and "1 kernel(s)" in kernels["detail"] and "missing" in kernels["detail"]


# ---- selection through make_backend (what the EP calls) ----

@pytest.fixture
def fake_env(monkeypatch, whisper_dir):
    monkeypatch.setenv("XDNA_XRT_SHIM", "fake")
    monkeypatch.setenv("XDNA_KERNEL_DIR", str(whisper_dir))
    monkeypatch.delenv("XDNA_XRT_FAKE_FAULT", raising=False)
    return monkeypatch


def test_make_backend_picks_xrt_with_fake_device(fake_env):
    be, why = nat.xrt_backend("auto")
    assert be.name == "xrt" and "fake NPU" in why, why
    a, b = rand((64, 512), 18), rand((512, 2048), 19)
    packed = nat.pack_b(b)
    assert_same_gemm(be.gemm(a, be.upload(packed)), nat.emulator_gemm(a, packed), a, b)


def test_make_backend_falls_back_when_device_does_not_open(fake_env):
    fake_env.setenv("XDNA_XRT_FAKE_FAULT", "open")
    be, why = nat.xrt_backend("auto")
    assert be.name == "emulator" and "Could not open device with index '0'" in why, why
    with pytest.raises(RuntimeError, match="backend=xrt requested but unavailable"):
        nat.xrt_backend("xrt")


def test_generic_fault_wrapper_over_xrt(fake_env):
    be, _ = nat.xrt_backend("xrt", fault_inject="result")
    w = be.upload(nat.pack_b(rand((512, 512), 20)))
    with pytest.raises(nat.BackendFault) as e:
        be.gemm(rand((3, 512), 21), w)
    assert e.value.step == "result"


# ---- probing this machine ----

def _make_sysfs(root: Path, vendor="0x1022", device="0x1502", driver="amdxdna"):
    (root / "dev/accel").mkdir(parents=True)
    (root / "dev/accel/accel0").write_text("")
    dev = root / "sys/class/accel/accel0/device"
    dev.mkdir(parents=True)
    (dev / "vendor").write_text(vendor + "\n")
    (dev / "device").write_text(device + "\n")
    (root / "drivers" / driver).mkdir(parents=True)
    os.symlink(root / "drivers" / driver, dev / "driver")


@pytest.mark.skipif(HAVE_NPU, reason="this machine has an NPU")
def test_probe_explains_missing_pieces_here(monkeypatch):
    monkeypatch.delenv("XDNA_XRT_SHIM", raising=False)
    monkeypatch.delenv("XDNA_XRT_PROBE_ROOT", raising=False)
    be, why = nat.xrt_backend("auto")
    assert be.name == "emulator" and "no /dev/accel/accel*" in why
    probe = nat.xrt_probe()
    assert not probe["ready"]
    pieces = {p["name"]: p for p in probe["pieces"]}
    assert set(pieces) == {"device node", "driver", "libxrt", "backend library", "kernels"}
    assert not pieces["device node"]["ok"] and "amdxdna" in pieces["device node"]["detail"]
    assert "MISSING  device node" in probe["summary"]


@pytest.mark.parametrize("kw,expect", [({"driver": "vfio-pci"}, "driver vfio-pci"),
                                       ({"vendor": "0x8086"}, "vendor 0x8086"),
                                       ({"device": "0x17f0"}, "device 0x17f0")])
def test_probe_rejects_wrong_device(monkeypatch, tmp_path, kw, expect):
    _make_sysfs(tmp_path / "root", **kw)
    monkeypatch.setenv("XDNA_XRT_PROBE_ROOT", str(tmp_path / "root"))
    monkeypatch.delenv("XDNA_XRT_SHIM", raising=False)
    _, why = nat.xrt_backend("auto")
    assert "Phoenix NPU (0x1502) bound to the amdxdna driver" in why and expect in why, why


def test_probe_with_device_present_reaches_libxrt(monkeypatch, tmp_path, whisper_dir):
    """With a (fake) Phoenix device in sysfs the loader goes on to libxrt: this machine has none or XRT 2.13."""
    _make_sysfs(tmp_path / "root")
    monkeypatch.setenv("XDNA_XRT_PROBE_ROOT", str(tmp_path / "root"))
    monkeypatch.setenv("XDNA_KERNEL_DIR", str(whisper_dir))
    monkeypatch.delenv("XDNA_XRT_SHIM", raising=False)
    be, why = nat.xrt_backend("auto")
    probe = {p["name"]: p for p in nat.xrt_probe()["pieces"]}
    assert probe["device node"]["ok"] and probe["driver"]["ok"] and probe["kernels"]["ok"]
    if be.name == "xrt":  # a real XRT >= 2.18 and our backend library: only then may it get this far
        pytest.skip("a working XRT is installed; device(0) opened")
    assert be.name == "emulator"
    lib = probe["libxrt"]
    if not lib["ok"] and "not found" in lib["detail"]:
        assert "libxrt_coreutil.so.2 not found" in why
    elif not lib["ok"]:
        assert "too old" in why and "undefined symbol" in why, why  # e.g. Debian 12's XRT 2.13
    else:
        assert "xrt::device(0) failed" in why or "libxdna_xrt_backend.so" in why, why


# ---- packaging: the EP never depends on XRT ----

def _needed(lib: Path) -> list[str]:
    if not shutil.which("readelf"):
        pytest.skip("readelf not available")
    out = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    return [line.split("[")[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]


def test_no_library_links_libxrt():
    ep = PKG_DIR / "libonnxruntime_ep_xdna.so"
    if not ep.exists():
        pytest.skip("EP library not next to _native")
    assert not [n for n in _needed(ep) if "xrt" in n]
    shim = PKG_DIR / "libxdna_xrt_backend.so"
    if not shim.exists():
        pytest.skip("built without XRT headers")
    assert not [n for n in _needed(shim) if "xrt" in n], "the shim must bind to libxrt at dlopen time only"


# ---- cost model ----

def test_cost_model_keeps_gemv_on_cpu_and_sends_encoder_gemms():
    gemv = nat.npu_cost(1, 512, 2048)
    assert not gemv["npu_wins"] and gemv["npu_us"] > 100 and gemv["runs"] == 1
    enc = nat.npu_cost(1500, 512, 2048)
    assert enc["npu_wins"] and enc["runs"] == 6
    assert nat.npu_cost(1500, 512, 2048, m_rows=1536)["runs"] == 1


# ---- hardware (skipped without an NPU) ----

@pytest.mark.hardware
@pytest.mark.skipif(not HAVE_NPU, reason="no /dev/accel/accel0 (no Phoenix NPU here)")
def test_real_npu_matches_emulator():
    be, why = nat.xrt_backend("xrt")
    M, K, N = 1500, 512, 512
    ok, reason = be.can_run(M, K, N)
    if not ok:
        pytest.skip(f"no kernel for {K}x{N}: {reason}")
    a, b = rand((M, K), 22), rand((K, N), 23)
    packed = nat.pack_b(b)
    c = be.gemm(a, be.upload(packed))
    assert_same_gemm(c, nat.emulator_gemm(a, packed), a, b)


def test_cost_model_keeps_gemv_on_cpu_and_sends_encoder_gemm_to_npu(whisper_dir, monkeypatch):
    monkeypatch.setenv("XDNA_XRT_COST_MODEL", "1")
    be = nat.npu_fake_backend(str(whisper_dir))
    ok, why = be.can_run(1, 512, 512)
    assert not ok and "cost model: CPU faster" in why
    ok, why = be.can_run(1500, 512, 2048)
    assert ok, why
