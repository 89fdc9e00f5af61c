"""The emulator's kernel sets against each other on one CPU: bf16 and int8 GEMM times per forced set.

The set is chosen once per process (XDNA_EMULATOR_ISA), so each set runs in its own subprocess; the sets take
turns for --rounds rounds so background load hits all alike, and the table prints the median over rounds of each
round's median. Kernel level (no ONNX Runtime session); everything runs on the CPU, no figure is an NPU figure.
This is the measurement behind the default choice in kernels/emulator/emulator.cc (benchmarks/README.md,
"AMX kernels").

    python3 benchmarks/kernel_sets.py                          # amx, avx512, avx512bf16 where the CPU has them
    python3 benchmarks/kernel_sets.py --sets avx2,avx512 --rounds 5
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = ["1500x512x512", "1500x512x2048", "1500x2048x512", "1500x64x1500", "1500x1500x64", "1x512x51865",
          "5x512x2048", "8x512x2048", "12x512x2048", "16x512x512", "16x512x2048", "16x2048x512"]

_CHILD = """
import json, statistics, sys, time
import numpy as np
from onnxruntime_ep_xdna import _native
out = {"bf16_set": _native.emulator_kernel_name(), "int8_set": _native.emulator_int8_kernel_name(), "ms": {}}
rng = np.random.default_rng(0)
for shape in sys.argv[1:]:
    m, k, n = map(int, shape.split("x"))
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    times = []
    for fn, weight in ((_native.emulator_gemm, _native.pack_b(b)), (_native.emulator_gemm_int8, _native.quantize_b_int8(b))):
        fn(a, weight)  # warm-up: thread pool, scratch buffers
        reps = max(3, min(200, int(2e9 / (2 * m * k * n + 1e6))))
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn(a, weight)
            ts.append(time.perf_counter() - t)
        times.append(statistics.median(ts) * 1e3)
    out["ms"][shape] = times
print(json.dumps(out))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", default="amx,avx512,avx512bf16", help="XDNA_EMULATOR_ISA values to compare")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="MxKxN,...")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gemm import machine_line

    shapes = args.shapes.split(",")
    runs = {}  # set -> list of child outputs
    skipped = {}
    for _ in range(args.rounds):
        for isa in args.sets.split(","):
            if isa in skipped:
                continue
            proc = subprocess.run([sys.executable, "-c", _CHILD, *shapes], env=dict(os.environ, XDNA_EMULATOR_ISA=isa),
                                  capture_output=True, text=True, check=True)
            if "not available on this CPU" in proc.stderr:
                skipped[isa] = proc.stderr.strip().splitlines()[-1]
                continue
            runs.setdefault(isa, []).append(json.loads(proc.stdout))
            time.sleep(0.2)

    print("emulator kernel sets, kernel level (CPU figures, no NPU)")
    print("machine:", machine_line())
    print(f"threads: all cores; ms = median over {args.rounds} rounds of each round's median; sets take turns")
    for isa, why in skipped.items():
        print(f"skipped {isa}: {why}")
    sets = list(runs)
    names = {isa: (runs[isa][0]["bf16_set"], runs[isa][0]["int8_set"]) for isa in sets}
    header = f"{'M x K x N':>14} |" + "".join(f" {names[i][0] + ' bf16':>15}" for i in sets) + " |"
    header += "".join(f" {names[i][1] + ' int8':>15}" for i in sets)
    print(header)
    for shape in shapes:
        med = {i: [statistics.median(r["ms"][shape][j] for r in runs[i]) for j in (0, 1)] for i in sets}
        line = f"{shape:>14} |" + "".join(f" {med[i][0]:15.3f}" for i in sets) + " |"
        line += "".join(f" {med[i][1]:15.3f}" for i in sets)
        print(line, flush=True)


if __name__ == "__main__":
    main()
