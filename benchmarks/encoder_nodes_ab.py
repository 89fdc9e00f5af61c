"""In-process A/B of one 30 s encoder window (issue 13): the nodes optimum's encoder leaves to the CPU EP, taken.

Three sessions of whisper-base's encoder run in turns on one window (the sessions take turns, so that background
load hits all alike): optimum's file with conv2's GELU output also a graph output (the conv then leaves the
Transpose and the positional Add after it to the CPU EP: the plan before ops/conv.cc took them), optimum's file as
is, and the copy of
whisper/decoder_graph.py pass 9 (Reshape targets constant: the self-attention LayerNormalizations, Q's scale and
the head merges taken too). Prints where each session's nodes went, whether the outputs are bit-identical, and the
median and min wall time per window with the median of per-turn differences against the first.

Without an NPU the XDNA EP computes on the CPU emulator of the NPU kernel contract: every figure is a CPU figure.

    python3 benchmarks/encoder_nodes_ab.py [--runs 15] [--precision int8]
"""

import argparse
import collections
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemm import machine_line  # noqa: E402
from step_ab import with_graph_outputs  # noqa: E402

import onnxruntime_ep_xdna as xdna  # noqa: E402
from onnxruntime_ep_xdna.whisper import ensure_model, load_model  # noqa: E402
from onnxruntime_ep_xdna.whisper.decoder_graph import ENCODER_FILE  # noqa: E402

CONV2_GELU = "/Mul_3_output_0"  # optimum's name of conv2's GELU output, read by the Transpose to [N, T, C]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--precision", default="int8")
    args = ap.parse_args()
    ort.set_default_logger_severity(3)
    print(machine_line())
    w = load_model(ensure_model("base"), provider="xdna", precision=args.precision)
    if ENCODER_FILE not in w.optimised_paths:
        sys.exit("no optimised encoder copy (XDNA_OPTIMISED_DECODERS=0, or a bf16x3 policy): nothing to compare")
    original = w.model_dir / ENCODER_FILE
    tmp = Path(tempfile.mkdtemp())
    paths = {"conv Transpose and Add on the CPU EP": with_graph_outputs(
                 onnx.load(str(original)), [CONV2_GELU], tmp / ENCODER_FILE, "conv2 GELU outputs"),
             "optimum's encoder": original,
             "pass 9 copy": w.optimised_paths[ENCODER_FILE]}
    sessions = {k: ort.InferenceSession(str(p), sess_options=xdna.session_options(), providers=w._providers)
                for k, p in paths.items()}
    for k, s in sessions.items():
        left = collections.Counter(op for _, op in xdna.placement(s).on("CPUExecutionProvider"))
        print(f"{k}: {sum(left.values())} nodes on the CPU EP {dict(left)}")
    x = np.random.default_rng(0).standard_normal((1, w.n_mels, 3000)).astype(np.float32)
    feed, outputs = {"input_features": x}, ["last_hidden_state"]
    results = [s.run(outputs, feed)[0] for s in sessions.values()]
    print("outputs bit-identical:", all(np.array_equal(results[0], r) for r in results[1:]))
    times = {k: [] for k in sessions}
    for _ in range(args.runs):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(outputs, feed)
            times[k].append(time.perf_counter() - t0)
    first = next(iter(times.values()))
    print(f"one 30 s window, precision {args.precision}, {args.runs} runs in turns (ms):")
    for k, t in times.items():
        diff = statistics.median([a - b for a, b in zip(t, first)])
        print(f"  {k:38s} median {statistics.median(t) * 1e3:7.1f}  min {min(t) * 1e3:7.1f}  "
              f"per-turn difference {diff * 1e3:+6.1f}")


if __name__ == "__main__":
    main()
