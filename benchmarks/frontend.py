"""Log-mel front end benchmark: features.py's numpy front end against the ONNX front end (whisper/frontend.py).

Everything here runs on the CPU; no figure is an NPU figure (the XDNA EP runs its emulator backend when there is
no NPU). For each clip length it times what `transcribe()` reports as features_s (features.from_array: the whole
log-mel of the clip, the whole-file maximum, ready for the windows):
  * numpy:          the default front end (np.fft.rfft + an fp32 mel GEMM);
  * ONNX, CPU EP:   the front-end model on ONNX Runtime's CPU EP (fp32);
  * ONNX, XDNA EP:  the model with its DFT (Conv) and mel (MatMul) GEMMs on the XDNA EP, in bf16x3 when the EP has
                    the `precision` option, else in its default bf16 (labelled: not accurate enough to be used).
Runners take turns (round robin) so background load hits all alike; medians and ratios against numpy are printed.

    python3 benchmarks/frontend.py            # 30 s and 5 min clips, 9 repetitions
    python3 benchmarks/frontend.py --quick    # 30 s, 3 repetitions
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gemm import machine_line  # noqa: E402

from onnxruntime_ep_xdna.whisper import features as F  # noqa: E402
from onnxruntime_ep_xdna.whisper import frontend as FE  # noqa: E402


def clip(seconds: float) -> np.ndarray:
    """Speech-like test audio: a chirp with noise (the timing does not depend on the content)."""
    t = np.arange(int(F.SAMPLE_RATE * seconds)) / F.SAMPLE_RATE
    rng = np.random.default_rng(0)
    return (0.3 * np.sin(2 * np.pi * (200 + 30 * t) * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def runners(n_mels: int):
    filters = F.mel_filter_bank(n_mels)
    out = {"numpy": None, "ONNX, CPU EP (fp32)": FE.EpFrontEnd(n_mels, filters, provider="cpu")}
    try:
        out["ONNX, XDNA EP (bf16x3)"] = FE.EpFrontEnd(n_mels, filters, provider="xdna")
    except Exception as e:
        print(f"XDNA EP in bf16x3 not available ({str(e).splitlines()[-1][:120]}); timing its default bf16 "
              "instead, which is NOT accurate enough for the front end", file=sys.stderr)
        out["ONNX, XDNA EP (bf16, inaccurate)"] = FE.EpFrontEnd(n_mels, filters, provider="xdna", precision=None)
    return filters, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--n-mels", type=int, default=80)
    args = ap.parse_args()
    reps = args.reps or (3 if args.quick else 9)
    lengths = [30.0] if args.quick else [30.0, 300.0]
    filters, fronts = runners(args.n_mels)
    print(machine_line())
    print(f"log-mel front end, {args.n_mels} mels, features.from_array (whole clip + maximum), median of {reps}; "
          "CPU/emulator figures, shared 2-core VM: noisy")
    print(f"| clip | {' | '.join(fronts)} |")
    print(f"|---|{'---|' * len(fronts)}")
    for seconds in lengths:
        audio = clip(seconds)
        times = {name: [] for name in fronts}
        for name, fe in fronts.items():  # warm-up (first run allocates, packs)
            F.from_array(audio, args.n_mels, filters, fe)
        for _ in range(reps):
            for name, fe in fronts.items():
                t = time.perf_counter()
                F.from_array(audio, args.n_mels, filters, fe)
                times[name].append(time.perf_counter() - t)
        med = {name: statistics.median(v) for name, v in times.items()}
        base = med["numpy"]
        cells = [f"{1e3 * med[n]:.1f} ms ({med[n] / base:.2f}x)" for n in fronts]
        print(f"| {seconds:.0f} s | {' | '.join(cells)} |")
    print("(x = time / numpy's time in the same run; above 1 = slower than numpy)")


if __name__ == "__main__":
    main()
