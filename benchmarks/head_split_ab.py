"""The attention's head split and merge (Reshape + Transpose before Q, Transpose + Reshape before out_proj) run inside
the fused attention node (ops/transpose_fusion.cc read_through_head_split, ops/attention.cc read_out_head_merge)
against the same graph with them on the CPU EP, in turns in one process so that background load hits both alike
(issues 7 and 13).

One decoder_with_past step of whisper-base (the optimised copy `xdna transcribe` runs, uncompiled) at each batch of
--batch with --past cached tokens: the copy as is, and the copy where each such Reshape (split) and Transpose
(merge) output is also a graph output (a value another reader takes: the claim leaves it, its scale Mul and its
partner to the CPU EP, the previous plan). Per row count: median, 25th percentile and min of the step's wall time,
and the median of the per-pair differences (split on the CPU EP minus read through, the runs in turns).

Without an NPU the XDNA EP computes on the CPU emulator of the NPU kernel contract: every figure is a CPU figure.

    python3 benchmarks/head_split_ab.py [--precision auto] [--steps 400] [--past 128] [--batch 1 5]
"""

import argparse
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
from masked_attention_ab import step_feed  # noqa: E402
from whisper import build_clips  # noqa: E402

import onnxruntime_ep_xdna as xdna  # noqa: E402
from onnxruntime_ep_xdna._precision import DEFAULT as DEFAULT_PRECISION  # noqa: E402
from onnxruntime_ep_xdna.whisper import ensure_model, features, load_model, onnx_model  # noqa: E402
from onnxruntime_ep_xdna.whisper.evaluation import fetch_speech_samples  # noqa: E402
from onnxruntime_ep_xdna.whisper.features import N_FRAMES  # noqa: E402


def unsplit_copy(path: Path, out_dir: Path) -> tuple[Path, int]:
    """The graph with each Reshape -> Transpose -> MatMul (head split) Reshape output and each Transpose -> Reshape
    -> MatMul (head merge) Transpose output also a graph output; and how many."""
    m = onnx.load(str(path))
    readers: dict[str, list] = {}
    for n in m.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)

    def only_reader(value, op_type):
        r = readers.get(value, [])
        return r[0] if len(r) == 1 and r[0].op_type == op_type else None

    def reaches_matmul(value):  # directly or through a scale Mul (the decoder's Q)
        mul = only_reader(value, "Mul")
        return only_reader(value, "MatMul") is not None or (mul is not None and reaches_matmul(mul.output[0]))

    extra = []
    for n in m.graph.node:
        pair = {"Reshape": "Transpose", "Transpose": "Reshape"}.get(n.op_type)
        nxt = only_reader(n.output[0], pair) if pair else None
        if nxt is not None and reaches_matmul(nxt.output[0]):
            extra.append(n.output[0])
    m.graph.output.extend(onnx.helper.make_tensor_value_info(v, onnx.TensorProto.FLOAT, None) for v in extra)
    out = out_dir / "unsplit.onnx"
    onnx.save(m, str(out), save_as_external_data=True, location="unsplit.data")
    return out, len(extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default=DEFAULT_PRECISION)
    parser.add_argument("--steps", type=int, default=400, help="steps per session and row count")
    parser.add_argument("--past", type=int, default=128, help="cached tokens")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 5], help="rows (beams)")
    args = parser.parse_args()
    ort.set_default_logger_severity(3)
    print(machine_line())
    print("no NPU here: the XDNA EP runs the CPU emulator of the NPU kernel contract (CPU figures)")
    w = load_model(ensure_model("base"), provider="xdna", precision=args.precision)
    if not w.optimised_paths:
        sys.exit("the optimised decoder copies are off (XDNA_OPTIMISED_DECODERS=0): nothing to compare")
    clips, _ = build_clips(fetch_speech_samples(), include_long=False)
    audio = next(iter(clips.values()))[0]
    mel = features.from_array(audio, w.n_mels, w.mel_filters)
    window = w.encode(mel.window(0, min(N_FRAMES, mel.content_frames)))
    w.start(window, [w.tokens.sot])
    path = w.optimised_paths[onnx_model.FILES[2]]
    unsplit, extra = unsplit_copy(path, Path(tempfile.mkdtemp()))
    print(f"unsplit copy: {extra} head split/merge values also graph outputs")
    sessions = {"unsplit": unsplit, "read through": path}
    sessions = {k: ort.InferenceSession(str(p), xdna.session_options(), providers=w._providers)
                for k, p in sessions.items()}
    for name, s in sessions.items():
        placed = xdna.placement(s)
        on_ep = [op for _, op in placed.on(xdna.EP_NAME)]
        print(f"{name}: {len(placed.on('CPUExecutionProvider'))} nodes on the CPU EP ({on_ep.count('Reshape')} "
              f"Reshape, {on_ep.count('Transpose')} Transpose in the EP's nodes), "
              f"{len(placed.on(xdna.EP_NAME))} in the EP's fused nodes")
    print(f"\ndecoder_with_past step, past {args.past} tokens, precision {args.precision}, {args.steps} steps each "
          "in turns (ms; unsplit -> read through)\n")
    print("| rows | median | 25th percentile | min | median of per-pair differences |")
    print("|---|---|---|---|---|")
    for batch in args.batch:
        feed = step_feed(w, window, batch, args.past)
        times = {k: [] for k in sessions}
        outs = {}
        for k, s in sessions.items():
            for _ in range(10):
                outs[k] = s.run_with_ort_values(w._past_outputs, feed)
        for a, b in zip(outs["unsplit"], outs["read through"]):  # only addressing: the same bits
            if a.data_type() == "tensor(float)":  # (numpy has no bfloat16: the bf16 caches come from these)
                assert np.array_equal(a.numpy(), b.numpy(), equal_nan=True), "the two plans differ"
        for _ in range(args.steps):
            for k, s in sessions.items():
                t = time.perf_counter()
                s.run_with_ort_values(w._past_outputs, feed)
                times[k].append((time.perf_counter() - t) * 1e3)
        u, f = np.array(times["unsplit"]), np.array(times["read through"])
        print(f"| {batch} | {np.median(u):.3f} -> {np.median(f):.3f} | {np.percentile(u, 25):.3f} -> "
              f"{np.percentile(f, 25):.3f} | {u.min():.3f} -> {f.min():.3f} | {statistics.median(u - f):.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
