"""The decoder's masked self-attention as one fused node (ops/attention.cc: mask Add and NaN rule) against the same
graph unfused, in turns in one process so that background load hits both alike (issues 7 and 13).

One decoder_with_past step of whisper-base (the optimised copy `xdna transcribe` runs, uncompiled) at each batch of
--batch with --past cached tokens: the copy as is, and the copy with each self-attention Softmax also a graph output
(a Softmax another node reads: the claim refuses the fusion, so the two MatMuls run as plain products and the Add,
Softmax, IsNaN and Where on the CPU EP: the previous plan). Per row count: median, 25th percentile and min of the
step's wall time, and the median of the per-pair differences (unfused minus fused, the runs in turns).

Without an NPU the XDNA EP computes on the CPU emulator of the NPU kernel contract: every figure is a CPU figure.

    python3 benchmarks/masked_attention_ab.py [--precision auto] [--steps 400] [--past 128] [--batch 1 5]
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
from whisper import build_clips  # noqa: E402

import onnxruntime_ep_xdna as xdna  # noqa: E402
from onnxruntime_ep_xdna._precision import DEFAULT as DEFAULT_PRECISION  # noqa: E402
from onnxruntime_ep_xdna.whisper import ensure_model, features, load_model, onnx_model  # noqa: E402
from onnxruntime_ep_xdna.whisper.evaluation import fetch_speech_samples  # noqa: E402
from onnxruntime_ep_xdna.whisper.features import N_FRAMES  # noqa: E402


def unfused_copy(path: Path, out_dir: Path) -> Path:
    """The graph with every self-attention Softmax also a graph output."""
    m = onnx.load(str(path))
    softmaxes = [n.output[0] for n in m.graph.node if n.op_type == "Softmax" and "self_attn" in n.name]
    m.graph.output.extend(onnx.helper.make_tensor_value_info(s, onnx.TensorProto.FLOAT, None) for s in softmaxes)
    out = out_dir / "unfused.onnx"
    onnx.save(m, str(out), save_as_external_data=True, location="unfused.data")
    return out


def step_feed(w, window, batch: int, past: int) -> dict:
    rng = np.random.default_rng(0)
    feed = dict(window.cross)
    for name in w._as_past.values():
        if ".decoder." in name:
            kv = rng.standard_normal((batch, w._kv_heads, past, w._kv_dim)).astype(np.float32)
            if w._self_kv_type == "tensor(bfloat16)":  # decoder_graph pass 7: the bits of bf16 (truncated) values
                kv = (kv.view(np.uint32) >> 16).astype(np.uint16)
            feed[name] = onnx_model.ortvalue_like(kv, w._self_kv_type)
    feed["input_ids"] = ort.OrtValue.ortvalue_from_numpy(np.full((batch, 1), 440, np.int64))
    return feed


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
    sessions = {"unfused": unfused_copy(path, Path(tempfile.mkdtemp())), "fused": path}
    sessions = {k: ort.InferenceSession(str(p), xdna.session_options(), providers=w._providers)
                for k, p in sessions.items()}
    for name, s in sessions.items():
        placed = xdna.placement(s)
        print(f"{name}: {[op for _, op in placed.on(xdna.EP_NAME)].count('Softmax')} Softmax in the EP's nodes, "
              f"{len(placed.on('CPUExecutionProvider'))} nodes on the CPU EP")
    print(f"\ndecoder_with_past step, past {args.past} tokens, precision {args.precision}, {args.steps} steps each "
          "in turns (ms; unfused -> fused)\n")
    print("| rows | median | 25th percentile | min | median of per-pair differences |")
    print("|---|---|---|---|---|")
    for batch in args.batch:
        feed = step_feed(w, window, batch, args.past)
        times = {k: [] for k in sessions}
        for s in sessions.values():
            for _ in range(10):
                s.run_with_ort_values(w._past_outputs, feed)
        for _ in range(args.steps):
            for k, s in sessions.items():
                t = time.perf_counter()
                s.run_with_ort_values(w._past_outputs, feed)
                times[k].append((time.perf_counter() - t) * 1e3)
        u, f = np.array(times["unfused"]), np.array(times["fused"])
        print(f"| {batch} | {np.median(u):.3f} -> {np.median(f):.3f} | {np.percentile(u, 25):.3f} -> "
              f"{np.percentile(f, 25):.3f} | {u.min():.3f} -> {f.min():.3f} | {statistics.median(u - f):.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
