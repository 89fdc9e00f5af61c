"""Session creation time: chains of MatMuls (XDNA EP vs the CPU EP alone), and the Whisper model compiled or not.

Everything here runs on the CPU (no NPU; the XDNA EP's backend is the emulator, which does not matter for session
creation: ORT's graph work, the EP's GetCapability/Compile and weight packing or, compiled, payload mapping).

Chains: x[1, D] -> MatMul(W_1) -> ... -> MatMul(W_n) -> y, each W_i a distinct constant [D, D]. The two runners
take turns for every repetition (same run, same load); medians are printed.

--whisper DIR (an optimum export, e.g. ~/.cache/onnxruntime-ep-xdna/models/base): for the encoder and both
decoders, CPU EP vs XDNA EP on the original model vs XDNA EP on the model compiled for it (EPContext, side files,
compiled once beforehand by `xdna compile`'s code), each creation in a fresh subprocess: session creation, first
run on dummy inputs, peak RSS while loading (ru_maxrss after creation, minus the process's RSS before it). Then
`xdna transcribe` of the bundled sample from a cold process, CPU / XDNA uncompiled / XDNA compiled (cache warm).

    python3 benchmarks/session_creation.py                      # 100, 1000, 3000, 10000 nodes
    python3 benchmarks/session_creation.py --sizes 100 1000 --repeat 5
    python3 benchmarks/session_creation.py --whisper ~/.cache/onnxruntime-ep-xdna/models/base --repeat 3
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import onnxruntime_ep_xdna as xdna

D = 16


def machine_line():
    model = platform.processor() or "unknown CPU"
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        flags = ", ".join(n for n in ("avx512_bf16", "avx512f", "avx2", "amx_bf16") if f" {n}" in text)
    except OSError:
        pass
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (f"{model}, {os.cpu_count()} logical cores ({flags}); onnxruntime {ort.__version__}; "
            f"numpy {np.__version__}; python {platform.python_version()}; {date}")


def chain_model(n: int) -> bytes:
    rng = np.random.default_rng(n)
    nodes, inits = [], []
    prev = "x"
    for i in range(n):
        w = f"w{i}"
        out = "y" if i == n - 1 else f"h{i}"
        q, _ = np.linalg.qr(rng.standard_normal((D, D)))  # orthogonal: the chain neither explodes nor vanishes
        inits.append(numpy_helper.from_array(q.astype(np.float32), w))
        nodes.append(helper.make_node("MatMul", [prev, w], [out], name=f"mm{i}"))
        prev = out
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, D])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    return model.SerializeToString()


def create(model: bytes, xdna_ep: bool) -> tuple[float, ort.InferenceSession]:
    if xdna_ep:
        so = xdna.session_options(record_placement=False)
        providers = [xdna.EP_NAME, "CPUExecutionProvider"]
    else:
        so = ort.SessionOptions()
        providers = ["CPUExecutionProvider"]
    t0 = time.perf_counter()
    sess = ort.InferenceSession(model, so, providers=providers)
    return time.perf_counter() - t0, sess


WHISPER_FILES = ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx")
RUNNERS = ("cpu", "xdna", "xdna-compiled")


def dummy_feeds(sess) -> dict:
    """Inputs of the right types and shapes: batch 1, 1500 encoder frames, 4 past tokens, 1 new token."""
    feeds = {}
    for i in sess.get_inputs():
        dims = []
        for d in i.shape:
            if isinstance(d, int):
                dims.append(d)
            else:
                name = str(d)
                dims.append(1 if "batch" in name else 1500 if "encoder" in name else 4 if "past" in name else 1)
        dtype = np.int64 if "int64" in i.type else np.float32
        feeds[i.name] = (np.ones(dims, dtype) if dtype == np.int64
                         else np.random.default_rng(0).standard_normal(dims).astype(np.float32) * 0.1)
    return feeds


def vm_kb(field: str) -> int:
    """VmRSS / VmHWM of this process in kB (ru_maxrss would carry the parent's peak across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def child(path: str, runner: str) -> None:
    """One measurement in this fresh process: prints a JSON line."""
    if runner == "cpu":
        so, providers = ort.SessionOptions(), ["CPUExecutionProvider"]
    else:
        xdna.register()
        so, providers = xdna.session_options(record_placement=False), [xdna.EP_NAME, "CPUExecutionProvider"]
    before = vm_kb("VmRSS")  # after imports and registration
    t0 = time.perf_counter()
    sess = ort.InferenceSession(path, so, providers=providers)
    created = time.perf_counter() - t0
    rss_load = vm_kb("VmHWM")
    feeds = dummy_feeds(sess)
    t0 = time.perf_counter()
    sess.run(None, feeds)
    first = time.perf_counter() - t0
    print(json.dumps({"create_s": created, "first_run_s": first, "load_rss_mb": (rss_load - before) / 1024,
                      "peak_rss_mb": vm_kb("VmHWM") / 1024}))


def measure(path: Path, runner: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(path), runner], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def whisper(model_dir: Path, repeat: int) -> None:
    from onnxruntime_ep_xdna._compile import compile_model

    work = Path(tempfile.mkdtemp(prefix="xdna-bench-"))
    try:
        compiled = {}
        for f in WHISPER_FILES:
            t0 = time.perf_counter()
            compiled[f] = compile_model(model_dir / f, work / f)
            size = sum(p.stat().st_size for p in work.glob(Path(f).stem + "*"))
            print(f"compiled {f} in {time.perf_counter() - t0:.1f} s ({size / 1e6:.0f} MB with its side file)")
        print(f"\n{model_dir}: medians of {repeat} fresh processes per cell, runners alternating")
        print(f"{'model':<30} {'runner':<14} {'create s':>9} {'vs CPU':>7} {'1st run s':>10} {'load RSS MB':>12} "
              f"{'peak RSS MB':>12}")
        for f in WHISPER_FILES:
            rows = {r: [] for r in RUNNERS}
            for _ in range(repeat):
                for r in RUNNERS:
                    rows[r].append(measure(compiled[f] if r == "xdna-compiled" else model_dir / f, r))
            med = {r: {k: statistics.median(x[k] for x in rows[r]) for k in rows[r][0]} for r in RUNNERS}
            for r in RUNNERS:
                m = med[r]
                print(f"{f:<30} {r:<14} {m['create_s']:>9.3f} {m['create_s'] / med['cpu']['create_s']:>6.2f}x "
                      f"{m['first_run_s']:>10.3f} {m['load_rss_mb']:>12.0f} {m['peak_rss_mb']:>12.0f}", flush=True)
        print("\nxdna transcribe (bundled sample, beam 5) from a cold process: wall seconds, median of "
              f"{repeat}")
        xdna_cli = str(Path(sys.executable).with_name("xdna"))
        cache = work / "cache"
        env = dict(os.environ, XDNA_CACHE_DIR=str(cache))
        variants = {"cpu": (["--provider", "cpu"], {}), "xdna": (["--provider", "xdna"], {"XDNA_COMPILED_MODELS": "0"}),
                    "xdna-compiled": (["--provider", "xdna"], {})}
        t0 = time.perf_counter()
        subprocess.run([xdna_cli, "transcribe", "--model", str(model_dir)], env=env, check=True,
                       capture_output=True)  # warms the compiled-model cache (first run compiles)
        print(f"  (first compiled run, compiling into the cache: {time.perf_counter() - t0:.1f} s)")
        times = {v: [] for v in variants}
        for _ in range(repeat):
            for v, (flags, extra) in variants.items():
                t0 = time.perf_counter()
                subprocess.run([xdna_cli, "transcribe", "--model", str(model_dir), *flags], env={**env, **extra},
                               check=True, capture_output=True)
                times[v].append(time.perf_counter() - t0)
        for v in variants:
            print(f"  {v:<14} {statistics.median(times[v]):>7.2f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        return child(sys.argv[2], sys.argv[3])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 3000, 10000])
    ap.add_argument("--repeat", type=int, default=3, help="repetitions per size and runner (median reported)")
    ap.add_argument("--whisper", type=Path, metavar="DIR", help="Whisper export: compiled vs uncompiled (see above)")
    args = ap.parse_args()
    print(f"machine: {machine_line()}")
    if args.whisper:
        print("no NPU: the XDNA EP's backend is the CPU emulator (first-run figures are emulator figures)")
        return whisper(args.whisper, args.repeat)
    xdna.register()
    print("no NPU: the XDNA EP's backend is the CPU emulator; only session creation is timed")
    print(f"model: chain of n MatMuls x[1,{D}] . W_i[{D},{D}] (distinct constant weights); "
          f"median of {args.repeat} creations per runner, runners alternating\n")
    print(f"{'MatMul nodes':>12} {'XDNA EP s':>10} {'CPU EP s':>9} {'ratio':>7}  check (first repetition)")
    x = np.random.default_rng(0).standard_normal((1, D)).astype(np.float32)
    for n in args.sizes:
        model = chain_model(n)
        t_x, t_c = [], []
        check = ""
        for _ in range(args.repeat):
            t, sess = create(model, True)
            t_x.append(t)
            if not check:  # once: the EP really holds the nodes, and the chain's result matches the CPU EP's
                on_ep = ",".join(sorted({p for p in sess.get_providers()}))
                y = sess.run(None, {"x": x})[0]
            del sess
            t, sess = create(model, False)
            t_c.append(t)
            if not check:
                ref = sess.run(None, {"x": x})[0]
                check = f"providers {on_ep}; |y| {float(np.linalg.norm(y)):.3f} vs CPU EP {float(np.linalg.norm(ref)):.3f}"
            del sess
        mx, mc = statistics.median(t_x), statistics.median(t_c)
        print(f"{n:>12} {mx:>10.3f} {mc:>9.3f} {mx / mc:>6.2f}x  {check}", flush=True)
    print("\nratio = XDNA EP session creation time / CPU EP alone (same run).")


if __name__ == "__main__":
    main()
