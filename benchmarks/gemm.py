"""GEMM benchmark: the emulator backend (the NPU GEMM contract executed on the CPU) against ONNX Runtime's CPU EP.

Everything here runs on the CPU; no figure is an NPU figure. For each shape M x K x N it times
  * CPU EP:   a one-node ONNX MatMul (B as an initializer) in an InferenceSession with CPUExecutionProvider;
  * emulator: onnxruntime_ep_xdna._native.emulator_gemm on a B packed once beforehand (bf16, contract layout);
  * int8, bf16x3: the emulator's other precision modes (gemm_contract.h), weights prepared once beforehand;
  * XDNA EP:  the same one-node model with providers=[XDNAExecutionProvider, CPUExecutionProvider], if the
              package's EP can be registered (it runs the emulator backend when there is no NPU); EP int8 and
              EP x3: the same with the provider option precision=int8 / bf16x3.
Shapes: whisper-base encoder GEMMs, the decoder's GEMVs and few-row GEMMs (M = beams), and (full run, EP only)
MatMuls with both operands at run time as in decoder self-attention.
Runners take turns in two blocks each so background load hits all alike; medians are printed.

    python3 benchmarks/gemm.py            # full run
    python3 benchmarks/gemm.py --quick    # fewer shapes and repetitions
    python3 benchmarks/gemm.py --epilogue # the GEMM epilogue's extra cost (kernels/gemm_contract.h, "Epilogue")

--epilogue: the encoder's GEMM shapes in int8 and bf16 (emulator kernels, weights prepared beforehand) with no
epilogue, a bias, bias + GELU and bias + residual run inside the kernels, and as the peer the same epilogue as a
separate pass over C afterwards (_native.apply_epilogue, the arithmetic the kernels must match bit for bit). Variants
take turns call by call; medians of wall time and of process CPU time (less sensitive to other jobs' load).
"""

import argparse
import datetime
import os
import platform
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxruntime_ep_xdna import _native

SHAPES = [  # (M, K, N, what)
    (1500, 512, 512, "whisper-base encoder q/k/v/o"),
    (1500, 512, 2048, "whisper-base encoder fc1"),
    (1500, 2048, 512, "whisper-base encoder fc2"),
    (1500, 64, 1500, "attention scores (one head)"),
    (1500, 1500, 64, "attention values (one head)"),
    (1, 512, 51865, "decoder logits GEMV"),
    (1, 512, 512, "decoder GEMV"),
    (5, 512, 2048, "decoder, 5 beams"),
    # Few rows (issue 7: the beams of beam search are M), whisper-base decoder shapes.
    (5, 512, 512, "decoder q/k/v/o, 5 beams"),
    (5, 2048, 512, "decoder fc2, 5 beams"),
    (5, 512, 51865, "decoder logits, 5 beams"),
    (16, 512, 512, "decoder q/k/v/o, 16 rows"),
    (16, 512, 2048, "decoder fc1, 16 rows"),
    (16, 2048, 512, "decoder fc2, 16 rows"),
]
QUICK_SHAPES = [SHAPES[0], SHAPES[5], SHAPES[6], SHAPES[7]]
# Run-time B (decoder self-attention with 5 beams x 8 heads: one query row against the cache): batch, M, K, N.
RUNTIME_B_SHAPES = [(40, 1, 64, 448, "attention scores q.K^T, 5 beams x 8 heads"),
                    (40, 1, 448, 64, "attention values p.V, 5 beams x 8 heads")]


def machine_line():
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        isa = [name for name in ("avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f", "avx2", "amx_bf16")
               if f" {name}" in text]
        flags = ", ".join(isa)
    except OSError:
        pass
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (f"{model}, {os.cpu_count()} logical cores ({flags}); onnxruntime {ort.__version__}; "
            f"numpy {np.__version__}; {date}")


def matmul_model(b):
    k, n = b.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["C"])], "gemm",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("C", TensorProto.FLOAT, ["M", n])],
        [numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model.SerializeToString()


def xdna_ep_available():
    """Registers the package's plugin EP if it can; returns a reason string when it cannot."""
    try:
        import onnxruntime_ep_xdna
        onnxruntime_ep_xdna.register()
        names = {d.ep_name for d in ort.get_ep_devices()}
        if "XDNAExecutionProvider" not in names:
            return "XDNAExecutionProvider not among ort.get_ep_devices()"
        return None
    except Exception as e:  # the EP is optional here: the benchmark still measures the kernel
        return f"{type(e).__name__}: {e}"


def xdna_session(model_bytes, precision="bf16"):
    options = ort.SessionOptions()
    devices = [d for d in ort.get_ep_devices() if d.ep_name == "XDNAExecutionProvider"]
    options.add_provider_for_devices(devices, {} if precision == "bf16" else {"precision": precision})
    return ort.InferenceSession(model_bytes, sess_options=options)


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_shape(m, k, n, reps, threads, use_xdna_ep, precisions=True):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    model = matmul_model(b)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    cpu = ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    packed = _native.pack_b(b)
    runners = {
        "cpu": lambda: cpu.run(None, {"A": a}),
        "emu": lambda: _native.emulator_gemm(a, packed, threads),
    }
    if precisions:
        quantized, split = _native.quantize_b_int8(b), _native.pack_b_bf16x3(b)
        runners["int8"] = lambda: _native.emulator_gemm_int8(a, quantized, threads)
        runners["x3"] = lambda: _native.emulator_gemm_bf16x3(a, split, threads)
    if use_xdna_ep:
        try:
            xdna = xdna_session(model)
            runners["xdna"] = lambda: xdna.run(None, {"A": a})
            if precisions:
                xdna_int8, xdna_x3 = xdna_session(model, "int8"), xdna_session(model, "bf16x3")
                runners["xdna_int8"] = lambda: xdna_int8.run(None, {"A": a})
                runners["xdna_x3"] = lambda: xdna_x3.run(None, {"A": a})
        except Exception as e:
            print(f"  (XDNA EP session for {m}x{k}x{n} failed: {type(e).__name__}: {e})")

    # Sanity: the emulator result must be the contract's (close to fp32 within bf16 input rounding).
    c_cpu, c_emu = runners["cpu"]()[0], runners["emu"]()
    scale = np.abs(a) @ np.abs(b)
    worst = float(np.max(np.abs(c_emu - c_cpu) / (scale + 1e-30)))
    assert worst <= 2.0**-7 + 2 * k * 2.0**-23, f"emulator result off by {worst} (relative to |A|.|B|)"
    if precisions:  # near-fp32 for bf16x3 (its contract bound, plus the CPU EP's own fp32 error)
        worst = float(np.max(np.abs(runners["x3"]() - c_cpu) / (scale + 1e-30)))
        assert worst <= 2.0**-14 + 4 * k * 2.0**-23, f"bf16x3 result off by {worst} (relative to |A|.|B|)"

    # Runners take turns in blocks (A..B..C..A..B..C..), not call by call: ORT's intra-op threads keep spinning for
    # a while after each run and would steal the cores from whichever runner comes next.
    times = {name: [] for name in runners}
    for block in range(2):
        for name, fn in runners.items():
            time.sleep(0.05)  # let the previous runner's threads go idle
            fn()  # warm-up (thread pools, first touch of buffers)
            times[name] += [timed(fn) for _ in range((reps + 1) // 2)]
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def runtime_b_model(batch, k, n):
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["C"])], "gemm_runtime_b",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [batch, "M", k]),
         helper.make_tensor_value_info("B", TensorProto.FLOAT, [batch, k, n])],
        [helper.make_tensor_value_info("C", TensorProto.FLOAT, [batch, "M", n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model.SerializeToString()


def bench_runtime_b(batch, m, k, n, reps, threads, use_xdna_ep):
    """Both operands at run time: CPU EP vs XDNA EP (the EP reads B unpacked for few rows)."""
    rng = np.random.default_rng(0)
    feeds = {"A": rng.standard_normal((batch, m, k), dtype=np.float32),
             "B": rng.standard_normal((batch, k, n), dtype=np.float32)}
    model = runtime_b_model(batch, k, n)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    cpu = ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    runners = {"cpu": lambda: cpu.run(None, feeds)}
    if use_xdna_ep:
        xdna = xdna_session(model)
        runners["xdna"] = lambda: xdna.run(None, feeds)
    times = {name: [] for name in runners}
    for block in range(2):
        for name, fn in runners.items():
            time.sleep(0.05)
            fn()
            times[name] += [timed(fn) for _ in range((reps + 1) // 2)]
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


EPILOGUE_SHAPES = [(1500, 512, 2048, "encoder fc1 (bias + GELU)"), (1500, 2048, 512, "encoder fc2 (bias + residual)"),
                   (1500, 512, 512, "encoder q/k/v/o")]


def bench_epilogue(reps, threads):
    """Extra ms of each epilogue over the bare product, inside the kernels and as a separate pass afterwards."""
    print(f"{'M x K x N':>16} {'prec':>5} {'product':>8} {'CPU':>7} | {'+bias':>7} {'+b+gelu':>8} {'+b+res':>7} | "
          f"{'CPU: +bias':>10} {'+b+gelu':>8} {'+b+res':>7} | {'2nd pass: +b+gelu':>17}   shape")
    rng = np.random.default_rng(0)
    for m, k, n, what in EPILOGUE_SHAPES:
        a = rng.standard_normal((m, k)).astype(np.float32)
        w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        bias = rng.standard_normal(n).astype(np.float32)
        res = rng.standard_normal((m, n)).astype(np.float32)
        for prec, b, gemm in (("int8", _native.quantize_b_int8(w), _native.emulator_gemm_int8),
                              ("bf16", _native.pack_b(w), _native.emulator_gemm)):
            variants = {
                "none": lambda: gemm(a, b, threads),
                "bias": lambda: gemm(a, b, threads, bias=bias),
                "gelu": lambda: gemm(a, b, threads, bias=bias, gelu=True),
                "res": lambda: gemm(a, b, threads, bias=bias, residual=res),
                "pass": lambda: _native.apply_epilogue(gemm(a, b, threads), bias, True),
            }
            wall = {key: [] for key in variants}
            cpu = {key: [] for key in variants}
            for _ in range(2):
                for fn in variants.values():
                    fn()
            for _ in range(reps):
                for key, fn in variants.items():
                    c0, t0 = time.process_time(), time.perf_counter()
                    fn()
                    wall[key].append(time.perf_counter() - t0)
                    cpu[key].append(time.process_time() - c0)
            w_ms = {key: statistics.median(v) * 1e3 for key, v in wall.items()}
            c_ms = {key: statistics.median(v) * 1e3 for key, v in cpu.items()}
            extra = lambda d, key: f"{d[key] - d['none']:+.2f}"  # noqa: E731
            print(f"{f'{m}x{k}x{n}':>16} {prec:>5} {w_ms['none']:8.2f} {c_ms['none']:7.2f} | {extra(w_ms, 'bias'):>7} "
                  f"{extra(w_ms, 'gelu'):>8} {extra(w_ms, 'res'):>7} | {extra(c_ms, 'bias'):>10} {extra(c_ms, 'gelu'):>8} "
                  f"{extra(c_ms, 'res'):>7} | {extra(w_ms, 'pass'):>17}   {what}", flush=True)
    print("\nproduct: ms of the bare product (wall; CPU = process CPU time); +...: extra ms of each epilogue run inside")
    print("the kernels over it (wall, then CPU time); 2nd pass: bias + GELU applied after the product by the baseline")
    print("scalar apply_epilogue on a copy of C (the peer: the epilogue as it ran before it moved into the kernels,")
    print("plus that copy), wall. All on the CPU; a shared machine: compare within a run.")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 shapes, few repetitions")
    parser.add_argument("--threads", type=int, default=0, help="threads for both (0 = all cores)")
    parser.add_argument("--reps", type=int, default=0, help="timed repetitions per shape (default: by size)")
    parser.add_argument("--no-ep", action="store_true", help="skip the XDNA EP column")
    parser.add_argument("--no-precisions", action="store_true", help="skip the int8 and bf16x3 columns")
    parser.add_argument("--epilogue", action="store_true", help="only the epilogue's cost (see the module text)")
    args = parser.parse_args()

    if args.epilogue:
        print("GEMM epilogue cost: emulator kernels (the NPU contract computed on the CPU), no NPU")
        print("machine:", machine_line())
        print("emulator kernels:", _native.emulator_kernel_name(), "| int8 kernel:", _native.emulator_int8_kernel_name())
        print(f"threads: {args.threads or os.cpu_count()}; medians of {args.reps or 30} turns")
        print()
        bench_epilogue(args.reps or 30, args.threads)
        return

    print("GEMM benchmark: emulator backend (NPU contract computed on the CPU) vs ONNX Runtime CPU EP")
    print("machine:", machine_line())
    print("emulator kernels:", _native.emulator_kernel_name(), "| int8 kernel:", _native.emulator_int8_kernel_name())
    why_not = "--no-ep given" if args.no_ep else xdna_ep_available()
    print("XDNA EP column:", "yes (no NPU here: it runs the emulator)" if why_not is None else f"no ({why_not})")
    print(f"threads: {args.threads or os.cpu_count()}; times in ms are medians of repeated runs")
    print()

    header = f"{'M x K x N':>18} {'GFLOP':>7} {'CPU EP':>9} {'emulator':>9} {'ratio':>6} {'emu GFLOPS':>10}"
    if not args.no_precisions:
        header += f" {'int8':>9} {'speedup':>7} {'bf16x3':>9} {'cost':>5}"
    if why_not is None:
        header += f" {'XDNA EP':>9} {'ratio':>6}"
        if not args.no_precisions:
            header += f" {'EP int8':>9} {'ratio':>6} {'EP x3':>9} {'ratio':>6}"
    print(header + "   shape")
    for m, k, n, what in (QUICK_SHAPES if args.quick else SHAPES):
        gflop = 2.0 * m * k * n / 1e9
        reps = args.reps or (5 if args.quick else (10 if gflop > 1 else 30 if gflop > 0.05 else 200))
        ms = bench_shape(m, k, n, reps, args.threads, why_not is None, not args.no_precisions)
        line = (f"{f'{m}x{k}x{n}':>18} {gflop:7.3f} {ms['cpu']:9.3f} {ms['emu']:9.3f} "
                f"{ms['cpu'] / ms['emu']:5.2f}x {gflop / ms['emu'] * 1e3:10.1f}")
        if "int8" in ms:
            line += f" {ms['int8']:9.3f} {ms['emu'] / ms['int8']:6.2f}x {ms['x3']:9.3f} {ms['x3'] / ms['emu']:4.1f}x"
        if "xdna" in ms:
            line += f" {ms['xdna']:9.3f} {ms['cpu'] / ms['xdna']:5.2f}x"
            for col in ("xdna_int8", "xdna_x3"):
                if col in ms:
                    line += f" {ms[col]:9.3f} {ms['cpu'] / ms[col]:5.2f}x"
        elif why_not is None:
            line += f" {'-':>9} {'-':>6}"
        print(line + f"   {what}", flush=True)
    if why_not is None and not args.quick:
        print()
        print(f"{'run-time B: batch x M x K x N':>30} {'CPU EP':>9} {'XDNA EP':>9} {'ratio':>6}   shape")
        for batch, m, k, n, what in RUNTIME_B_SHAPES:
            ms = bench_runtime_b(batch, m, k, n, args.reps or 200, args.threads, True)
            print(f"{f'{batch}x{m}x{k}x{n}':>30} {ms['cpu']:9.3f} {ms['xdna']:9.3f} {ms['cpu'] / ms['xdna']:5.2f}x   {what}",
                  flush=True)
    print("\nratio = CPU EP time / emulator (or XDNA EP) time (>1: faster than the CPU EP). int8 / bf16x3: emulator ms")
    print("in those precision modes; speedup = bf16 time / int8 time, cost = bf16x3 time / bf16 time. EP int8 / EP x3:")
    print("the XDNA EP with precision=int8 / bf16x3, ratio against the CPU EP (fp32). All on the CPU")
    print("(a shared machine: other jobs' load is in every column alike; compare within a run).")


if __name__ == "__main__":
    main()
