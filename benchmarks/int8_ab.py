"""int8 GEMM A/B between two builds (the emulator's int8 kernels, CPU only: no figure here is an NPU figure).

Times _native.emulator_gemm_int8 (B quantised once beforehand, all cores) on Whisper base's encoder shapes and
the decoder's few-row shapes; medians of wall time and of process CPU time (both threads; less sensitive to other
jobs' load than wall time). Two builds cannot share a process, so run it with each build's Python in alternating
turns, then compare:

    for i in 1 2 3; do old/python benchmarks/int8_ab.py --json /tmp/before_$i.json
                       new/python benchmarks/int8_ab.py --json /tmp/after_$i.json; done
    python benchmarks/int8_ab.py --compare /tmp/before_*.json -- /tmp/after_*.json
"""

import argparse
import json
import statistics
import sys
import time

SHAPES = [(1500, 512, 512), (1500, 512, 2048), (1500, 2048, 512), (1, 512, 512), (1, 512, 2048), (1, 2048, 512),
          (5, 512, 2048), (5, 2048, 512), (1, 512, 51865)]


def measure():
    import numpy as np
    from onnxruntime_ep_xdna import _native

    rng = np.random.default_rng(0)
    out = {"int8 kernel": _native.emulator_int8_kernel_name()}
    for m, k, n in SHAPES:
        a = rng.standard_normal((m, k)).astype(np.float32)
        qb = _native.quantize_b_int8(rng.standard_normal((k, n)).astype(np.float32))
        _native.emulator_gemm_int8(a, qb)
        wall, cpu = [], []
        for _ in range(7 if m > 16 else 41):
            t0, c0 = time.perf_counter(), time.process_time()
            _native.emulator_gemm_int8(a, qb)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        out[f"{m}x{k}x{n}"] = [statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3]
    return out


def compare(before_paths, after_paths):
    def load(paths):
        runs = [json.load(open(p)) for p in paths]
        keys = [k for k in runs[0] if k != "int8 kernel"]
        return {k: [statistics.median(r[k][i] for r in runs) for i in (0, 1)] for k in keys}

    b, a = load(before_paths), load(after_paths)
    print(f"medians over {len(before_paths)} / {len(after_paths)} runs, ms")
    print(f"{'M x K x N':>14} | {'wall before':>11} {'after':>8} {'ratio':>6} | {'cpu before':>10} {'after':>8} {'ratio':>6}")
    for k in b:
        print(f"{k:>14} | {b[k][0]:11.3f} {a[k][0]:8.3f} {b[k][0] / a[k][0]:6.2f} | "
              f"{b[k][1]:10.3f} {a[k][1]:8.3f} {b[k][1] / a[k][1]:6.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write this build's medians here")
    parser.add_argument("--compare", nargs="+", help="before JSONs, then --, then after JSONs")
    args, rest = parser.parse_known_args()
    if args.compare:
        argv = sys.argv[sys.argv.index("--compare") + 1:]
        split = argv.index("--")
        compare(argv[:split], argv[split + 1:])
        return
    out = measure()
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
